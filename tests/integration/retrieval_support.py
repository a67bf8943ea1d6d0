"""What the retrieval service's tests share: a client that speaks as the gateway does (the
internal token and an owner), Milvus's rows as stored, PDFs built by hand (a good one, one
that takes pypdf seconds, one that inflates to 70 MB) and process probes."""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import psutil
from pymilvus import MilvusClient

from services.retrieval.chunking import chunk_text, resolve
from services.retrieval.embedder import load_tokenizer, packaged_model_dir
from tests.conftest import ROOT

CORPUS = ROOT / "bench" / "data" / "chemistry"
TOKEN = "dev-internal-token"
MODEL = "all-MiniLM-L6-v2"


class Client:
    """HTTP as the gateway speaks to the service: internal token plus the owner."""

    def __init__(self, url: str, owner: str) -> None:
        self.http = httpx.Client(
            base_url=url,
            timeout=60,
            headers={"authorization": f"Bearer {TOKEN}", "x-crucible-owner": owner},
        )

    def upload(self, name: str, data: bytes, purpose: str = "assistants") -> httpx.Response:
        return self.http.post("/v1/files", files={"file": (name, data)}, data={"purpose": purpose})

    def file_id(self, name: str, data: bytes) -> str:
        r = self.upload(name, data)
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    def store(self, **body: Any) -> str:
        r = self.http.post("/v1/vector_stores", json=body)
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    def wait(self, store_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body: dict[str, Any] = self.http.get(f"/v1/vector_stores/{store_id}").json()
            if body["file_counts"]["in_progress"] == 0:
                return body
            time.sleep(0.1)
        raise AssertionError("ingestion did not finish")

    def search(self, store_id: str, **body: Any) -> httpx.Response:
        return self.http.post(f"/v1/vector_stores/{store_id}/search", json=body)


MAX_QUERY_ROWS = 16384  # Milvus's largest query window


def milvus_rows(var_dir: Path, uri: str | None = None) -> list[dict[str, Any]]:
    """Every chunk row in the service's Milvus: its Milvus Lite file (read after the service
    stopped), or the Milvus server at `uri`.

    One plain query, not an iterator: Milvus Lite's query iterator can page over the same rows
    twice (seen in CI: 105 rows for 83 ids, then 166 for 83), which says nothing of the data.
    """
    client = MilvusClient(uri or str(var_dir / "milvus.db"))
    try:
        client.load_collection("crucible_chunks")
        [count] = client.query(
            "crucible_chunks",
            filter="",
            output_fields=["count(*)"],
            consistency_level="Strong",
        )
        assert count["count(*)"] < MAX_QUERY_ROWS, "more rows than one query returns"
        rows: list[dict[str, Any]] = client.query(
            "crucible_chunks",
            filter="",
            output_fields=["id", "file_id", "vector_store_id"],
            limit=MAX_QUERY_ROWS,
            consistency_level="Strong",
        )
        assert len(rows) == count["count(*)"]
        return rows
    finally:
        client.close()


def expected_chunks(text: str) -> int:
    return len(chunk_text(load_tokenizer(packaged_model_dir()), text, resolve(None, 256)))


def pdf(text: str) -> bytes:
    """A minimal one-page PDF with `text` on it (offsets computed, so readers accept it)."""
    return pdf_page(f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode())


def pdf_page(stream: bytes, flate: bool = False) -> bytes:
    """A one-page PDF whose page is the content `stream` (compressed when `flate`)."""
    head = b"<< /Length %d >>"
    if flate:
        stream, head = zlib.compress(stream, 9), b"<< /Length %d /Filter /FlateDecode >>"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        head % len(stream) + b"\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


# 200,000 text operators in 6 KB: pypdf takes ~4.5 s to walk them here, twice the tests' 2 s cap
# (100,000 took 2.2 s, under 2 s on a fast day: the file then failed for its text instead).
SLOW_PDF = pdf_page(b"BT /F1 12 Tf 72 712 Td " + b"(ab) Tj 1 0 Td " * 200_000 + b"ET", True)
# 70 MB of content in 70 KB: inflated whole before a word is read.
BOMB_PDF = pdf_page(b"BT /F1 12 Tf 72 712 Td (x) Tj ET " + b" " * (70 << 20), True)


def parsing(pid: int) -> bool:
    """Whether the service `pid` has a parser process running."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for child in children:
        try:
            if "parseworker" in " ".join(child.cmdline()):
                return True
        except psutil.Error:  # ended meanwhile
            continue
    return False

"""The retrieval service through crashes and outages, each on its own var dir (real Milvus Lite,
in process and as its own process): killed mid-ingestion, killed while a file's parse runs,
Milvus gone and back. Ingestion must end exact: no lost, duplicated or stray chunks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pymilvus import DataType, MilvusClient

from services import milvuslite
from services.retrieval.vectors import VectorIndex
from services.stackconfig import _free_port
from tests.integration.retrieval_support import (
    CORPUS,
    SLOW_PDF,
    Client,
    expected_chunks,
    milvus_rows,
    parsing,
)
from tests.processes import metric, milvus_lite, retrieval


def test_adding_a_file_twice_and_removing_it_keep_milvus_exact(tmp_path: Path) -> None:
    var = tmp_path / "var"
    text = (CORPUS / "benzene.md").read_text()
    with retrieval(var) as p:
        c = Client(p.url, "carol")
        file_id = c.file_id("benzene.md", text.encode())
        keep = c.file_id("caffeine.md", (CORPUS / "caffeine.md").read_bytes())
        store = c.store(file_ids=[file_id, keep])
        c.wait(store)
        again = c.http.post(f"/v1/vector_stores/{store}/files", json={"file_id": file_id})
        assert again.status_code == 200 and again.json()["status"] == "completed"
        c.wait(store)
        texts = [
            h["content"][0]["text"]
            for h in c.search(store, query="benzene", max_num_results=50).json()["data"]
        ]
        assert len(texts) == len(set(texts))  # no chunk twice
        assert c.http.delete(f"/v1/vector_stores/{store}/files/{keep}").json()["deleted"]
        found = c.search(store, query="caffeine half-life", max_num_results=50).json()["data"]
        assert keep not in {h["file_id"] for h in found}
    rows = milvus_rows(var)
    assert {r["file_id"] for r in rows} == {file_id}
    assert len(rows) == len({r["id"] for r in rows}) == expected_chunks(text)


@pytest.mark.parametrize("milvus", ["in-process", "own process"])
def test_a_crash_mid_ingestion_then_a_retry_ends_with_exactly_the_right_chunks(
    tmp_path: Path, milvus: str
) -> None:
    """In-process, the crash takes Milvus Lite down with the service (its recovery is tested);
    as its own process (`make up`, and Milvus standalone in compose) Milvus lives on."""
    var = tmp_path / "var"
    names = ["aspirin.md", "benzene.md", "polymers.md", "catalysis.md"]
    # Long files, so the kill lands while chunks are being written.
    texts = {n: "\n\n".join([(CORPUS / n).read_text()] * 12) for n in names}
    with contextlib.ExitStack() as stack:
        uri = None
        if milvus == "own process":
            uri = stack.enter_context(milvus_lite(var)).url
        wiring = {"milvus_uri": uri} if uri else {}
        with retrieval(var, ingest_concurrency=1, **wiring) as p:
            c = Client(p.url, "dave")
            ids = {n: c.file_id(n, t.encode()) for n, t in texts.items()}
            store = c.store(file_ids=list(ids.values()))
            deadline = time.monotonic() + 60
            while metric(p.url, "crucible_retrieval_ingested_chunks_total") < 1:
                assert time.monotonic() < deadline, "ingestion never started"
                time.sleep(0.02)
            assert metric(p.url, "crucible_retrieval_ingesting_files") >= 1
            os.killpg(p.popen.pid, signal.SIGKILL)  # a crash, not a shutdown
            p.popen.wait(10)
        with retrieval(var, **wiring) as p:  # the restart resumes what was in progress
            c = Client(p.url, "dave")
            for file_id in ids.values():  # and the user retries: adding again changes nothing
                r = c.http.post(f"/v1/vector_stores/{store}/files", json={"file_id": file_id})
                assert r.status_code == 200
            body = c.wait(store)
            assert body["file_counts"]["completed"] == len(names)
            # A clean shutdown this time. (After a second SIGKILL, in-process Milvus Lite's
            # recovery showed upserted rows twice to a fresh reader: its own issue.)
            p.stop(graceful=True)
        rows = milvus_rows(var, uri)
    assert len(rows) == len({r["id"] for r in rows})  # no duplicates
    for name, file_id in ids.items():
        held = sum(1 for r in rows if r["file_id"] == file_id)
        assert held == expected_chunks(texts[name]), name


def test_a_file_that_takes_the_service_down_is_tried_three_times_then_fails(
    tmp_path: Path,
) -> None:
    """A document that kills the service while it is being ingested (here: the service is killed
    each time its ingestion is under way) must not crash-loop it: three tries, then `failed`."""
    var = tmp_path / "var"
    settings = {"parse_timeout_s": 60.0}
    store = file_id = ""
    for attempt in range(3):
        with retrieval(var, **settings) as p:
            c = Client(p.url, "frank")
            if not store:
                file_id = c.file_id("slow.pdf", SLOW_PDF)
                store = c.store(file_ids=[file_id])
            deadline = time.monotonic() + 30
            while not parsing(p.popen.pid):  # its parse is under way
                assert time.monotonic() < deadline, f"try {attempt + 1} never started"
                time.sleep(0.02)
            os.killpg(p.popen.pid, signal.SIGKILL)
            p.popen.wait(10)
    with retrieval(var, **settings) as p:
        c = Client(p.url, "frank")
        body = c.wait(store, timeout=10)  # not a fourth 7-second parse, and no crash loop
        assert body["file_counts"] == {**body["file_counts"], "failed": 1, "in_progress": 0}
        vs_file = c.http.get(f"/v1/vector_stores/{store}/files/{file_id}").json()
        assert vs_file["status"] == "failed"
        assert "3 times" in vs_file["last_error"]["message"], vs_file
        # And the service goes on ingesting other files.
        good = c.file_id("good.md", b"Ibuprofen is a nonsteroidal anti-inflammatory drug.")
        assert c.http.post(f"/v1/vector_stores/{store}/files", json={"file_id": good}).is_success
        assert c.wait(store)["file_counts"]["completed"] == 1


def test_milvus_going_away_is_a_503_and_its_return_heals(tmp_path: Path) -> None:
    var = tmp_path / "var"
    port = _free_port()
    with milvus_lite(var, port) as milvus, retrieval(var, milvus_uri=milvus.url) as p:
        c = Client(p.url, "erin")
        store = c.store(file_ids=[c.file_id("caffeine.md", (CORPUS / "caffeine.md").read_bytes())])
        c.wait(store)
        before = c.search(store, query="caffeine half-life").json()["data"]
        assert before
        milvus.stop()  # killed
        r = c.search(store, query="caffeine half-life")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(f"{p.url}/ready").status_code == 503
        with milvus_lite(var, port):  # back, on its data
            deadline = time.monotonic() + 30
            while (r := c.search(store, query="caffeine half-life")).status_code != 200:
                assert time.monotonic() < deadline, r.text
                time.sleep(0.5)
            after = r.json()["data"]
            # The same chunks in the same order; the scores may move in the third decimal if
            # the 8-bit query model finished loading in between (fp32 serves until then).
            assert [(d["file_id"], d["content"]) for d in after] == [
                (d["file_id"], d["content"]) for d in before
            ]
            for a, b in zip(after, before, strict=True):
                assert a["score"] == pytest.approx(b["score"], abs=0.01)
            assert httpx.get(f"{p.url}/ready").status_code == 200


def test_the_readiness_ping_does_not_queue_behind_a_long_milvus_call(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    index = VectorIndex(str(tmp_path / "milvus.db"), None, "crucible_chunks", 384)
    try:
        index.ensure()
        index.ping()  # Milvus answers
        with ThreadPoolExecutor(1) as pool, index._lock:  # a flush or count in progress
            started = time.monotonic()
            pool.submit(index.ping, 0.3).result(timeout=5)  # /ready's check: not stuck
            assert time.monotonic() - started < 2
    finally:
        index.close()


def test_ingestion_waits_out_a_milvus_outage_and_completes_exactly(tmp_path: Path) -> None:
    var = tmp_path / "var"
    port = _free_port()
    text = "\n\n".join([(CORPUS / "caffeine.md").read_text()] * 3)
    with (
        milvus_lite(var, port) as milvus,
        retrieval(var, milvus_uri=milvus.url, milvus_timeout_seconds=3) as p,
    ):
        c = Client(p.url, "frank")
        file_id = c.file_id("caffeine.md", text.encode())
        milvus.stop()  # killed, before the file is added
        store = c.store(file_ids=[file_id])
        deadline = time.monotonic() + 60
        while metric(p.url, "crucible_retrieval_ingestion_retries_total") < 1:
            assert time.monotonic() < deadline, "ingestion never met the outage"
            time.sleep(0.2)
        f = c.http.get(f"/v1/vector_stores/{store}/files/{file_id}").json()
        assert (f["status"], f["last_error"]) == ("in_progress", None)
        with milvus_lite(var, port):  # back, on its data: the file completes by itself
            body = c.wait(store, timeout=90)
            assert body["file_counts"]["completed"] == 1, body
            hits = c.search(store, query="caffeine half-life").json()["data"]
            assert hits and hits[0]["file_id"] == file_id
            rows = milvus_rows(var, f"http://127.0.0.1:{port}")
    assert len(rows) == len({r["id"] for r in rows}) == expected_chunks(text)


def _old_collection(uri: str) -> None:
    """The collection as the service made it before chunks carried their file's attributes."""
    client = MilvusClient(uri, timeout=10)
    client.drop_collection("crucible_chunks")
    schema = client.create_schema(auto_id=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=32)
    for name in ("owner", "vector_store_id", "file_id"):
        schema.add_field(name, DataType.VARCHAR, max_length=128)
    schema.add_field("position", DataType.INT64)
    schema.add_field("text", DataType.VARCHAR, max_length=65535)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=384)
    index = client.prepare_index_params()
    index.add_index("dense", index_type="FLAT", metric_type="IP")
    client.create_collection("crucible_chunks", schema=schema, index_params=index)
    client.close()


@pytest.mark.parametrize("milvus_now", ["empty", "older schema"])
def test_a_milvus_without_the_collection_is_filled_again_from_the_files(
    tmp_path: Path, milvus_now: str
) -> None:
    """Another engine (Milvus Lite 3's data does not carry over to the C++ engine's), a lost
    volume, a new Milvus standalone, or a collection of an older schema: the catalog is the
    ledger, and every file it holds as ingested is ingested again when the service starts."""
    var = tmp_path / "var"
    names = ["caffeine.md", "benzene.md"]
    with milvus_lite(var / "first") as milvus, retrieval(var, milvus_uri=milvus.url) as p:
        c = Client(p.url, "grace")
        ids = {n: c.file_id(n, (CORPUS / n).read_bytes()) for n in names}
        store = c.store(file_ids=list(ids.values()))
        assert c.wait(store)["file_counts"]["completed"] == 2
    with milvus_lite(var / ("second" if milvus_now == "empty" else "first")) as milvus:
        if milvus_now == "older schema":
            _old_collection(milvus.url)
        else:
            empty = MilvusClient(milvus.url, timeout=10)
            assert empty.list_collections() == []
            empty.close()
        with retrieval(var, milvus_uri=milvus.url) as p:
            c = Client(p.url, "grace")
            body = c.wait(store, timeout=90)
            assert body["file_counts"]["completed"] == 2, body
            hits = c.search(store, query="caffeine half-life").json()["data"]
            assert hits and hits[0]["file_id"] == ids["caffeine.md"]
            rows = milvus_rows(var, milvus.url)
    for name, file_id in ids.items():
        held = [r for r in rows if r["file_id"] == file_id]
        assert len(held) == expected_chunks((CORPUS / name).read_text()), name
    assert len(rows) == len({r["id"] for r in rows})


def test_a_second_milvus_server_on_the_same_database_is_refused(tmp_path: Path) -> None:
    """Two C++ engine servers writing one SQLite file would corrupt it: the second one exits
    at once, saying why, and the first goes on answering."""
    assert milvuslite.engine_binary(), "make setup installs the C++ engine in .milvus/"
    var = tmp_path / "var"
    with milvus_lite(var) as first:
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.milvuslite",
                "--data-dir",
                str(milvuslite.database(var)),
                "--port",
                str(_free_port()),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode != 0
        assert "in use by another Milvus server" in second.stderr
        client = MilvusClient(first.url, timeout=10)
        assert client.list_collections() == []
        client.close()

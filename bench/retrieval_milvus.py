"""The raw Milvus Lite side of `bench/retrieval.py`: the 100k-chunk collections it searches,
plain pymilvus searches (the baseline the service is measured against), recall against an exact
scan, and Milvus Lite's server as `make up` runs it."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from services import milvuslite
from services.retrieval.filters import encode_attributes
from services.retrieval.vectors import VectorIndex
from services.stackconfig import ROOT, _free_port, _port_busy

DATA = ROOT / "bench" / "data"
CORPUS = sorted((DATA / "chemistry").glob("*.md"))
OWNER = "bench"


def chunk_vectors(n: int) -> np.ndarray:
    """The same random unit vectors in every process that asks (fixed seed)."""
    vectors = np.random.default_rng(0).standard_normal((n, 384)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# Dense index and metric per collection: the service's default (FLAT, inner product on unit
# vectors), HNSW, and FLAT with COSINE (what collections made before 2026-11-27 use).
INDEXES: dict[str, tuple[Literal["FLAT", "HNSW"], Literal["IP", "COSINE"]]] = {
    "FLAT": ("FLAT", "IP"),
    "HNSW": ("HNSW", "IP"),
    "FLAT-COSINE": ("FLAT", "COSINE"),
}


def collection_name(kind: str) -> str:
    return "bench_" + kind.lower().replace("-", "_")


def build_collection(var: Path, n: int, kind: str, store_id: str) -> None:
    rng = np.random.default_rng(1)
    words = " ".join(p.read_text() for p in CORPUS).split()
    vectors = chunk_vectors(n)
    index_type, metric = INDEXES[kind]
    index = VectorIndex(
        str(var / "milvus.db"), None, collection_name(kind), 384, index_type, metric=metric
    )
    index.ensure()
    for start in range(0, n, 2000):
        index.upsert(chunk_rows(vectors, start, min(n, start + 2000), [store_id], rng, words))
    index.close()


def file_attributes(f: int) -> dict[str, Any]:
    """File `f`'s attributes: half the files in each group, 25 years."""
    return {"group": "ab"[f % 2], "year": 2000 + f % 25}


def chunk_rows(
    vectors: np.ndarray,
    start: int,
    stop: int,
    stores: list[str],
    rng: np.random.Generator,
    words: list[str],
    files: int = 100,
) -> list[dict[str, Any]]:
    """Rows `start`..`stop` as ingestion writes them: 40 corpus words of text each, spread
    over `stores` and `files` files, each with its file's attributes."""
    return [
        {
            "id": f"{i:032x}",
            "owner": OWNER,
            "vector_store_id": stores[i % len(stores)],
            "file_id": f"file-{i % files:024x}",
            "position": i,
            "text": " ".join(rng.choice(words, 40)),
            "dense": vectors[i].tolist(),
            "attributes": encode_attributes(file_attributes(i % files)),
        }
        for i in range(start, stop)
    ]


def raw_search(
    client: Any, collection: str, expr: str, v: np.ndarray, text: str, mode: str
) -> None:
    """One plain pymilvus call, the same scope expression and output fields as the service."""
    from pymilvus import AnnSearchRequest, RRFRanker

    fields = ["vector_store_id", "file_id", "position", "text", "dense"]
    if mode == "dense":
        client.search(
            collection,
            data=[v.tolist()],
            anns_field="dense",
            limit=10,
            filter=expr,
            output_fields=fields,
        )
        return
    reqs = [
        AnnSearchRequest(data=[v.tolist()], anns_field="dense", param={}, limit=40, expr=expr),
        AnnSearchRequest(data=[text], anns_field="sparse", param={}, limit=40, expr=expr),
    ]
    client.hybrid_search(collection, reqs, RRFRanker(60), limit=10, output_fields=fields)


def release_others(uri: str, keep: str) -> None:
    """Only the collection searched stays loaded, as on a server holding the service's one."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri)
    try:
        for name in client.list_collections():
            if name != keep:
                client.release_collection(name)
    finally:
        client.close()


def recall_and_latency(
    uri: str, collection: str, n: int, qvecs: np.ndarray
) -> tuple[float, list[float], float]:
    """Recall@10 against an exact numpy scan, each search's seconds, the numpy scan's seconds."""
    from pymilvus import MilvusClient

    vectors = chunk_vectors(n)
    client = MilvusClient(uri)
    client.load_collection(collection)
    recalls, times = [], []
    try:
        for v in qvecs:
            exact = set(np.argsort(-(vectors @ v))[:10].tolist())
            t = time.perf_counter()
            res = client.search(
                collection,
                data=[v.tolist()],
                anns_field="dense",
                limit=10,
                search_params={"params": {"ef": 64}},
            )
            times.append(time.perf_counter() - t)
            got = {int(h["id"], 16) for h in res[0]}
            recalls.append(len(got & exact) / 10)
    finally:
        client.close()
    t = time.perf_counter()
    for v in qvecs:
        np.argsort(-(vectors @ v))[:10]
    numpy_s = (time.perf_counter() - t) / len(qvecs)
    return round(float(np.mean(recalls)), 4), times, numpy_s


@contextmanager
def milvus_server(var: Path, *options: str) -> Iterator[str]:
    """Milvus Lite 3's server on the bench's data, as `make up` runs it where the C++ engine is
    not installed (services/milvuslite.py), with `options` added to its command line."""
    port = _free_port()
    with open(var / "milvus.log", "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.milvuslite",
                "--data-dir",
                str(var / "milvus.db"),
                "--engine",
                "lite3",
                "--port",
                str(port),
                *options,
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    with serving(proc, port, var / "milvus.log") as uri:
        yield uri


@contextmanager
def cpp_server(var: Path) -> Iterator[tuple[str, int]]:
    """milvus-lite 2.5.1's server (the C++ engine `make setup` unpacks into `.milvus/`) on the
    bench's directory, as `make up` runs it: its URL, and its pid (the process becomes the
    binary)."""
    if milvuslite.engine_binary() is None:
        raise SystemExit("the C++ engine is not installed: run make setup")
    port = _free_port()
    argv = [sys.executable, "-m", "services.milvuslite", "--engine", "cpp"]
    argv += ["--data-dir", str(var / "milvus25.db"), "--port", str(port)]
    with open(var / "milvus25.log", "ab") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    with serving(proc, port, var / "milvus25.log") as uri:
        yield uri, proc.pid


@contextmanager
def serving(proc: subprocess.Popen[bytes], port: int, log: Path) -> Iterator[str]:
    """A Milvus server process's URL once its port answers (its log's tail if it never does);
    the process stopped on the way out."""
    try:
        deadline = time.monotonic() + 60
        while not _port_busy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log.read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)

"""Milvus Lite 3 (the embedded default today, a pure-Python engine) against milvus-lite 2.5.1
(the last release of the C++ engine) as the retrieval service uses them: each as a server
process of its own, written and searched through the service's own client
(services/retrieval/vectors.py, pymilvus 3).

    python bench/milvus_engines.py [--chunks 100000] [--rounds 3] [--queries 40]
                                   [--engines lite3,lite25] [--files 100]

milvus-lite 2.5.1's server binary is the one `make setup` unpacks into `.milvus/` (the native
stack's default, services/milvuslite.py). Both servers get the same rows (random unit 384-d
vectors, 40 words of the chemistry corpus each, two stores, `--files` files with attributes
`group` a/b and `year`, the service's FLAT index and inner product); they are built one after
the other, then both stay up and the searches alternate between them query by query (dense,
then hybrid: BM25 and dense with RRF, as the service searches), so the host's noise hits both
alike. Dense recall@10 is against an exact numpy scan.

With the C++ engine, a filter admitting half the files (`group == "a"`) is searched both ways,
alternating: as a list of the admitted file ids (how the service filtered before, after
evaluating the filter over every file's attributes, timed too) and as an expression over the
rows' attributes inside Milvus (filters.compile_filter). Writes bench/results/milvus_engines.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from pydantic import TypeAdapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import median, stop_on_sigterm, write_result
from bench.retrieval_milvus import (
    CORPUS,
    chunk_rows,
    chunk_vectors,
    cpp_server,
    file_attributes,
    milvus_server,
)
from services.retrieval.filters import Filter, compile_filter, matches
from services.retrieval.vectors import VectorIndex

OWNER, STORES = "bench", ["vs_bench_a", "vs_bench_b"]


@contextmanager
def lite3_server(var: Path) -> Iterator[tuple[str, int]]:
    with milvus_server(var) as uri:
        port = int(uri.rsplit(":", 1)[1])
        pid = next(
            c.pid
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
        )
        yield uri, pid


def build(uri: str, vectors: np.ndarray, files: int) -> float:
    """Rows per second written (upserts of 2,000, then a flush), through the service's client."""
    rng = np.random.default_rng(1)
    words = " ".join(p.read_text() for p in CORPUS).split()
    n = len(vectors)
    index = VectorIndex(uri, None, "bench_engines", 384, "FLAT", metric="IP")
    index.ensure()
    start = time.perf_counter()
    for first in range(0, n, 2000):
        index.upsert(chunk_rows(vectors, first, min(n, first + 2000), STORES, rng, words, files))
    index.flush()
    seconds = time.perf_counter() - start
    assert index.count(OWNER, STORES) == n
    index.close()
    return n / seconds


def filter_both_ways(index: VectorIndex, qvecs: np.ndarray, files: int, rounds: int) -> dict:
    """A filter admitting half the files, as a file-id list and inside Milvus, alternating."""
    f = TypeAdapter(Filter).validate_python({"type": "eq", "key": "group", "value": "a"})
    attrs = {f"file-{i:024x}": file_attributes(i) for i in range(files)}
    times: dict[str, list[float]] = {"file_list": [], "in_engine": [], "evaluate_files": []}
    same = []
    for r in range(rounds):
        for i, q in enumerate(qvecs):
            tops = {}
            for way in ("file_list", "in_engine") if (r + i) % 2 else ("in_engine", "file_list"):
                t = time.perf_counter()
                if way == "file_list":
                    admitted = [fid for fid, a in attrs.items() if matches(f, a)]
                    times["evaluate_files"].append(time.perf_counter() - t)
                    hits = index.search(q, "", OWNER, STORES, admitted, 10, False)
                else:
                    where = compile_filter(f)
                    assert isinstance(where, str)
                    hits = index.search(q, "", OWNER, STORES, None, 10, False, where=where)
                times[way].append(time.perf_counter() - t)
                tops[way] = [h.chunk_id for h in hits]
            same.append(tops["file_list"] == tops["in_engine"])
    out: dict[str, Any] = {k: pcts(v) for k, v in times.items()}
    out["admitted_files"] = sum(matches(f, a) for a in attrs.values())
    out["same_top10"] = round(sum(same) / len(same), 3)
    out["p50_ratio_list_over_engine"] = round(
        out["file_list"]["p50_ms"] / out["in_engine"]["p50_ms"], 2
    )
    return out


def pcts(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {
        "p50_ms": round(v[len(v) // 2] * 1000, 2),
        "p95_ms": round(v[min(len(v) - 1, int(len(v) * 0.95))] * 1000, 2),
        "n": len(v),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--queries", type=int, default=40)
    p.add_argument("--engines", default="lite3,lite25")
    p.add_argument("--files", type=int, default=100)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    rng = np.random.default_rng(2)
    qvecs = rng.standard_normal((args.queries, 384)).astype(np.float32)
    qvecs /= np.linalg.norm(qvecs, axis=1, keepdims=True)
    words = " ".join(p.read_text() for p in CORPUS).split()
    qtexts = [" ".join(rng.choice(words, 4)) for _ in range(args.queries)]
    vectors = chunk_vectors(args.chunks)
    exact = [set(np.argsort(-(vectors @ q))[:10].tolist()) for q in qvecs]
    servers_of = {"lite3": lite3_server, "lite25": cpp_server}
    engines = {e: servers_of[e] for e in args.engines.split(",")}
    result: dict[str, Any] = {"chunks": args.chunks, "rounds": args.rounds, "files": args.files}
    with tempfile.TemporaryDirectory(prefix="crucible-engines-") as tmp, ExitStack() as stack:
        servers = {}
        for name, server in engines.items():
            uri, pid = stack.enter_context(server(Path(tmp)))
            print(f"{name}: writing {args.chunks} rows ...", file=sys.stderr)
            servers[name] = (uri, pid, build(uri, vectors, args.files))
        del vectors
        indexes = {
            name: VectorIndex(uri, None, "bench_engines", 384, "FLAT", metric="IP")
            for name, (uri, _, _) in servers.items()
        }
        for index in indexes.values():
            index.ensure()
        times: dict[str, dict[str, list[float]]] = {e: {"dense": [], "hybrid": []} for e in engines}
        recalls: dict[str, list[float]] = {e: [] for e in engines}
        agree: list[float] = []
        for _ in range(args.rounds):
            for i, (q, text) in enumerate(zip(qvecs, qtexts, strict=True)):
                for mode in ("dense", "hybrid"):
                    tops = {}
                    for name, index in indexes.items():
                        t = time.perf_counter()
                        hits = index.search(q, text, OWNER, STORES, None, 10, mode == "hybrid")
                        times[name][mode].append(time.perf_counter() - t)
                        tops[name] = {int(h.chunk_id, 16) for h in hits}
                        if mode == "dense":
                            recalls[name].append(len(tops[name] & exact[i]) / 10)
                    if mode == "hybrid" and len(tops) == 2:
                        agree.append(len(tops["lite3"] & tops["lite25"]) / 10)
        if "lite25" in indexes:
            result["filter"] = filter_both_ways(indexes["lite25"], qvecs, args.files, args.rounds)
        for index in indexes.values():
            index.close()
        for name, (_, pid, rows_per_s) in servers.items():
            result[name] = {
                "insert_rows_per_s": round(rows_per_s),
                "dense": pcts(times[name]["dense"]),
                "hybrid": pcts(times[name]["hybrid"]),
                "dense_recall_at_10": round(float(np.mean(recalls[name])), 4),
                "server_rss_mib": round(psutil.Process(pid).memory_info().rss / 2**20),
            }
    if agree:
        result["hybrid_top10_agreement"] = round(median(agree), 3)
        for mode in ("dense", "hybrid"):
            result[f"{mode}_p50_ratio_lite3_over_lite25"] = round(
                result["lite3"][mode]["p50_ms"] / result["lite25"][mode]["p50_ms"], 2
            )
    print(f"wrote {write_result('milvus_engines', result, args.out)}")
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())

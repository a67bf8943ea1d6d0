"""Milvus Lite 3 (the embedded default today, a pure-Python engine) against milvus-lite 2.5.1
(the last release of the C++ engine) as the retrieval service uses them: each as a server
process of its own, written and searched through the service's own client
(services/retrieval/vectors.py, pymilvus 3).

    python bench/milvus_engines.py [--chunks 100000] [--rounds 3] [--queries 40]

milvus-lite 2.5.1 needs pymilvus 2.6, which the service's environment cannot hold beside
pymilvus 3: its server binary comes from a virtual environment of its own,
`var/venv-milvus25` (made on first run, ~20 s, from PyPI). Both servers get the same rows
(random unit 384-d vectors, 40 words of the chemistry corpus each, two stores, the service's
FLAT index and inner product); they are built one after the other, then both stay up and the
searches alternate between them query by query (dense, then hybrid: BM25 and dense with RRF, as
the service searches), so the host's noise hits both alike. Dense recall@10 is against an exact
numpy scan. Writes bench/results/milvus_engines.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import median, stop_on_sigterm, write_result
from bench.retrieval_milvus import CORPUS, chunk_vectors, milvus_server, serving
from services.retrieval.vectors import VectorIndex
from services.stackconfig import ROOT, _free_port

VENV = ROOT / "var" / "venv-milvus25"
OWNER, STORES = "bench", ["vs_bench_a", "vs_bench_b"]


def lite25_bin() -> Path:
    """The C++ engine's server binary, installing milvus-lite 2.5.1 first if needed."""
    found = sorted(VENV.glob("lib/python3*/site-packages/milvus_lite/lib/milvus"))
    if found:
        return found[0]
    print("installing milvus-lite 2.5.1 into var/venv-milvus25 ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "pip"), "install", "-q", "milvus-lite==2.5.1", "pymilvus==2.6.*"]
    subprocess.run(pip, check=True)
    return sorted(VENV.glob("lib/python3*/site-packages/milvus_lite/lib/milvus"))[0]


@contextmanager
def lite25_server(var: Path) -> Iterator[tuple[str, int]]:
    """milvus-lite 2.5.1's server on a TCP port (its Python wrapper would use a Unix socket)."""
    binary, port = lite25_bin(), _free_port()
    env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}
    with open(var / "milvus25.log", "ab") as log:
        proc = subprocess.Popen(
            [str(binary), str(var / "milvus25.db"), f"127.0.0.1:{port}", "ERROR"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    with serving(proc, port, var / "milvus25.log") as uri:
        yield uri, proc.pid


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


def build(uri: str, n: int) -> float:
    """Rows per second written (upserts of 2,000, then a flush), through the service's client."""
    rng = np.random.default_rng(1)
    words = " ".join(p.read_text() for p in CORPUS).split()
    vectors = chunk_vectors(n)
    index = VectorIndex(uri, None, "bench_engines", 384, "FLAT", metric="IP")
    index.ensure()
    start = time.perf_counter()
    for first in range(0, n, 2000):
        rows = [
            {
                "id": f"{i:032x}",
                "owner": OWNER,
                "vector_store_id": STORES[i % 2],
                "file_id": f"file-{i % 100:024x}",
                "position": i,
                "text": " ".join(rng.choice(words, 40)),
                "dense": vectors[i].tolist(),
            }
            for i in range(first, min(n, first + 2000))
        ]
        index.upsert(rows)
    index.flush()
    seconds = time.perf_counter() - start
    assert index.count(OWNER, STORES) == n
    index.close()
    return n / seconds


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
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    rng = np.random.default_rng(2)
    qvecs = rng.standard_normal((args.queries, 384)).astype(np.float32)
    qvecs /= np.linalg.norm(qvecs, axis=1, keepdims=True)
    words = " ".join(p.read_text() for p in CORPUS).split()
    qtexts = [" ".join(rng.choice(words, 4)) for _ in range(args.queries)]
    vectors = chunk_vectors(args.chunks)
    exact = [set(np.argsort(-(vectors @ q))[:10].tolist()) for q in qvecs]
    del vectors
    engines = {"lite3": lite3_server, "lite25": lite25_server}
    result: dict[str, Any] = {"chunks": args.chunks, "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="crucible-engines-") as tmp, ExitStack() as stack:
        servers = {}
        for name, server in engines.items():
            uri, pid = stack.enter_context(server(Path(tmp)))
            print(f"{name}: writing {args.chunks} rows ...", file=sys.stderr)
            servers[name] = (uri, pid, build(uri, args.chunks))
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
                    if mode == "hybrid":
                        agree.append(len(tops["lite3"] & tops["lite25"]) / 10)
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

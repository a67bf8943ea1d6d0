"""Milvus Lite's server with glibc's default allocator against the setting `make up` runs it
with (`keep_freed_memory` in services/milvuslite.py), side by side in one run.

    python bench/milvus_alloc.py [--chunks 100000] [--blocks 4] [--out FILE]

One collection of N chunks (random unit vectors, 40 corpus words each, as in
`bench/retrieval.py`), the 40 labelled queries. In blocks that alternate which goes first, a
fresh server of each kind loads the collection and answers every query dense and hybrid (the
service's search calls: same expression, limit and output fields); its resident memory is read
at the end of each block.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from pymilvus import MilvusClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import write_result
from bench.retrieval import QUERIES, in_child, ms, pct
from bench.retrieval_milvus import (
    OWNER,
    build_collection,
    collection_name,
    milvus_server,
    raw_search,
)
from services.retrieval.embedder import Embedder
from services.retrieval.vectors import _scope

STORE = "vs_" + "0" * 24
SERVERS = {"glibc_default": ("--plain-malloc",), "kept_heap": ()}


def summary(seconds: list[float]) -> dict[str, float]:
    return {
        **ms(seconds),
        "p99_ms": round(pct(seconds, 99) * 1000, 2),
        "sd_ms": round(float(np.std(seconds)) * 1000, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=100_000)
    p.add_argument("--blocks", type=int, default=4, help="servers of each kind, in turns")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    texts = [q["query"] for q in QUERIES]
    vectors = Embedder(backend="torch").encode(texts)
    collection = collection_name("FLAT")
    expr = _scope(OWNER, [STORE])
    times: dict[str, dict[str, list[float]]] = {k: {"dense": [], "hybrid": []} for k in SERVERS}
    rss: dict[str, list[int]] = {k: [] for k in SERVERS}
    with tempfile.TemporaryDirectory(prefix="crucible-bench-") as tmp:
        var = Path(tmp)
        print(f"building {args.chunks} chunks ...", file=sys.stderr)
        in_child(build_collection, var, args.chunks, "FLAT", STORE)
        for block in range(args.blocks):
            for kind in list(SERVERS) if block % 2 == 0 else list(SERVERS)[::-1]:
                with milvus_server(var, *SERVERS[kind]) as uri:
                    client = MilvusClient(uri)
                    client.load_collection(collection)
                    for i, (v, text) in enumerate(zip(vectors, texts, strict=True)):
                        for mode in ("dense", "hybrid"):
                            t = time.perf_counter()
                            raw_search(client, collection, expr, v, text, mode)
                            if i >= 2:  # the first searches of a server warm it up
                                times[kind][mode].append(time.perf_counter() - t)
                    client.close()
                    (server,) = (  # this server, not a stack's beside it
                        c
                        for c in psutil.Process().children()
                        if str(var / "milvus.db") in c.cmdline()
                    )
                    rss[kind].append(round(server.memory_info().rss / 2**20))
    result = {
        "chunks": args.chunks,
        "blocks": args.blocks,
        "search": {k: {m: summary(v) for m, v in modes.items()} for k, modes in times.items()},
        "server_rss_mib": rss,
    }
    for mode in ("dense", "hybrid"):
        plain, kept = result["search"]["glibc_default"][mode], result["search"]["kept_heap"][mode]
        result.setdefault("ratio_default_to_kept", {})[mode] = {
            q: round(plain[q] / kept[q], 2) for q in ("p50_ms", "p95_ms", "sd_ms")
        }
    path = write_result("milvus_alloc", result, args.out)
    print(result["search"], result["ratio_default_to_kept"], result["server_rss_mib"])
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

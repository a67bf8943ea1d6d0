"""Milvus Lite as a process of its own, the native stack's stand-in for Milvus standalone.

    python -m services.milvuslite --data-dir var/milvus.db --port 19530

Milvus Lite 3 is a pure-Python engine. Run inside the retrieval service it shares that process's
interpreter lock: its per-row loops (100k rows per search) stall the service's event loop, and a
crash of the service is a crash of the database. As its own process it is a server like the one
compose runs, which retrieval reaches by URL. SIGTERM (what `make down` sends) closes the database
cleanly, so a restart never replays its write-ahead log.

Its memory allocator is set for how Milvus Lite searches (`keep_freed_memory`): dense searches
at 100k chunks took p95 162 ms instead of 270 ms, with a third of the spread (BENCHMARKS.md,
`bench/milvus_alloc.py`). `--plain-malloc` runs it with glibc's defaults, for that comparison.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
from typing import NoReturn

# faiss's OpenMP threads spin while idle otherwise, taking a core from the services beside it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def keep_freed_memory() -> bool:
    """Large blocks from one heap that keeps freed memory for the next call (glibc only).

    A dense search copies every stored vector (100k x 384 floats: 150 MB) and frees the copy.
    glibc serves a block that large with a fresh mmap, which the kernel faults in and zeroes page
    by page, and unmaps it on free: every search paid for 150 MB of new memory. Here blocks come
    from one heap (gRPC's worker threads would otherwise each get an arena of their own, capped
    at 64 MiB), nothing is mmapped alone, and up to 1 GiB freed at the heap's top stays mapped:
    the next search reuses pages already in place. The cost is that the process keeps its peak
    footprint (~100 MiB more at 100k chunks). False where the C library has no `mallopt`
    (macOS): its allocator runs as it is."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's <malloc.h>
    return all(
        mallopt(option, value) == 1
        for option, value in ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 1 << 30))
    )


def _interrupt(*_: object) -> NoReturn:
    raise KeyboardInterrupt  # run_server's own clean shutdown path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=19530)
    p.add_argument("--plain-malloc", action="store_true", help="glibc's default allocator")
    args = p.parse_args(argv)
    if not args.plain_malloc:
        keep_freed_memory()  # before Milvus Lite's libraries load: set later, it gained nothing
    from milvus_lite.adapter.grpc.server import run_server

    # Calls it does not implement are logged by grpc at ERROR; pymilvus falls back on its own.
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGTERM, _interrupt)
    run_server(args.data_dir, host=args.host, port=args.port)


if __name__ == "__main__":
    main()

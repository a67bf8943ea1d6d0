"""Milvus as a process of its own, the native stack's stand-in for Milvus standalone.

    python -m services.milvuslite --data-dir var/milvus-2.5.db --port 19530 [--engine cpp|lite3]

Two engines. `cpp`, the default wherever setup could install it: the server binary of
milvus-lite 2.5.1, the last release of Milvus's C++ engine (knowhere's FLAT and IVF indexes,
BM25, JSON fields), which `scripts/setup.sh` unpacks into `.milvus/` (it cannot share `.venv`
with Milvus Lite 3: both are the `milvus-lite` package). At 100k chunks it searched 5.9x faster
than Milvus Lite 3 (dense p50 28 against 167 ms, hybrid 36 against 421 ms) in a third of the
memory (BENCHMARKS.md, "The engine"). This process becomes that binary (exec), with a lock on
its database file so that a second server on the same file fails at once instead of corrupting
it. Its data is one SQLite file: SIGTERM or SIGKILL lose nothing it acknowledged.

`lite3`, where there is no such build (setup says so): Milvus Lite 3, a pure-Python engine.
Run inside the retrieval service it shares that process's interpreter lock: its per-row loops
(100k rows per search) stall the service's event loop, and a crash of the service is a crash of
the database. As its own process it is a server like the one compose runs, which retrieval
reaches by URL. SIGTERM (what `make down` sends) closes the database cleanly, so a restart never
replays its write-ahead log. Its memory allocator is set for how Milvus Lite searches
(`keep_freed_memory`): dense searches at 100k chunks took p95 162 ms instead of 270 ms, with a
third of the spread (BENCHMARKS.md, `bench/milvus_alloc.py`). `--plain-malloc` runs it with
glibc's defaults, for that comparison.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import logging
import os
import signal
import sys
from pathlib import Path
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


ROOT = Path(__file__).resolve().parents[1]
ENGINE_LIB = ROOT / ".milvus" / "milvus_lite" / "lib"  # milvus-lite 2.5.1, unpacked by setup


def engine_binary() -> Path | None:
    """The C++ engine's server binary, or None where setup could not install it."""
    binary = ENGINE_LIB / "milvus"
    return binary if os.access(binary, os.X_OK) else None


def default_engine() -> str:
    return "cpp" if engine_binary() else "lite3"


def database(var_dir: Path, engine: str | None = None) -> Path:
    """Where an engine keeps its data under `var_dir`: the two formats differ (one SQLite
    file; a directory), so each has a name of its own. Moving from one to the other starts
    an empty Milvus, which retrieval fills again from its files (README, "Milvus")."""
    return var_dir / ("milvus-2.5.db" if (engine or default_engine()) == "cpp" else "milvus.db")


def server_argv(data: Path, host: str, port: int) -> list[str] | None:
    """The C++ engine's command line (what this process becomes), None if not installed."""
    binary = engine_binary()
    return [str(binary), str(data), f"{host}:{port}", "ERROR"] if binary else None


def exec_cpp(data: Path, host: str, port: int) -> NoReturn:
    """Become the C++ engine's server, holding a lock on its database while it runs."""
    argv = server_argv(data, host, port)
    if argv is None:
        sys.exit("the C++ engine is not installed (make setup puts it in .milvus/)")
    data.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(f"{data}.lock", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # kept across exec, freed at exit
    except OSError:
        sys.exit(f"{data} is in use by another Milvus server")
    os.set_inheritable(lock, True)
    libs = str(ENGINE_LIB)
    env = {**os.environ, "LD_LIBRARY_PATH": libs, "DYLD_LIBRARY_PATH": libs}
    os.execve(argv[0], argv, env)  # noqa: S606


def _interrupt(*_: object) -> NoReturn:
    raise KeyboardInterrupt  # run_server's own clean shutdown path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=19530)
    p.add_argument("--engine", choices=["cpp", "lite3"], default=None)
    p.add_argument("--plain-malloc", action="store_true", help="lite3: glibc's default allocator")
    args = p.parse_args(argv)
    if (args.engine or default_engine()) == "cpp":
        exec_cpp(Path(args.data_dir), args.host, args.port)
    if not args.plain_malloc:
        keep_freed_memory()  # before Milvus Lite's libraries load: set later, it gained nothing
    from milvus_lite.adapter.grpc.server import run_server

    # Calls it does not implement are logged by grpc at ERROR; pymilvus falls back on its own.
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGTERM, _interrupt)
    run_server(args.data_dir, host=args.host, port=args.port)


if __name__ == "__main__":
    main()

"""Milvus Lite as a process of its own, the native stack's stand-in for Milvus standalone.

    python -m services.milvuslite --data-dir var/milvus.db --port 19530

Milvus Lite 3 is a pure-Python engine. Run inside the retrieval service it shares that process's
interpreter lock: its per-row loops (100k rows per search) stall the service's event loop, and a
crash of the service is a crash of the database. As its own process it is a server like the one
compose runs, which retrieval reaches by URL. SIGTERM (what `make down` sends) closes the database
cleanly, so a restart never replays its write-ahead log.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from typing import NoReturn

# faiss's OpenMP threads spin while idle otherwise, taking a core from the services beside it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from milvus_lite.adapter.grpc.server import run_server


def _interrupt(*_: object) -> NoReturn:
    raise KeyboardInterrupt  # run_server's own clean shutdown path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=19530)
    args = p.parse_args(argv)
    # Calls it does not implement are logged by grpc at ERROR; pymilvus falls back on its own.
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGTERM, _interrupt)
    run_server(args.data_dir, host=args.host, port=args.port)


if __name__ == "__main__":
    main()

"""The per-request cost of key expiry and last-use tracking (#23), in process: resolving a cached
key as the gateway does now (`aresolve`: the cache, then the expiry check and noting the use)
beside the cache lookup alone (what resolving was before), in one run.

    .venv/bin/python bench/gateway_keys.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import write_result
from services.gateway.keys import KeyStore

CALLS = 100_000


async def per_call_us(fn: Any) -> float:
    start = time.perf_counter()
    for _ in range(CALLS):
        await fn()
    return (time.perf_counter() - start) / CALLS * 1e6


async def measure(store: KeyStore, secret: str) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {"lookup_only": [], "aresolve": []}
    await store.aresolve(secret, None)  # cached from here on
    for _ in range(7):  # interleaved, so drift hits both alike
        runs["lookup_only"].append(await per_call_us(lambda: store.alookup(secret)))
        runs["aresolve"].append(await per_call_us(lambda: store.aresolve(secret, None)))
    return runs


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        store = KeyStore(f"sqlite:///{Path(tmp) / 'gateway.db'}", cache_ttl=3600)
        secret, _ = store.create("bench", expires_at=int(time.time()) + 86_400)
        runs = asyncio.run(measure(store, secret))
        store.engine.dispose()
    medians = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    added = round(medians["aresolve"] - medians["lookup_only"], 3)
    print(f"per request, median of 7 x {CALLS:,}: {medians}; added {added} µs")
    write_result(
        "gateway_keys",
        {"calls": CALLS, "runs_us": runs, "median_us": medians, "added_us": added},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

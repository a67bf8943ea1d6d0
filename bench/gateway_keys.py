"""The per-request cost of key handling added by #23, in process: resolving a cached key as the
gateway does now (`aresolve`: the cache, then the expiry check and noting the use, then the
role's permission check), and an admin key acting in another project (`OpenAI-Project`), beside
the cache lookup alone (what resolving was before #23), in one run.

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
from services.gateway.roles import WRITE

CALLS = 100_000


async def per_call_us(fn: Any) -> float:
    start = time.perf_counter()
    for _ in range(CALLS):
        await fn()
    return (time.perf_counter() - start) / CALLS * 1e6


async def measure(store: KeyStore, secret: str, admin: str, other: str) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {"lookup_only": [], "aresolve": [], "admin_other_project": []}

    async def resolve() -> None:
        key = await store.aresolve(secret, None, None)
        assert key is not None and key.may(WRITE)

    async def elsewhere() -> None:
        key = await store.aresolve(admin, None, other)
        assert key is not None and key.owner == other and key.may(WRITE)

    await resolve()  # cached from here on
    await elsewhere()
    for _ in range(7):  # interleaved, so drift hits each alike
        runs["lookup_only"].append(await per_call_us(lambda: store.alookup(secret)))
        runs["aresolve"].append(await per_call_us(resolve))
        runs["admin_other_project"].append(await per_call_us(elsewhere))
    return runs


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        store = KeyStore(f"sqlite:///{Path(tmp) / 'gateway.db'}", cache_ttl=3600)
        secret, _ = store.create("bench", expires_at=int(time.time()) + 86_400)
        admin, _ = store.create("ops", admin=True)
        store.create("elsewhere")
        runs = asyncio.run(measure(store, secret, admin, "elsewhere"))
        store.engine.dispose()
    medians = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    added = round(medians["aresolve"] - medians["lookup_only"], 3)
    print(f"per request, median of 7 x {CALLS:,}: {medians}; added {added} µs for every key")
    write_result(
        "gateway_keys",
        {"calls": CALLS, "runs_us": runs, "median_us": medians, "added_us": added},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

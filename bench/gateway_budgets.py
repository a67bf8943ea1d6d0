"""The per-request cost of usage records and budgets (#24) on the gateway's hot path, in one run:

- `usage_record`: building a served request's usage record and handing it to the outbox, and
  counting its tokens and engine time per project and model for the Cost dashboard (every
  served request pays this; the outbox's sender writes to Redis off the request path);
- `budget_lookup`: finding the budgets of a key that has none, in a project that has none (every
  request pays this: the cached project table, a dict lookup);
- `engine_clock`: counting a request in and out of an engine's processor-sharing clock (the
  engine time attributed to it; every model request pays this);
- `reserve_settle`: reserving a budgeted request's worst case and settling it, two Lua scripts
  on a real Redis (only requests of budgeted keys or projects pay this), beside
- `redis_ping`: one PING on the same connection, the floor of any Redis round trip.

    .venv/bin/python bench/gateway_budgets.py [--redis redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry

from bench._load import write_result
from services.common.outbox import USAGE, Outbox
from services.common.upstream import Pool
from services.gateway.budgets import Budget, Budgets, Prices
from services.gateway.keys import KeyStore
from services.gateway.metrics import GatewayMetrics
from services.gateway.redisio import Redis
from services.gateway.routing import Backend
from services.gateway.usage import UsageRecorder

CALLS = 50_000
REDIS_CALLS = 2_000
ROUNDS = 7


async def per_call_us(fn: Any, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        await fn()
    return (time.perf_counter() - start) / calls * 1e6


async def measure(store: KeyStore, secret: str, redis_url: str) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {
        "usage_record": [],
        "budget_lookup": [],
        "engine_clock": [],
        "reserve_settle": [],
        "reserve_settle_tokens_and_usd": [],
        "redis_ping": [],
    }
    key = await store.aresolve(secret, None)
    assert key is not None
    outbox = Outbox(None, USAGE, CollectorRegistry(), buffer=10 * CALLS)
    recorder = UsageRecorder(outbox, GatewayMetrics(CollectorRegistry()))
    redis = Redis(redis_url, timeout=2.0)
    budgets = Budgets(redis, prices=Prices({"*": {"input": 0.15, "output": 0.6}}))
    owner = f"bench-{uuid.uuid4().hex[:8]}"
    budget = [Budget("key", owner, 10**15, "day")]
    both = [*budget, Budget("key", owner, 10**15, "day", "usd")]

    async def record() -> None:
        recorder.record(key, "completions", "crucible-dev", 120, 30, 0)

    async def lookup() -> None:
        assert not await store.budgets(key)

    engine = Backend("http://127.0.0.1:9", Pool("http://127.0.0.1:9"))

    async def clock() -> None:
        mark = engine.request_started()
        engine.request_done()
        assert engine.shared_s >= mark

    async def reserve_settle() -> None:
        held = await budgets.reserve(budget, 500, 100, "crucible-dev")
        assert held is not None
        await budgets.settle(held, (120, 30))

    async def reserve_settle_both() -> None:
        held = await budgets.reserve(both, 500, 100, "crucible-dev")
        assert held is not None
        await budgets.settle(held, (120, 30))

    async def ping() -> None:
        await redis.execute("PING")

    await lookup()  # the project table cached from here on
    try:
        for _ in range(ROUNDS):  # interleaved, so drift hits each alike
            runs["usage_record"].append(await per_call_us(record, CALLS))
            outbox._items.clear()
            runs["budget_lookup"].append(await per_call_us(lookup, CALLS))
            runs["engine_clock"].append(await per_call_us(clock, CALLS))
            runs["reserve_settle"].append(await per_call_us(reserve_settle, REDIS_CALLS))
            runs["reserve_settle_tokens_and_usd"].append(
                await per_call_us(reserve_settle_both, REDIS_CALLS)
            )
            runs["redis_ping"].append(await per_call_us(ping, REDIS_CALLS))
    finally:
        await redis.execute("DEL", *(b.counter()[0] for b in both))
        await redis.aclose()
    return runs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = KeyStore(f"sqlite:///{Path(tmp) / 'gateway.db'}", cache_ttl=3600)
        secret, _ = store.create("bench")
        runs = asyncio.run(measure(store, secret, args.redis))
        store.engine.dispose()
    medians = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    print(f"per request, median of {ROUNDS} rounds (µs): {medians}")
    write_result(
        "gateway_budgets",
        {"calls": CALLS, "redis_calls": REDIS_CALLS, "runs_us": runs, "median_us": medians},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The hot path's own clients against the maintained ones, interleaved: is their gain still there?

    python bench/clients.py [--rounds 6] [--requests 2000] [--concurrency 16] [--out FILE]

HTTP: `services/common/upstream.py`'s Pool against httpx.AsyncClient, each sending the gateway's
request (a POST of a small chat body) to one local upstream (the fake OpenAI server in a process
of its own) and reading the whole answer. Redis: `services/gateway/redisio.py` against redis-py's
asyncio client, each running the rate limiter's EVALSHA against a local redis-server. Each round
runs every client once, in alternating order; the figure is the client process's CPU time per
request (what the gateway pays), and wall time per request, as medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import write_result
from tests.processes import fake_upstream, redis_server

BODY = b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}'
Run = Callable[[], Awaitable[None]]


async def _measure(one: Run, requests: int, concurrency: int) -> tuple[float, float]:
    """CPU and wall microseconds per request over `requests` calls, `concurrency` at a time."""
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (
        (time.process_time() - cpu) / requests * 1e6,
        (time.perf_counter() - wall) / requests * 1e6,
    )


async def _http_clients(url: str) -> dict[str, tuple[Run, Callable[[], Awaitable[None]]]]:
    import httpx

    from services.common.upstream import Pool

    pool = Pool(url)
    headers = [(b"content-type", b"application/json")]

    async def ours() -> None:
        resp = await pool.request(
            b"POST", b"/v1/chat/completions", BODY, headers, connect_timeout=1
        )
        try:
            await resp.read()
        finally:
            resp.release()

    client = httpx.AsyncClient(base_url=url, timeout=10, limits=httpx.Limits(max_connections=64))

    async def maintained() -> None:
        r = await client.post(
            "/v1/chat/completions", content=BODY, headers={"content-type": "application/json"}
        )
        r.read()

    return {"ours": (ours, pool.aclose), "httpx": (maintained, client.aclose)}


async def _redis_clients(url: str) -> dict[str, tuple[Run, Callable[[], Awaitable[None]]]]:
    import redis.asyncio as redis_py

    from services.gateway.limits import _GCRA
    from services.gateway.redisio import Redis

    ours_client = Redis(url)
    await ours_client.execute("SCRIPT", "LOAD", _GCRA.source)
    maintained_client = redis_py.Redis.from_url(url)

    async def ours() -> None:
        await ours_client.execute("EVALSHA", _GCRA.sha, 1, "crucible:rpm:bench", 10**9, 1)

    async def maintained() -> None:
        await maintained_client.evalsha(_GCRA.sha, 1, "crucible:rpm:bench", 10**9, 1)

    return {
        "ours": (ours, ours_client.aclose),
        "redis-py": (maintained, maintained_client.aclose),
    }


async def _compare(
    clients: dict[str, tuple[Run, Callable[[], Awaitable[None]]]],
    rounds: int,
    requests: int,
    concurrency: int,
) -> dict[str, Any]:
    cpu: dict[str, list[float]] = {n: [] for n in clients}
    wall: dict[str, list[float]] = {n: [] for n in clients}
    names = list(clients)
    for name in names:  # warm up: connections, scripts, imports
        await _measure(clients[name][0], 200, concurrency)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            c, w = await _measure(clients[name][0], requests, concurrency)
            cpu[name].append(round(c, 1))
            wall[name].append(round(w, 1))
    for _, close in clients.values():
        await close()
    med = {n: statistics.median(v) for n, v in cpu.items()}
    ours, other = names
    return {
        "cpu_us_per_request": cpu,
        "wall_us_per_request": wall,
        "median_cpu_us": {n: round(v, 1) for n, v in med.items()},
        "median_wall_us": {n: round(statistics.median(v), 1) for n, v in wall.items()},
        f"cpu_ratio_{other}_over_ours": round(med[other] / med[ours], 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    shape = (args.rounds, args.requests, args.concurrency)
    with tempfile.TemporaryDirectory(prefix="crucible-bench-") as tmp:
        with fake_upstream(Path(tmp)) as upstream:
            http = asyncio.run(_run_http(upstream.url, *shape))
        with redis_server(Path(tmp) / "redis") as server:
            rds = asyncio.run(_run_redis(server.url + "/0", *shape))
    result = {
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "concurrency": args.concurrency,
        "http": http,
        "redis": rds,
    }
    path = write_result("clients", result, args.out)
    print("http  CPU µs/request (median):", http["median_cpu_us"])
    print("redis CPU µs/request (median):", rds["median_cpu_us"])
    print(f"wrote {path}", file=sys.stderr)
    return 0


async def _run_http(url: str, rounds: int, requests: int, concurrency: int) -> dict[str, Any]:
    return await _compare(await _http_clients(url), rounds, requests, concurrency)


async def _run_redis(url: str, rounds: int, requests: int, concurrency: int) -> dict[str, Any]:
    return await _compare(await _redis_clients(url), rounds, requests, concurrency)


if __name__ == "__main__":
    sys.exit(main())

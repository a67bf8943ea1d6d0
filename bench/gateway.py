"""The gateway's cost, measured side by side with its baseline in one run.

A. Against a fast fake upstream (tests/fakes/openai_server.py): latency added at a fixed rate
   (requests alternate between direct and through the gateway), and the saturation throughput
   of one gateway process.
B. Against the real dev vLLM: output tokens/s at concurrency 32 and streaming time to first
   token, direct versus through the gateway, runs interleaved.

    python bench/gateway.py [--rate 200] [--seconds 10] [--rounds 3] [--smoke]
    python bench/gateway.py --balancer     HAProxy's hop in front of two gateways (replicas)

It starts what it needs (fake upstream, gateways, the dev stack) on free ports and stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson
import redis

from bench._load import LoadResult, closed_loop, median, stop_on_sigterm, write_result
from services.common.outbox import ALIAS_OUTCOMES, CAPTURES
from services.common.upstream import Pool
from services.gateway.keys import KeyStore
from services.stack import Ports, Stack, StackConfig
from services.stackconfig import _free_port, _http_ok, _port_busy, balancer_config

ROOT = Path(__file__).resolve().parents[1]
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


async def _one(pool: Pool, body: bytes, headers: list[tuple[bytes, bytes]]) -> float:
    t0 = time.perf_counter()
    resp = await pool.request(b"POST", b"/v1/chat/completions", body, headers, connect_timeout=1)
    await resp.read()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}")
    return time.perf_counter() - t0


async def added_latency(
    direct: str, gateway: str, naive: str, key: str, rate: float, seconds: float
) -> dict[str, Any]:
    """Open loop at `rate` requests/s per target, the targets taking turns request by request:
    the upstream directly, through the gateway, through the gateway with `store: true` (the
    exchange handed to the capture outbox), through the gateway to a model alias (resolved,
    sticky per user, its outcome handed to the alias outbox), through the naive FastAPI + httpx
    proxy."""
    body = orjson.dumps(CHAT)
    stored = orjson.dumps({**CHAT, "store": True, "metadata": {"bench": "capture"}})
    aliased = orjson.dumps({**CHAT, "model": "bench-alias", "user": "researcher-1"})
    plain = [(b"content-type", b"application/json")]
    auth = [*plain, (b"authorization", f"Bearer {key}".encode())]
    pools = {
        "direct": Pool(direct),
        "gateway": Pool(gateway),
        "gateway_store": Pool(gateway),
        "gateway_alias": Pool(gateway),
        "naive_proxy": Pool(naive),
    }
    hdrs = {t: auth if t.startswith("gateway") else plain for t in pools}
    bodies = {t: body for t in pools} | {"gateway_store": stored, "gateway_alias": aliased}
    lat: dict[str, list[float]] = {t: [] for t in pools}
    targets = list(pools)
    n = int(rate * seconds)
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i in range(len(targets) * n):
        target = targets[i % len(targets)]
        await asyncio.sleep(max(0.0, start + i / (len(targets) * rate) - loop.time()))

        async def go(t: str = target) -> None:
            lat[t].append(await _one(pools[t], bodies[t], hdrs[t]))

        tasks.append(asyncio.create_task(go()))
    await asyncio.gather(*tasks)
    for p in pools.values():
        await p.aclose()
    out: dict[str, Any] = {}
    for t, values in lat.items():
        out[t] = {
            "p50_ms": round(pct(values, 0.5) * 1000, 3),
            "p99_ms": round(pct(values, 0.99) * 1000, 3),
            "n": len(values),
        }
    for prefix, via in (
        ("", "gateway"),
        ("naive_", "naive_proxy"),
        ("store_", "gateway_store"),
        ("alias_", "gateway_alias"),
    ):
        out[f"{prefix}added_p50_ms"] = round(out[via]["p50_ms"] - out["direct"]["p50_ms"], 3)
        out[f"{prefix}added_p99_ms"] = round(out[via]["p99_ms"] - out["direct"]["p99_ms"], 3)
    # What `store` adds on top of the gateway's own cost, the same requests interleaved.
    out["store_over_plain_p50_ms"] = round(out["store_added_p50_ms"] - out["added_p50_ms"], 3)
    out["alias_over_plain_p50_ms"] = round(out["alias_added_p50_ms"] - out["added_p50_ms"], 3)
    return out


async def in_turns(
    targets: dict[str, str], key: str, rate: float, seconds: float
) -> dict[str, float]:
    """Open loop at `rate` per target, the targets taking turns, each turn in a new random
    order (so that no target always follows the same one): each one's p50 in ms. `direct` is
    sent without a key."""
    body = orjson.dumps(CHAT)
    auth = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {key}".encode())]
    pools = {name: Pool(url) for name, url in targets.items()}
    lat: dict[str, list[float]] = {t: [] for t in pools}
    loop = asyncio.get_running_loop()
    start, n, tasks = loop.time(), int(rate * seconds), []
    shuffle, order = random.Random(7).shuffle, list(pools)
    for i in range(len(pools) * n):
        if i % len(pools) == 0:
            shuffle(order)
        target = order[i % len(pools)]
        await asyncio.sleep(max(0.0, start + i / (len(pools) * rate) - loop.time()))

        async def go(t: str = target) -> None:
            lat[t].append(await _one(pools[t], body, auth if t != "direct" else auth[:1]))

        tasks.append(asyncio.create_task(go()))
    await asyncio.gather(*tasks)
    for p in pools.values():
        await p.aclose()
    return {t: pct(v, 0.5) * 1000 for t, v in lat.items()}


async def traced_latency(
    targets: dict[str, str], key: str, rate: float, seconds: float
) -> dict[str, Any]:
    """In turns: the upstream directly (`direct`), a gateway with sampling off (it mints and
    passes on trace ids, records nothing), a second one the same (`sampling_off_again`: the A/A
    control, what two identical gateway processes differ by on this host) and one that records
    every request's span and exports it to the trace sink (`sampling_on`)."""
    p50 = await in_turns(targets, key, rate, seconds)
    return {
        "p50_ms": {t: round(v, 3) for t, v in p50.items()},
        "off_added_p50_ms": round(p50["sampling_off"] - p50["direct"], 3),
        "on_over_off_p50_ms": round(p50["sampling_on"] - p50["sampling_off"], 3),
        "aa_p50_ms": round(p50["sampling_off_again"] - p50["sampling_off"], 3),
    }


async def balanced_latency(
    targets: dict[str, str], key: str, rate: float, seconds: float
) -> dict[str, Any]:
    """In turns: the upstream directly, each of two gateway processes, and HAProxy in front of
    both (CRUCIBLE_REPLICAS=2's balancer, its configuration the stack's): the balancer's hop is
    what it adds over the mean of the two gateways it spreads requests over; the two gateways'
    difference is the A/A control."""
    p50 = await in_turns(targets, key, rate, seconds)
    both = (p50["gateway"] + p50["gateway_again"]) / 2
    return {
        "p50_ms": {t: round(v, 3) for t, v in p50.items()},
        "gateway_added_p50_ms": round(both - p50["direct"], 3),
        "balancer_hop_p50_ms": round(p50["balancer"] - both, 3),
        "aa_p50_ms": round(p50["gateway_again"] - p50["gateway"], 3),
    }


def span_cost(n: int, sink: str) -> dict[str, Any]:
    """The gateway's per-request tracing, alone and in-process: parse the caller's
    `traceparent`, start the server span, format the upstream's header, end the span, exactly
    as proxy.py does, with sampling off and on (its span handed to a `SpanPipe` whose child
    exports to the bench's trace sink), the two interleaved call by call. Reported: p50 and
    p99 in microseconds."""
    from services.common.spanexport import SpanPipe
    from services.gateway.spans import RequestTrace

    pipes = {"off": None, "on": SpanPipe("bench", sink)}
    headers = [
        (b"host", b"127.0.0.1:8080"),
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer sk-bench"),
        (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ]
    took: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(n):
        for mode, pipe in pipes.items():
            t0 = time.perf_counter_ns()
            traced = RequestTrace(pipe, "POST /v1/chat/completions", headers)
            traced.end(200, None, model="crucible-dev")
            took[mode].append(time.perf_counter_ns() - t0)
    if (on := pipes["on"]) is not None:
        on.close()
    return {
        mode: {"p50_us": round(pct(v, 0.5) / 1000, 2), "p99_us": round(pct(v, 0.99) / 1000, 2)}
        for mode, v in took.items()
    } | {"calls_each": n}


async def saturation(url: str, key: str | None, seconds: float, concurrency: int = 64) -> float:
    body = orjson.dumps(CHAT)
    headers = [(b"content-type", b"application/json")]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    pool = Pool(url)
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await _one(pool, body, headers)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rps = done / (time.perf_counter() - t0)
    await pool.aclose()
    return rps


async def ttft(url: str, key: str, model: str) -> float:
    body = orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
        }
    )
    pool = Pool(url)
    headers = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {key}".encode())]
    t0 = time.perf_counter()
    resp = await pool.request(b"POST", b"/v1/chat/completions", body, headers, connect_timeout=1)
    chunks = resp.iter_chunks()
    await anext(chunks)
    first = time.perf_counter() - t0
    async for _ in chunks:
        pass
    await pool.aclose()
    return first


def _spawn(
    argv: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(
            argv,
            env={**os.environ, **env},
            cwd=cwd,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _until(ready: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready")
        time.sleep(0.1)


def _spans_kept(db: Path) -> int:
    """The gateway's request spans the bench's trace sink received, once a batch (one leaves
    every half second) adds none (its background calls have spans too: not counted)."""
    query = "SELECT count(*) FROM spans WHERE service = 'gateway' AND name LIKE 'POST /v1/chat%'"
    with sqlite3.connect(db) as conn:
        count, last = -1, 0
        for _ in range(20):
            if count == last:
                break
            count = last
            time.sleep(1.5)
            last = conn.execute(query).fetchone()[0]
    return int(last)


def _bench_key(var_dir: Path) -> str:
    """A key whose limits are never reached, but still checked: every real key pays for the
    Redis reservation, so the measured path includes it."""
    store = KeyStore(f"sqlite:///{var_dir / 'gateway.db'}")
    try:
        return store.create("bench", rpm=1_000_000_000, max_concurrency=10_000)[0]
    finally:
        store.engine.dispose()


def part_a(args: argparse.Namespace, tmp: Path, redis_url: str) -> dict[str, Any]:
    # A Redis database of its own: the stored requests' outbox stream must not reach a running
    # stack's lifecycle store (it reads database 0). Emptied afterwards.
    redis_url = redis_url.rsplit("/", 1)[0] + "/13"
    fake_port, gw_port, naive_port = _free_port(), _free_port(), _free_port()
    traced_port, sink_port, again_port = _free_port(), _free_port(), _free_port()
    gateway_env = {
        "CRUCIBLE_VAR_DIR": str(tmp),
        "CRUCIBLE_GATEWAY_INFERENCE_URLS": f'["http://127.0.0.1:{fake_port}"]',
        "CRUCIBLE_GATEWAY_REDIS_URL": redis_url,
        # The fake serves the alias table too (`bench-alias`, the bench key's owner's).
        "CRUCIBLE_GATEWAY_FINETUNE_URL": f"http://127.0.0.1:{fake_port}",
    }
    procs = [
        _spawn(
            [sys.executable, "-m", "services.traces"],
            {"CRUCIBLE_VAR_DIR": str(tmp), "CRUCIBLE_TRACES_PORT": str(sink_port)},
            tmp / "traces.log",
        ),
        _spawn(
            [sys.executable, "-m", "services.gateway"],
            {
                **gateway_env,
                "CRUCIBLE_GATEWAY_PORT": str(traced_port),
                "CRUCIBLE_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
                "CRUCIBLE_TRACE_SAMPLE_RATIO": "1",
            },
            tmp / "gateway-traced.log",
        ),
        _spawn(
            [sys.executable, "-m", "tests.fakes.openai_server", "--port", str(fake_port)],
            {},
            tmp / "fake.log",
        ),
        _spawn(
            [sys.executable, "-m", "services.gateway"],
            {**gateway_env, "CRUCIBLE_GATEWAY_PORT": str(gw_port)},
            tmp / "gateway.log",
        ),
        _spawn(
            [sys.executable, "-m", "services.gateway"],
            {**gateway_env, "CRUCIBLE_GATEWAY_PORT": str(again_port)},
            tmp / "gateway-again.log",
        ),
        _spawn(
            [
                sys.executable,
                "bench/naive_proxy.py",
                "--port",
                str(naive_port),
                "--upstream",
                f"http://127.0.0.1:{fake_port}",
            ],
            {},
            tmp / "naive.log",
        ),
    ]
    try:
        _until(lambda: _http_ok(f"http://127.0.0.1:{gw_port}/ready"), "gateway")
        _until(lambda: _http_ok(f"http://127.0.0.1:{traced_port}/ready"), "traced gateway")
        _until(lambda: _http_ok(f"http://127.0.0.1:{again_port}/ready"), "second gateway")
        key = _bench_key(tmp)
        direct, gw = f"http://127.0.0.1:{fake_port}", f"http://127.0.0.1:{gw_port}"
        naive, traced = f"http://127.0.0.1:{naive_port}", f"http://127.0.0.1:{traced_port}"
        if args.balancer:
            return balancer(args, tmp, key, direct, [gw_port, again_port])
        _until(lambda: _port_busy(naive_port), "naive proxy")
        targets = {
            "direct": direct,
            "sampling_off": gw,
            "sampling_off_again": f"http://127.0.0.1:{again_port}",
            "sampling_on": traced,
        }
        asyncio.run(traced_latency(targets, key, args.rate, 1.0))  # warm up
        traced_rounds = [
            asyncio.run(traced_latency(targets, key, args.rate, args.seconds))
            for _ in range(args.rounds)
        ]
        tracing = {
            "rate_per_target": args.rate,
            "rounds": traced_rounds,
            "median_off_added_p50_ms": median([r["off_added_p50_ms"] for r in traced_rounds]),
            "median_on_over_off_p50_ms": median([r["on_over_off_p50_ms"] for r in traced_rounds]),
            "median_aa_p50_ms": median([r["aa_p50_ms"] for r in traced_rounds]),
            # What the traced gateway's exporter delivered (every request is sampled).
            "gateway_spans_in_sink": _spans_kept(tmp / "traces.db"),
            "requests_to_sampling_on": int(args.rate) + int(args.rate * args.seconds) * args.rounds,
            "span_cost": span_cost(200 if args.smoke else 50_000, f"http://127.0.0.1:{sink_port}"),
        }
        if args.tracing:
            return tracing
        asyncio.run(added_latency(direct, gw, naive, key, args.rate, 1.0))  # warm every path
        rounds = [
            asyncio.run(added_latency(direct, gw, naive, key, args.rate, args.seconds))
            for _ in range(args.rounds)
        ]
        sat_gw = [asyncio.run(saturation(gw, key, args.seconds / 2)) for _ in range(args.rounds)]
        sat_direct = [
            asyncio.run(saturation(direct, None, args.seconds / 2)) for _ in range(args.rounds)
        ]
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        redis.Redis.from_url(redis_url).delete(CAPTURES, ALIAS_OUTCOMES)
    return {
        "rate_per_target": args.rate,
        "seconds_per_round": args.seconds,
        "rounds": rounds,
        "median_added_p50_ms": median([r["added_p50_ms"] for r in rounds]),
        "median_added_p99_ms": median([r["added_p99_ms"] for r in rounds]),
        "naive_proxy_median_added_p50_ms": median([r["naive_added_p50_ms"] for r in rounds]),
        "naive_proxy_median_added_p99_ms": median([r["naive_added_p99_ms"] for r in rounds]),
        "store_median_added_p50_ms": median([r["store_added_p50_ms"] for r in rounds]),
        "store_median_over_plain_p50_ms": median([r["store_over_plain_p50_ms"] for r in rounds]),
        "alias_median_over_plain_p50_ms": median([r["alias_over_plain_p50_ms"] for r in rounds]),
        "tracing": tracing,
        "saturation_rps_gateway": [round(x) for x in sat_gw],
        "saturation_rps_direct_fake": [round(x) for x in sat_direct],
        "median_saturation_rps_gateway": round(median(sat_gw)),
    }


async def _mixed(
    direct: str, gw: str, payload: dict[str, Any], c: int, hdr: dict[str, str], per_worker: int
) -> tuple[LoadResult, LoadResult]:
    half = c // 2
    d, g = await asyncio.gather(
        closed_loop(direct, "/v1/completions", payload, half, half * per_worker),
        closed_loop(gw, "/v1/completions", payload, half, half * per_worker, headers=hdr),
    )
    return d, g


def part_b(args: argparse.Namespace, direct: str, gw: str, var_dir: Path) -> dict[str, Any]:
    key = _bench_key(var_dir)
    payload = {
        "model": "crucible-dev",
        "prompt": "The molecular weight of caffeine is",
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "temperature": 0,
    }
    c = args.concurrency
    hdr = {"authorization": f"Bearer {key}"}
    runs: dict[str, list[float]] = {"direct": [], "gateway": []}
    ratios: list[float] = []
    failures: dict[str, list[str]] = {"direct": [], "gateway": []}
    for _ in range(args.vllm_rounds):
        # Half the workers direct, half through the gateway, at the same time: both share one
        # engine batch and one machine state, so the host's noise hits both alike. A gateway that
        # slows its requests gets a smaller share of the engine's output.
        d, g = asyncio.run(_mixed(direct, gw, payload, c, hdr, args.requests_per_worker))
        failures["direct"] += d.error_kinds
        failures["gateway"] += g.error_kinds
        runs["direct"].append(round(d.tokens_per_s, 1))
        runs["gateway"].append(round(g.tokens_per_s, 1))
        ratios.append(g.tokens_per_s / d.tokens_per_s)
    ttfts: dict[str, list[float]] = {"direct": [], "gateway": []}
    for _ in range(args.ttft_samples):
        for name, url in (("direct", direct), ("gateway", gw)):
            ttfts[name].append(asyncio.run(ttft(url, key, "crucible-dev")))
    return {
        "concurrency": c,
        "max_tokens": args.max_tokens,
        "tokens_per_s": runs,
        "design": f"{c // 2} workers direct and {c // 2} through the gateway, concurrently",
        "failed_requests": failures,
        "ratio_per_run": [round(r, 3) for r in ratios],
        "median_ratio_gateway_over_direct": round(statistics.median(ratios), 3),
        "ttft_p50_ms": {k: round(pct(v, 0.5) * 1000, 2) for k, v in ttfts.items()},
        "ttft_added_p50_ms": round(
            (pct(ttfts["gateway"], 0.5) - pct(ttfts["direct"], 0.5)) * 1000, 2
        ),
    }


def balancer(
    args: argparse.Namespace, tmp: Path, key: str, direct: str, gateways: list[int]
) -> dict[str, Any]:
    """HAProxy, configured as the stack configures it, in front of two gateway processes."""
    lb_port = _free_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(balancer_config(lb_port, gateways))
    proc = _spawn(["haproxy", "-db", "-f", str(cfg)], {}, tmp / "haproxy.log")
    try:
        _until(lambda: _http_ok(f"http://127.0.0.1:{lb_port}/health"), "balancer")
        targets = {
            "direct": direct,
            "gateway": f"http://127.0.0.1:{gateways[0]}",
            "gateway_again": f"http://127.0.0.1:{gateways[1]}",
            "balancer": f"http://127.0.0.1:{lb_port}",
        }
        asyncio.run(balanced_latency(targets, key, args.rate, 1.0))  # warm up
        rounds = [
            asyncio.run(balanced_latency(targets, key, args.rate, args.seconds))
            for _ in range(args.rounds)
        ]
    finally:
        proc.terminate()
        proc.wait(10)
    return {
        "rate_per_target": args.rate,
        "seconds_per_round": args.seconds,
        "haproxy": subprocess.run(
            ["haproxy", "-v"], capture_output=True, text=True
        ).stdout.splitlines()[0],
        "rounds": rounds,
        "median_balancer_hop_p50_ms": median([r["balancer_hop_p50_ms"] for r in rounds]),
        "median_gateway_added_p50_ms": median([r["gateway_added_p50_ms"] for r in rounds]),
        "median_aa_p50_ms": median([r["aa_p50_ms"] for r in rounds]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=200)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--vllm-rounds", type=int, default=5)
    p.add_argument("--requests-per-worker", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ttft-samples", type=int, default=30)
    p.add_argument("--skip-vllm", action="store_true", help="part A only")
    p.add_argument(
        "--tracing", action="store_true", help="only the tracing comparison (gateway_tracing.json)"
    )
    p.add_argument(
        "--balancer",
        action="store_true",
        help="only HAProxy's hop in front of two gateways (gateway_balancer.json)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--out", type=Path)
    p.add_argument("--stack-var-dir", type=Path, help="use a running stack with this var dir")
    p.add_argument("--stack-ports", type=int, nargs=2, metavar=("INFERENCE", "GATEWAY"))
    args = p.parse_args(argv)
    if args.smoke:
        args.rate, args.seconds, args.rounds, args.concurrency = 50, 0.5, 1, 4
        args.max_tokens, args.ttft_samples, args.vllm_rounds = 4, 2, 1
        args.requests_per_worker = 1
    result: dict[str, Any] = {}
    if args.tracing or args.balancer:
        with tempfile.TemporaryDirectory() as d:
            result = part_a(args, Path(d), args.redis_url)
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        name = "gateway_tracing" if args.tracing else "gateway_balancer"
        print(f"wrote {write_result(name, result, args.out)}")
        return 0
    with tempfile.TemporaryDirectory() as d:
        result["fake_upstream"] = part_a(args, Path(d), args.redis_url)
        print(orjson.dumps(result["fake_upstream"], option=orjson.OPT_INDENT_2).decode())
    if args.stack_var_dir:  # a running stack (the test suite's): reuse it
        ports = args.stack_ports
        result["vllm"] = part_b(
            args, f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}", args.stack_var_dir
        )
    elif not args.skip_vllm:
        with tempfile.TemporaryDirectory() as d:
            stack = Stack(StackConfig(var_dir=Path(d), ports=Ports.free()))
            try:
                stack.up(echo=lambda _: None)
                own = stack.config.ports
                result["vllm"] = part_b(
                    args,
                    f"http://127.0.0.1:{own.inference}",
                    f"http://127.0.0.1:{own.gateway}",
                    stack.config.var_dir,
                )
            finally:
                stack.down()
    if "vllm" in result:
        print(orjson.dumps(result["vllm"], option=orjson.OPT_INDENT_2).decode())
    print(f"wrote {write_result('gateway', result, args.out)}")
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())

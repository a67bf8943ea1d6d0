"""The gateway's cost per streamed token at lab load, measured with vLLM's own load generator.

vLLM's `bench serve` (backend openai-chat, random prompts, `ignore_eos`, streamed) runs at each
concurrency in rounds: one run straight at the upstream and one through a gateway per relay
(`stream_relay`: direct, asgi), the order rotating round by round. Around each gateway run that
gateway process's CPU time is read from /proc (user + system), so the figure is CPU per
streamed token: stable run to run, unlike the throughput ratio, which on a shared CPU swings
with the host (it is reported per round, with whether the median falls in the direct runs'
range).

A. `fake`: gateways of their own in front of the fake upstream streaming one token every
   `--interval-ms` (tests/fakes/openai_server.py, model fake-paced): the gateway alone, without
   the engine's noise. The TPOT it adds is the latency the relay adds per event.
B. `vllm`: the dev stack's gateway (the default relay) in front of the real engine, CPU-bound
   here, so the gateway's CPU is taken from generation; a gateway per other relay runs beside
   it. `--stack-var-dir/--stack-ports` reuse a running stack.

    python bench/streaming.py [--concurrency 16 64 128] [--rounds 3] [--skip-vllm] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from bench._load import write_result
from bench.gateway import _bench_key, _spawn, _until
from services.common.outbox import CAPTURES
from services.gateway.config import GatewaySettings
from services.stack import Ports, Stack, StackConfig
from services.stackconfig import _free_port, _http_ok, _port_busy

ROOT = Path(__file__).resolve().parents[1]
ENGINE_PY = ROOT / ".venv-vllm" / "bin" / "python"
TOKENIZER = ROOT / "var" / "models" / "crucible-dev"


# The same gateway run again for another kind of client, interleaved with the plain runs:
# `no-usage` did not ask for the usage event (the gateway asks the engine and strips it);
# `store` stores its completions (the gateway hands each stream to the capture outbox).
VARIANTS = {
    "no-usage": json.dumps({"stream_options": {"include_usage": False}}),
    "store": json.dumps({"store": True, "metadata": {"bench": "streaming"}}),
}


def plan_runs(
    args: argparse.Namespace, model: str, direct: str, gateways: dict[str, tuple[str, int]]
) -> dict[str, Any]:
    """Rounds of one run straight at the upstream and one through each gateway (`gateways`:
    label -> (url, pid)), the order rotating round by round."""
    common = [
        "--backend",
        "openai-chat",
        "--endpoint",
        "/v1/chat/completions",
        "--model",
        model,
        "--tokenizer",
        str(args.tokenizer),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--ignore-eos",
        "--ready-check-timeout-sec",
        "0",
        "--disable-tqdm",
        "--percentile-metrics",
        "ttft,tpot,itl",
        "--metric-percentiles",
        "50,99",
    ]
    runs = []
    for c in args.concurrency:
        prompts = args.prompts or max(256, 4 * c)
        sizes = ["--max-concurrency", str(c), "--num-prompts", str(prompts)]
        for i in range(args.rounds):
            round_: list[dict[str, Any]] = [
                {"label": f"direct c={c}", "base_url": direct, "args": sizes}
            ]
            for label, (url, pid) in gateways.items():
                round_.append(
                    {"label": f"{label} c={c}", "base_url": url, "args": sizes, "cpu_pid": pid}
                )
                for variant in args.variants if label.startswith("gateway-") else []:
                    round_.append(
                        {
                            "label": f"{label}/{variant} c={c}",
                            "base_url": url,
                            "args": [*sizes, "--extra-body", VARIANTS[variant]],
                            "cpu_pid": pid,
                        }
                    )
            k = i % len(round_)
            runs += round_[k:] + round_[:k]
    return {"common": common, "runs": runs}


def _labels(args: argparse.Namespace, gateways: dict[str, tuple[str, int]]) -> list[str]:
    extra = [f"{g}/{v}" for g in gateways if g.startswith("gateway-") for v in args.variants]
    return [*gateways, *extra]


def run_plan(plan: dict[str, Any], key: str, tmp: Path) -> list[dict[str, Any]]:
    (tmp / "plan.json").write_text(json.dumps(plan))
    out = tmp / "runs.json"
    subprocess.run(
        [str(ENGINE_PY), str(ROOT / "bench" / "_vllm_serve.py"), str(tmp / "plan.json"), str(out)],
        env={**os.environ, "OPENAI_API_KEY": key},
        check=True,
    )
    runs: list[dict[str, Any]] = json.loads(out.read_text())
    return runs


def summarise(
    runs: list[dict[str, Any]], concurrency: list[int], gateways: list[str], output_len: int
) -> list[dict[str, Any]]:
    levels = []
    for c in concurrency:
        direct = [r for r in runs if r["label"] == f"direct c={c}"]
        d_tput = [r["output_throughput"] for r in direct]
        level: dict[str, Any] = {
            "concurrency": c,
            "requests_per_run": direct[0]["completed"] + direct[0]["failed"],
            "direct": {
                "failed": sum(r["failed"] for r in direct),
                "tpot_p50_ms": _med(direct, "median_tpot_ms"),
                "tpot_p99_ms": _med(direct, "p99_tpot_ms"),
                "ttft_p50_ms": _med(direct, "median_ttft_ms"),
                "ttft_p99_ms": _med(direct, "p99_ttft_ms"),
                "output_tok_s": [round(x) for x in d_tput],
            },
        }
        for label in gateways:
            gw = [r for r in runs if r["label"] == f"{label} c={c}"]
            # Tokens as sent: every request runs to output_len (ignore_eos); a client without
            # usage has only its tokenizer's count of the text, which is not the engine's.
            tokens = [r["completed"] * output_len for r in gw]
            cpu_us = [r["cpu_ns"] / 1000 / max(1, t) for r, t in zip(gw, tokens, strict=True)]
            g_tput = [r["output_throughput"] for r in gw]
            ratios = [g / d for g, d in zip(g_tput, d_tput, strict=True)]
            added = [
                g["median_tpot_ms"] - d["median_tpot_ms"] for g, d in zip(gw, direct, strict=True)
            ]
            level[label] = {
                "failed": sum(r["failed"] for r in gw),
                "cpu_us_per_token": [round(x, 1) for x in cpu_us],
                "median_cpu_us_per_token": round(statistics.median(cpu_us), 1),
                "tpot_p50_ms": _med(gw, "median_tpot_ms"),
                "tpot_p99_ms": _med(gw, "p99_tpot_ms"),
                "ttft_p50_ms": _med(gw, "median_ttft_ms"),
                "ttft_p99_ms": _med(gw, "p99_ttft_ms"),
                "median_tpot_added_ms": round(statistics.median(added), 3),
                "output_tok_s": [round(x) for x in g_tput],
                "throughput_ratio_per_round": [round(x, 3) for x in ratios],
                "median_throughput_ratio": round(statistics.median(ratios), 3),
                "median_within_direct_range": min(d_tput)
                <= statistics.median(g_tput)
                <= max(d_tput),
            }
        levels.append(level)
    return levels


def _pipe(tmp: Path, upstream_port: int) -> tuple[Any, str]:
    """bench/tcp_pipe.py in front of the upstream: the floor a relay on this loop pays."""
    port = _free_port()
    argv = [sys.executable, str(ROOT / "bench" / "tcp_pipe.py"), "--port", str(port)]
    proc = _spawn([*argv, "--upstream-port", str(upstream_port)], {}, tmp / "tcp-pipe.log")
    _until(lambda: _port_busy(port), "tcp pipe")
    return proc, f"http://127.0.0.1:{port}"


def _med(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 2)


def _gateway(
    tmp: Path, name: str, upstream: str, relay: str, env: dict[str, str], code: Path = ROOT
) -> tuple[Any, str]:
    """A gateway process on a free port, running the code in `code` (a checkout)."""
    port = _free_port()
    proc = _spawn(
        [sys.executable, "-m", "services.gateway"],
        {
            "CRUCIBLE_GATEWAY_PORT": str(port),
            "CRUCIBLE_GATEWAY_INFERENCE_URLS": f'["{upstream}"]',
            "CRUCIBLE_GATEWAY_STREAM_RELAY": relay,
            **env,
        },
        tmp / f"{name}.log",
        cwd=code,
    )
    _until(lambda: _http_ok(f"http://127.0.0.1:{port}/ready"), name)
    return proc, f"http://127.0.0.1:{port}"


def _targets(
    args: argparse.Namespace,
    tmp: Path,
    upstream_port: int,
    env: dict[str, str],
    procs: list[Any],
    gateways: dict[str, tuple[str, int]],
) -> None:
    """Starts what `args` asks to compare beside `gateways` (label -> (url, pid)): a gateway per
    relay not there yet, the baseline checkout's gateway, the byte pipe. Adds each to `procs`."""
    upstream = f"http://127.0.0.1:{upstream_port}"
    wanted: list[tuple[str, Callable[[], tuple[Any, str]]]] = [
        (f"gateway-{r}", partial(_gateway, tmp, f"gateway-{r}", upstream, r, env))
        for r in args.relays
    ]
    if args.baseline:
        baseline = partial(_gateway, tmp, "baseline", upstream, "asgi", env, args.baseline)
        wanted.append(("gateway-baseline", baseline))
    if args.floor:
        wanted.append(("tcp-pipe", partial(_pipe, tmp, upstream_port)))
    for label, start in wanted:
        if label not in gateways:
            proc, url = start()
            procs.append(proc)
            gateways[label] = (url, proc.pid)


def part_fake(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    fake_port = _free_port()
    upstream = f"http://127.0.0.1:{fake_port}"
    argv = [sys.executable, "-m", "tests.fakes.openai_server", "--port", str(fake_port)]
    argv += ["--token-interval-ms", str(args.interval_ms)]
    procs: list[Any] = [_spawn(argv, {}, tmp / "fake.log")]
    # A Redis database of its own: stored streams must not reach a running stack's store.
    redis_url = args.redis_url.rsplit("/", 1)[0] + "/13"
    env = {"CRUCIBLE_VAR_DIR": str(tmp), "CRUCIBLE_GATEWAY_REDIS_URL": redis_url}
    gateways: dict[str, tuple[str, int]] = {}
    try:
        _targets(args, tmp, fake_port, env, procs, gateways)
        plan = plan_runs(args, "fake-paced", upstream, gateways)
        runs = run_plan(plan, _bench_key(tmp), tmp)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        redis.Redis.from_url(redis_url).delete(CAPTURES)
    levels = summarise(runs, args.concurrency, _labels(args, gateways), args.output_len)
    return {"token_interval_ms": args.interval_ms, "levels": levels, "runs": runs}


def part_vllm(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    """The stack's own gateway (the default relay) and, beside it, a gateway for each other
    relay on the same engine, key store and Redis."""
    pid = stack.pid("gateway")
    if pid is None:
        raise RuntimeError("the stack's gateway is not running")
    ports = stack.config.ports
    upstream = f"http://127.0.0.1:{ports.inference}"
    default = GatewaySettings.model_fields["stream_relay"].default
    gateways = {f"gateway-{default}": (f"http://127.0.0.1:{ports.gateway}", pid)}
    procs: list[Any] = []
    # The stack's key store (its var dir, absolute: a baseline runs from its own checkout).
    env = {
        "CRUCIBLE_VAR_DIR": str(stack.config.var_dir.resolve()),
        "CRUCIBLE_GATEWAY_REDIS_URL": args.redis_url,
    }
    with tempfile.TemporaryDirectory() as d:
        try:
            _targets(args, Path(d), ports.inference, env, procs, gateways)
            plan = plan_runs(args, "crucible-dev", upstream, gateways)
            runs = run_plan(plan, _bench_key(stack.config.var_dir), Path(d))
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    levels = summarise(runs, args.concurrency, _labels(args, gateways), args.output_len)
    return {"levels": levels, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--rounds", type=int, default=3, help="rounds per concurrency")
    p.add_argument("--relays", nargs="+", default=["direct", "asgi"], help="gateways to compare")
    p.add_argument("--prompts", type=int, help="per run (default: max(256, 4 x concurrency))")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of an earlier revision (git worktree): its gateway runs in the same "
        "rounds as `gateway-baseline`",
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="also bench/tcp_pipe.py, as `tcp-pipe`: the floor",
    )
    p.add_argument("--interval-ms", type=float, default=20.0, help="the fake's time per token")
    p.add_argument(
        "--variants",
        nargs="*",
        choices=sorted(VARIANTS),
        default=[],
        help="also run each gateway for these clients: no-usage (did not ask for the usage "
        "event), store (store=true)",
    )
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--skip-vllm", action="store_true", help="part A only")
    p.add_argument("--skip-fake", action="store_true", help="part B only")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    p.add_argument("--stack-var-dir", type=Path, help="use a running stack with this var dir")
    p.add_argument("--stack-ports", type=int, nargs=2, metavar=("INFERENCE", "GATEWAY"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.concurrency, args.rounds, args.prompts = [4], 1, 8
        args.input_len, args.output_len = 16, 8
    result: dict[str, Any] = {
        "protocol": "vllm.benchmarks.serve, openai-chat, random prompts, ignore_eos, streamed; "
        "one run direct and one per gateway each round, the order rotating",
        "input_len": args.input_len,
        "output_len": args.output_len,
    }
    if not args.skip_fake:
        with tempfile.TemporaryDirectory() as d:
            result["fake"] = part_fake(args, Path(d))
        print(json.dumps(result["fake"], indent=1))
    if not args.skip_vllm:
        if args.stack_var_dir:
            inference, gateway = args.stack_ports
            stack = Stack(
                StackConfig(
                    var_dir=args.stack_var_dir,
                    ports=dataclasses.replace(Ports(), inference=inference, gateway=gateway),
                )
            )
            result["vllm"] = part_vllm(args, stack)
        else:
            with tempfile.TemporaryDirectory() as d:
                stack = Stack(StackConfig(var_dir=Path(d), ports=Ports.free()))
                try:
                    stack.up(echo=lambda _: None)
                    result["vllm"] = part_vllm(args, stack)
                finally:
                    stack.down()
        print(json.dumps(result["vllm"], indent=1))
    print(f"wrote {write_result('streaming', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

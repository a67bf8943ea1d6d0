"""Agent benchmark: the loop's own overhead per step, and RDKit tool latency.

A. Loop overhead. Runs of K steps against the scripted model (tests/fakes, answering at once)
   through a real gateway: each step is a model call and a calculator call. The agent reports
   per run its wall time, model time and tool time; the loop's own time per step is
   (wall - model - tools) / steps. Side by side, interleaved run by run, the benchmark calls the
   model directly through the gateway K times: the client-side cost of a step against the bare
   model call.
B. Sandboxed tools. The same molecules (and a calculator expression) through the agent's tool
   sandbox (as a tool call sees it: a round trip to a worker process) and in this process (the
   baseline).

    .venv/bin/python bench/agent.py [--smoke] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import write_result
from services.agent.tools import sandboxworker
from services.agent.tools.sandbox import ToolSandbox
from services.stackconfig import _free_port
from tests.processes import fake_upstream, gateway, make_key, service

DRUGS = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "caffeine": "Cn1cnc2c1c(=O)n(C)c(=O)n2C",
    "ibuprofen": "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "atorvastatin": "CC(C)c1n(CC[C@@H](O)C[C@@H](O)CC(=O)O)c(-c2ccc(F)cc2)"
    "c(-c2ccccc2)c1C(=O)Nc1ccccc1",
    "taxol": "CC1=C2[C@@]([C@]([C@H]([C@@H]3[C@]4([C@H](OC4)C[C@@H]([C@]3(C(=O)[C@@H]2OC(=O)C)C)O)"
    "OC(=O)C)OC(=O)c5ccccc5)(C[C@@H]1OC(=O)[C@H](O)[C@@H](NC(=O)c6ccccc6)c7ccccc7)O)(C)C",
}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(statistics.median(values), 3),
        "p95": round(pct(values, 0.95), 3),
    }


def loop_overhead(tmp: Path, redis_url: str, runs: int, steps: int) -> dict[str, Any]:
    action = {"action": "calculator", "arguments": {"expression": "2*(3+4)"}}
    agent_port = _free_port()
    with (
        fake_upstream(tmp) as fake,
        gateway(tmp, [fake.url], redis_url, agent_url=f"http://127.0.0.1:{agent_port}") as gw,
        service("agent", tmp, {"gateway_url": gw.url}, ready="/ready", port=agent_port),
    ):
        key = make_key(tmp, "bench-agent")
        headers = {"authorization": f"Bearer {key}"}
        script = {"replies": [{"content": json.dumps(action), "repeat": True}]}
        httpx.post(f"{fake.url}/script", json=script).raise_for_status()
        chat = {
            "model": "scripted",
            "messages": [{"role": "user", "content": "compute"}],
            "max_tokens": 64,
        }
        body = {
            "model": "scripted",
            "messages": [{"role": "user", "content": "compute"}],
            "tools": ["calculator"],
            "budgets": {"max_steps": steps},
            "stream": True,
        }
        loop_ms, step_ms, direct_ms = [], [], []
        with httpx.Client(base_url=gw.url, headers=headers, timeout=60) as c:
            for i in range(runs + 1):  # the first round warms both paths up
                t0 = time.perf_counter()
                for _ in range(steps):
                    c.post("/v1/chat/completions", json=chat).raise_for_status()
                direct = (time.perf_counter() - t0) * 1000 / steps
                t0 = time.perf_counter()
                last = _last_event(c, body)
                per_step = (time.perf_counter() - t0) * 1000 / steps
                assert last["incomplete_details"] == {"reason": "max_steps"}, last
                t = last["timings"]
                if i:
                    loop_ms.append(t["loop_ms"] / steps)
                    step_ms.append(per_step)
                    direct_ms.append(direct)
    return {
        "steps_per_run": steps,
        "runs": runs,
        "loop_overhead_ms_per_step": summary(loop_ms),
        "client_ms_per_step": {"agent": summary(step_ms), "direct_model_call": summary(direct_ms)},
        "added_per_step_ms_p50": round(
            statistics.median(step_ms) - statistics.median(direct_ms), 3
        ),
    }


def _last_event(c: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    last: dict[str, Any] = {}
    with c.stream("POST", "/v1/agent/runs", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                last = json.loads(line[6:])
    return last


def rdkit_latency(rounds: int) -> dict[str, Any]:
    calls = [("molecule_info", {"smiles": s}) for s in DRUGS.values()]
    calls += [("similarity", {"smiles_a": DRUGS["aspirin"], "smiles_b": s}) for s in DRUGS.values()]
    calls += [("substructure_match", {"smiles": s, "pattern": "c1ccccc1"}) for s in DRUGS.values()]
    calls += [("calculator", {"expression": "sqrt(2**10 + 1) * 180.159 / 3"})] * len(DRUGS)

    async def measure() -> dict[str, dict[str, list[float]]]:
        sandbox = ToolSandbox(workers=1, timeout_s=10)
        await sandbox.start()
        out: dict[str, dict[str, list[float]]] = {}
        try:
            for _ in range(rounds):
                for op, args in calls:
                    t0 = time.perf_counter()
                    await sandbox.call(op, args, time.monotonic() + 10)
                    boxed = (time.perf_counter() - t0) * 1000
                    t0 = time.perf_counter()
                    sandboxworker.answer({"op": op, "args": args}, 1000)
                    raw = (time.perf_counter() - t0) * 1000
                    slot = out.setdefault(op, {"sandbox": [], "in_process": []})
                    slot["sandbox"].append(boxed)
                    slot["in_process"].append(raw)
        finally:
            await sandbox.close()
        return out

    measured = asyncio.run(measure())
    return {
        op: {"sandbox_ms": summary(v["sandbox"]), "in_process_ms": summary(v["in_process"])}
        for op, v in measured.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rdkit-rounds", type=int, default=30)
    p.add_argument("--smoke", action="store_true", help="a tiny run, for the test suite")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.runs, args.steps, args.rdkit_rounds = 2, 2, 1
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as d:
        result = {
            "loop": loop_overhead(Path(d), args.redis_url, args.runs, args.steps),
            "rdkit": rdkit_latency(args.rdkit_rounds),
        }
    print(json.dumps(result, indent=2))
    write_result("agent", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

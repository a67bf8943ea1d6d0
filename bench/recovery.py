"""How fast the native stack comes back: seconds from `kill -9` of a service's process group
until it runs under a new pid and is ready, per service over several rounds (median, min, max);
and from SIGSTOP (hung: alive, silent) until the monitor has restarted it and it is ready, with
the default liveness policy (3 checks, 5 s apart, 5 s timeout).

    python bench/recovery.py [--rounds 5] [--hung-rounds 3] [--services milvus gateway ...]

It starts its own stack (everything but Prometheus) on free ports, with the engine's dev model,
and stops it. Before this supervision existed a killed service stayed dead until `make up`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import write_result
from services.stack import Ports, Stack, StackConfig
from services.supervise import Policy

ORDER = ["milvus", "retrieval", "gateway", "agent", "finetune-worker", "inference"]
NEEDS = {  # what each needs running to be ready
    "milvus": ["milvus"],
    "retrieval": ["milvus", "retrieval"],
    "gateway": ["redis", "inference", "gateway"],
    "agent": ["redis", "inference", "gateway", "agent"],
    "finetune-worker": ["redis", "milvus", "retrieval", "finetune-worker"],
    "inference": ["inference"],
}


def until_back(stack: Stack, name: str, old_pid: int, timeout: float) -> float:
    start = time.monotonic()
    while True:
        state = stack.status()[name]
        if state == "ready" and stack.pid(name) not in (None, old_pid):
            return time.monotonic() - start
        if state == "failed":
            raise RuntimeError(f"{name} failed: {stack.explain(name)}")
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{name} not back in {timeout:g}s:\n{stack.tail(name)}")
        time.sleep(0.1)


def all_ready(stack: Stack, names: list[str]) -> None:
    deadline = time.monotonic() + 300
    while any(stack.status()[n] != "ready" for n in names):
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready: {stack.status()}")
        time.sleep(0.2)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(values), 2),
        "min_s": round(min(values), 2),
        "max_s": round(max(values), 2),
        "n": len(values),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--hung-rounds", type=int, default=3, help="0: skip the hung case")
    p.add_argument("--hung", default="gateway", choices=ORDER, help="the service to freeze")
    p.add_argument("--services", nargs="+", default=ORDER, choices=ORDER)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    killed = [n for n in ORDER if n in args.services]
    frozen = [args.hung] if args.hung_rounds else []
    order = [s.name for s in StackConfig().services()]
    needed = sorted({d for n in killed + frozen for d in NEEDS[n]}, key=order.index)
    with tempfile.TemporaryDirectory(prefix="crucible-recovery-") as tmp:
        # Default liveness; the crash-loop limit (5 exits in 5 minutes) raised above the kills
        # made here on purpose, which it would otherwise (rightly) stop.
        kills = args.rounds + args.hung_rounds + 1
        policy = Policy(crash_exits=kills)
        stack = Stack(StackConfig(var_dir=Path(tmp), ports=Ports.free(), policy=policy))
        try:
            stack.up(needed, echo=lambda _: None)
            times: dict[str, list[float]] = {n: [] for n in killed}
            for r in range(args.rounds):
                for name in killed:
                    all_ready(stack, needed)
                    pid = stack.pid(name)
                    assert pid is not None
                    os.killpg(pid, signal.SIGKILL)
                    times[name].append(until_back(stack, name, pid, 600))
                print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.1f}s" for n, t in times.items()))
            hung: list[float] = []
            target = args.hung
            for _ in range(args.hung_rounds):
                all_ready(stack, needed)
                time.sleep(stack.config.policy.health_interval_s * 2)  # seen healthy first
                pid = stack.pid(target)
                assert pid is not None
                os.killpg(pid, signal.SIGSTOP)
                hung.append(until_back(stack, target, pid, 300))
                print(f"{target} hung: back in {hung[-1]:.1f}s")
            restarts = stack.restarts()
            expected = {n: args.rounds for n in killed}
            if hung:
                expected[target] = expected.get(target, 0) + len(hung)
            assert restarts == expected, (restarts, expected)  # each one counted, once
        finally:
            stack.down()
    result = {
        "rounds": args.rounds,
        "policy": dataclasses.asdict(stack.config.policy),
        "after_sigkill": {n: summary(t) for n, t in times.items()},
        "after_sigstop": {"service": target, **summary(hung)} if hung else None,
        "restarts_counted": restarts,
        "before": "a killed service stayed dead until `make up` (no supervision)",
    }
    path = write_result("recovery", result, args.out)
    for n, t in times.items():
        s = summary(t)
        print(f"{n:<16} median {s['median_s']:>6.2f} s  (min {s['min_s']}, max {s['max_s']})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

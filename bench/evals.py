"""Eval throughput: items per second through the eval runner, against the same model calls made
directly through the gateway at the same concurrency, rounds interleaved.

Each round: (a) N chat calls straight through the gateway, at most `--concurrency` in flight
(the eval worker's `eval_concurrency`); (b) an eval run over the same N items (a `completions`
data source with the same sampling parameters, graded by string_check), timed from the run's
create to `completed` as a client sees it (polled every 100 ms: on two cores a tighter
poll takes CPU from the engine and the worker). The ratio (b)/(a) is what the
runner keeps of the calls' own throughput: claiming, templating, grading, writing one output
item per item and beating.

Needs a running stack (`make up`):

    .venv/bin/python bench/evals.py [--items 64] [--rounds 3] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import write_result

ROOT = Path(__file__).resolve().parents[1]


def items(n: int) -> list[dict[str, Any]]:
    return [{"item": {"question": f"Name element number {i}.", "answer": "x"}} for i in range(n)]


async def direct(url: str, key: str, model: str, n: int, c: int, max_tokens: int) -> float:
    slots = asyncio.Semaphore(c)
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:

        async def one(i: int) -> None:
            async with slots:
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": f"Name element number {i}."}],
                    "temperature": 0,
                    "max_completion_tokens": max_tokens,
                }
                r = await http.post("/v1/chat/completions", json=body, headers=headers)
                r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t0


def through_runner(
    client: openai.OpenAI, eval_id: str, model: str, n: int, max_tokens: int
) -> float:
    source: Any = {
        "type": "completions",
        "model": model,
        "input_messages": {
            "type": "template",
            "template": [{"role": "user", "content": "{{item.question}}"}],
        },
        "sampling_params": {"temperature": 0, "max_completion_tokens": max_tokens},
        "source": {"type": "file_content", "content": items(n)},
    }
    t0 = time.perf_counter()
    run = client.evals.runs.create(eval_id, data_source=source)
    while (done := client.evals.runs.retrieve(run.id, eval_id=eval_id)).status in (
        "queued",
        "in_progress",
    ):
        time.sleep(0.1)
    elapsed = time.perf_counter() - t0
    if done.status != "completed" or done.result_counts.total != n:
        raise RuntimeError(f"run {run.id}: {done.status}, {done.result_counts}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--key-file", type=Path, default=ROOT / "var" / "dev-api-key")
    p.add_argument("--model", default="crucible-dev")
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8, help="the worker's eval_concurrency")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    key = args.key_file.read_text().strip()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=key, max_retries=0)
    ev = client.evals.create(
        name="bench-throughput",
        data_source_config={
            "type": "custom",
            "item_schema": {
                "type": "object",
                "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
            },
        },
        testing_criteria=[
            {
                "type": "string_check",
                "name": "answered",
                "input": "{{sample.output_text}}",
                "reference": "",
                "operation": "ne",
            }
        ],
    )
    n, c, mt = args.items, args.concurrency, args.max_tokens
    asyncio.run(direct(args.url, key, args.model, c, c, mt))  # warm the path
    rounds = []
    for i in range(args.rounds):
        order = ["direct", "runner"] if i % 2 == 0 else ["runner", "direct"]
        seconds: dict[str, float] = {}
        for kind in order:
            if kind == "direct":
                seconds[kind] = asyncio.run(direct(args.url, key, args.model, n, c, mt))
            else:
                seconds[kind] = through_runner(client, ev.id, args.model, n, mt)
        rounds.append(
            {
                "direct_items_per_s": round(n / seconds["direct"], 2),
                "runner_items_per_s": round(n / seconds["runner"], 2),
                "ratio": round(seconds["direct"] / seconds["runner"], 3),
                "order": order,
            }
        )
        print(rounds[-1], flush=True)
    client.evals.delete(ev.id)
    result = {
        "items": n,
        "concurrency": c,
        "max_tokens": mt,
        "model": args.model,
        "rounds": rounds,
        "median_ratio": statistics.median(r["ratio"] for r in rounds),
        "median_direct_items_per_s": statistics.median(r["direct_items_per_s"] for r in rounds),
        "median_runner_items_per_s": statistics.median(r["runner_items_per_s"] for r in rounds),
    }
    write_result("evals", result, args.out)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

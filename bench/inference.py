"""Output tokens/s of the dev vLLM server at concurrency 1, 8 and 32 (`make up` first).

    python bench/inference.py [--url http://127.0.0.1:8000] [--repeats 3] [--smoke]

Each level runs `repeats` times; the JSON keeps every run and reports the median. This is the
baseline the gateway's overhead is measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import closed_loop, median, write_result
from services.inference import readiness


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="crucible-dev")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests-per-worker", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.concurrency, args.max_tokens, args.repeats, args.requests_per_worker = [1, 4], 8, 1, 1
    try:
        readiness.check(args.url, args.model)
    except readiness.NotReady as exc:
        print(f"server not ready at {args.url} ({exc}): run `make up` first", file=sys.stderr)
        return 1
    payload = {
        "model": args.model,
        "prompt": "The molecular weight of caffeine is",
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "temperature": 0,
    }
    levels = []
    for c in args.concurrency:
        runs = [
            asyncio.run(
                closed_loop(args.url, "/v1/completions", payload, c, c * args.requests_per_worker)
            )
            for _ in range(args.repeats)
        ]
        if any(r.errors for r in runs):
            print(
                f"concurrency {c}: {sum(r.errors for r in runs)} failed requests", file=sys.stderr
            )
            return 1
        tok_s = [round(r.tokens_per_s, 1) for r in runs]
        levels.append(
            {
                "concurrency": c,
                "requests_per_run": runs[0].requests,
                "runs_tokens_per_s": tok_s,
                "median_tokens_per_s": median(tok_s),
                "median_request_s": round(median([median(r.latencies) for r in runs]), 4),
            }
        )
        print(f"concurrency {c:>3}: median {median(tok_s):8.1f} output tok/s  (runs {tok_s})")
    path = write_result(
        "inference",
        {"url": args.url, "model": args.model, "max_tokens": args.max_tokens, "levels": levels},
        args.out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

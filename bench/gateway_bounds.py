"""The per-request cost of two checks the gateway added (#22), in process, beside the obvious
alternative: counting a request's sequences for the rate limit, and giving a request without
`max_tokens` its bound (spliced into the body, against encoding the payload again), for a small
chat body and one with a 1 MiB prompt.

    .venv/bin/python bench/gateway_bounds.py
"""

from __future__ import annotations

import statistics
import sys
import timeit
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import write_result
from services.gateway.validation import bound_output, sequences

CHAT = "/v1/chat/completions"


def per_call_us(fn: Any, number: int) -> dict[str, float]:
    runs = [t / number * 1e6 for t in timeit.repeat(fn, number=number, repeat=7)]
    return {"median_us": round(statistics.median(runs), 3), "best_us": round(min(runs), 3)}


def main() -> int:
    results: dict[str, Any] = {}
    for size, text in (("small", "Name three aromatic solvents."), ("1MiB", "x" * (1 << 20))):
        payload = {"model": "crucible-dev", "messages": [{"role": "user", "content": text}]}
        body = orjson.dumps(payload)
        bounded = {**payload, "max_tokens": 64}
        bounded_body = orjson.dumps(bounded)
        number = 100_000 if size == "small" else 200
        results[size] = {
            "sequences": per_call_us(lambda p=payload: sequences(CHAT, p), number),
            "bound_given": per_call_us(
                lambda b=bounded_body, p=bounded: bound_output(CHAT, b, p, 2048), number
            ),
            "bound_spliced": per_call_us(
                lambda b=body, p=payload: bound_output(CHAT, b, p, 2048), number
            ),
            "encode_again": per_call_us(
                lambda p=payload: orjson.dumps({**p, "max_tokens": 2048}), number
            ),
        }
        print(size, results[size])
    write_result("gateway_bounds", {"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

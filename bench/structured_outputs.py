"""Structured outputs: how often a `json_schema` answer is not strictly valid JSON, per vLLM
structured-output backend, side by side in one run.

For each dev model (the dense and the MoE profile) and each backend, vLLM is started with the
profile's flags and `--structured-outputs-config` set to that backend, and N chat requests ask
for a small object (bounded strings, a number, a list) at temperature 1 with `max_tokens` 120.
Answers that stop at `length` are counted apart (unfinished by design); of the rest, each is
checked with strict `json.loads` (no raw control characters inside strings) and against the
schema with pydantic.

    .venv/bin/python bench/structured_outputs.py [--n 300] [--backends xgrammar guidance]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import write_result
from services.stackconfig import _free_port

ROOT = Path(__file__).resolve().parents[1]
PROFILES = {"cpu-dev": "crucible-dev", "cpu-dev-moe": "crucible-dev-moe"}
MAX_TOKENS = 120  # the schema's strings are bounded, so most answers finish within it


class Compound(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    formula: str
    weight: float
    hazards: list[str]


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "formula": {"type": "string", "maxLength": 16},
        "weight": {"type": "number"},
        "hazards": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 2},
    },
    "required": ["name", "formula", "weight", "hazards"],
    "additionalProperties": False,
}


@contextlib.contextmanager
def engine(profile: str, backend: str, log: Path) -> Iterator[str]:
    port = _free_port()
    config = json.dumps({"backend": backend, "disable_any_whitespace": True})
    argv = [
        sys.executable, "-m", "services.inference.launch", "--profile", profile,
        "--port", str(port), "--", "--structured-outputs-config", config,
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited ({profile}, {backend}); see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM not ready in 600 s ({profile}, {backend})")
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def judge(content: str) -> str:
    """'valid', 'not_strict_json' (e.g. a raw control character in a string) or 'not_schema'."""
    try:
        value = json.loads(content)
    except json.JSONDecodeError:
        return "not_strict_json"
    try:
        Compound.model_validate(value)
    except ValidationError:
        return "not_schema"
    return "valid"


async def answers(url: str, model: str, n: int, concurrency: int) -> dict[str, Any]:
    counts = {"valid": 0, "not_strict_json": 0, "not_schema": 0, "length": 0, "error": 0}
    examples: list[str] = []
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Describe a chemical compound as JSON."}],
        "temperature": 1.0,
        "max_tokens": MAX_TOKENS,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "compound", "schema": SCHEMA, "strict": True},
        },
    }
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(seed: int) -> None:
            async with gate:
                r = await client.post("/v1/chat/completions", json={**body, "seed": seed})
            if r.status_code != 200:
                counts["error"] += 1
                return
            choice = r.json()["choices"][0]
            if choice["finish_reason"] == "length":
                counts["length"] += 1
                return
            verdict = judge(choice["message"]["content"] or "")
            counts[verdict] += 1
            if verdict != "valid" and len(examples) < 3:
                examples.append(choice["message"]["content"])

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(n)))
    finished = n - counts["length"] - counts["error"]
    invalid = counts["not_strict_json"] + counts["not_schema"]
    return {
        **counts,
        "finished": finished,
        "invalid_rate": round(invalid / finished, 4) if finished else None,
        "seconds": round(time.monotonic() - started, 1),
        "invalid_examples": examples,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--profiles", nargs="+", default=list(PROFILES))
    p.add_argument("--backends", nargs="+", default=["xgrammar", "guidance"])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    logs = ROOT / "var" / "log"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for profile in args.profiles:
        for backend in args.backends:
            with engine(profile, backend, logs / f"bench-so-{profile}-{backend}.log") as url:
                found = asyncio.run(answers(url, PROFILES[profile], args.n, args.concurrency))
            results.setdefault(profile, {})[backend] = found
            print(profile, backend, {k: v for k, v in found.items() if k != "invalid_examples"})
    path = write_result(
        "structured_outputs",
        {"n": args.n, "temperature": 1.0, "max_tokens": MAX_TOKENS, "results": results},
        args.out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

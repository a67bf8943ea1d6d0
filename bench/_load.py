"""Closed-loop load against an OpenAI-compatible endpoint, shared by the benchmarks."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    seconds: float
    output_tokens: int
    errors: int
    latencies: list[float] = field(default_factory=list)
    error_kinds: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0


async def closed_loop(
    base_url: str,
    path: str,
    payload: dict[str, Any],
    concurrency: int,
    requests: int,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """`concurrency` workers send `requests` in total, each sending its next as soon as one ends."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    tokens = errors = 0
    latencies: list[float] = []
    error_kinds: list[str] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=300, limits=limits, headers=headers
    ) as client:

        async def worker() -> None:
            nonlocal tokens, errors
            while not queue.empty():
                queue.get_nowait()
                t0 = time.perf_counter()
                try:
                    r = await client.post(path, json=payload)
                except httpx.TransportError as exc:
                    # Counted, not fatal: a benchmark reports failures rather than dying on one.
                    errors += 1
                    error_kinds.append(type(exc).__name__)
                    continue
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1
                    error_kinds.append(f"status {r.status_code}")
                    continue
                tokens += r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return LoadResult(concurrency, requests, seconds, tokens, errors, latencies, error_kinds)


def stop_on_sigterm() -> None:
    """A SIGTERM (`timeout`, a CI runner) ends the bench through its `finally` blocks, which stop
    the processes it started; Python's default would leave them running."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def _cpu_model() -> str:
    """The CPU's name and whether it has int8 dot-product instructions (VNNI): int8 speed-ups
    measured on one machine do not carry over to a CPU without them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    return f"{name} ({'with' if 'vnni' in info else 'without'} VNNI)"


def write_result(name: str, data: dict[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "bench": name,
        "command": " ".join(["python", *sys.argv]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        **data,
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path

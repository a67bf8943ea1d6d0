"""The tool sandbox: a few worker processes (`sandboxworker`) that run every tool that computes
(RDKit's chemistry, the calculator), each under a memory cap, killed and replaced when a call runs
past its timeout or the process dies. A call never blocks the event loop or outlives its timeout,
so one run's hostile input cannot hold other runs or `/ready`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from typing import Any

from services.agent.tools.base import ToolError
from services.common.config import scrubbed_env

log = logging.getLogger("crucible.agent")


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


class ToolSandbox:
    """A pool of worker processes for the tools that compute (RDKit, the calculator); `call`
    never blocks the event loop or outlives its timeout."""

    def __init__(
        self, workers: int = 2, timeout_s: float = 5.0, memory_mb: int = 1024, max_atoms: int = 1000
    ) -> None:
        self.size = workers
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_atoms = max_atoms
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._all: set[_Worker] = set()
        self._spawning: set[asyncio.Task[None]] = set()
        self.restarts = 0

    async def start(self) -> None:
        await asyncio.gather(*(self._add() for _ in range(self.size)))

    async def _add(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.agent.tools.sandboxworker",
            str(self.max_atoms),
            str(self.memory_mb),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=scrubbed_env(),  # no internal token or database URL within its reach
            limit=1 << 20,
        )
        w = _Worker(proc)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
        except TimeoutError:
            line = b""
        if not line.startswith(b'{"ready"'):
            w.kill()
            raise RuntimeError("the tool sandbox worker did not start")
        self._all.add(w)
        self._idle.put_nowait(w)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._all]

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._all.discard(w)
        self.restarts += 1
        task = asyncio.create_task(self._respawn())
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    async def _respawn(self) -> None:
        try:
            await self._add()
        except Exception:
            log.exception("tool sandbox worker restart failed")

    async def call(self, op: str, args: dict[str, Any], deadline: float) -> dict[str, Any]:
        """Run one operation; a `ToolError` for bad input, a timeout or a crashed worker."""
        timeout = min(self.timeout_s, deadline - time.monotonic())
        if timeout <= 0:
            raise ToolError("no time left in the run's budget")
        end = time.monotonic() + timeout
        try:
            w = await asyncio.wait_for(self._idle.get(), timeout)
        except TimeoutError:
            raise ToolError(f"the tool sandbox was busy for {timeout:.1f}s") from None
        stdin, stdout = w.proc.stdin, w.proc.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
            async with asyncio.timeout(end - time.monotonic()):
                await stdin.drain()
                line = await stdout.readline()
        except TimeoutError:
            self._replace(w)
            raise ToolError(f"{op} took longer than {timeout:.1f}s and was stopped") from None
        except (ConnectionError, asyncio.CancelledError):
            self._replace(w)  # a cancelled call leaves the worker mid-request: never reuse it
            raise
        if not line:
            self._replace(w)
            raise ToolError(f"{op} crashed the tool sandbox worker (input too large or malformed)")
        self._idle.put_nowait(w)
        reply = json.loads(line)
        if not reply["ok"]:
            raise ToolError(reply["error"])
        result: dict[str, Any] = reply["result"]
        return result

    async def ready(self) -> None:
        if not self._all:
            raise RuntimeError("no tool sandbox worker is running")

    async def close(self) -> None:
        for task in list(self._spawning):
            task.cancel()
        for w in list(self._all):
            w.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.proc.wait(), 5)
        self._all.clear()

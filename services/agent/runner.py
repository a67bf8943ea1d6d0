"""Runs as asyncio tasks: start, stream their events, cancel, and end each exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from services.agent.loop import Execution, Finished
from services.agent.runs import RunRow, run_object

_TRACER = trace.get_tracer("crucible.agent")
log = logging.getLogger("crucible.agent")
Event = tuple[str, dict[str, Any]] | None  # None ends a stream


@dataclass
class Services:
    """What a run uses; built once by the app."""

    settings: Any
    store: Any
    model: Any
    retrieval: Any
    sandbox: Any  # the tool sandbox (RDKit, calculator)
    metrics: Any


class Runner:
    def __init__(self, services: Services) -> None:
        self.sv = services
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.executions: dict[str, Execution] = {}
        self.ending: set[str] = set()
        self.owners: Counter[str] = Counter()
        self.listeners: dict[str, list[asyncio.Queue[Event]]] = {}
        self.stopping = False

    def busy(self, owner: str) -> str | None:
        """Why a new run would be refused now (a limit name), or None."""
        s = self.sv.settings
        if len(self.tasks) >= s.max_active_runs:
            return "service"
        if self.owners[owner] >= s.max_active_runs_per_owner:
            return "owner"
        return None

    def start(self, row: RunRow, listen: bool = False) -> asyncio.Queue[Event] | None:
        queue = self.listen(row.id) if listen else None
        self.owners[row.owner] += 1
        self.tasks[row.id] = asyncio.create_task(self._run(row), name=row.id)
        return queue

    def unwritten(self, run_id: str) -> list[dict[str, Any]]:
        """Steps of a run of this process not yet in SQL (written behind the loop)."""
        ex = self.executions.get(run_id)
        return ex.log.unwritten() if ex is not None else []

    def listen(self, run_id: str) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self.listeners.setdefault(run_id, []).append(queue)
        return queue

    def _emit(self, run_id: str, event: Event) -> None:
        for queue in self.listeners.get(run_id, ()):
            queue.put_nowait(event)

    def cancel_now(self, run_id: str) -> bool:
        """Interrupt a run of this process that is still executing (one that is writing its
        end state is left to finish it)."""
        task = self.tasks.get(run_id)
        if task is None or run_id in self.ending:
            return False
        task.cancel()
        return True

    async def cancel(self, run_id: str, wait_s: float = 2.0) -> None:
        """Stop a run of this process now and wait for its end state (a run of another process
        sees its cancel flag at its next step)."""
        task = self.tasks.get(run_id)
        if task is not None:
            self.cancel_now(run_id)
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), wait_s)

    async def _run(self, row: RunRow) -> None:
        sv = self.sv
        store = sv.store
        sv.metrics.active.inc()
        began = time.perf_counter()
        ex = Execution(row, sv, lambda name, data: self._emit(row.id, (name, data)))
        self.executions[row.id] = ex
        span = _TRACER.start_span("agent.run", attributes={"crucible.run_id": row.id})
        try:
            with trace.use_span(span, end_on_exit=True):
                await asyncio.to_thread(store.start, row.id)
                self._emit(row.id, ("run.in_progress", {"id": row.id, "status": "in_progress"}))
                end = await ex.execute()
                span.set_attribute("crucible.status", end.status)
        except asyncio.CancelledError:
            end = (
                Finished("failed", error={"code": "service_stopped", "message": _STOPPED})
                if self.stopping
                else Finished("cancelled")
            )
        except Exception:
            log.exception("run failed", extra={"run_id": row.id})
            end = Finished("failed", error={"code": "internal_error", "message": _INTERNAL})
        self.ending.add(row.id)
        wall = time.perf_counter() - began
        loop_s = max(0.0, wall - ex.model_s - ex.tool_s)
        steps = ex.usage["model_calls"]
        timings = {
            "wall_ms": round(wall * 1000, 2),
            "model_ms": round(ex.model_s * 1000, 2),
            "tools_ms": round(ex.tool_s * 1000, 2),
            "loop_ms": round(loop_s * 1000, 2),
        }
        try:
            try:
                await ex.log.flush()  # every step is stored before the end state
            except Exception:
                end = Finished("failed", error={"code": "internal_error", "message": _INTERNAL})
            final = await asyncio.to_thread(
                store.finish, row.id, end.status, usage=ex.usage, timings=timings, **end.values
            )
            sv.metrics.runs.labels(final.status).inc()
            sv.metrics.steps.observe(steps)
            if steps:
                sv.metrics.loop_seconds.observe(loop_s / steps)
            self._emit(row.id, (f"run.{final.status}", run_object(final)))
            log.info(
                "run ended",
                extra={"run_id": row.id, "status": final.status, "steps": steps, **timings},
            )
        except Exception:  # the database is away: a restart marks the run interrupted
            log.exception("storing the run's end failed", extra={"run_id": row.id})
        finally:
            sv.metrics.active.dec()
            self._emit(row.id, None)
            self.listeners.pop(row.id, None)
            self.tasks.pop(row.id, None)
            self.executions.pop(row.id, None)
            self.ending.discard(row.id)
            self.owners[row.owner] -= 1

    async def close(self) -> None:
        self.stopping = True
        tasks = list(self.tasks.values())
        for run_id in list(self.tasks):
            self.cancel_now(run_id)
        await asyncio.gather(*tasks, return_exceptions=True)


_STOPPED = "the agent service stopped during this run; the steps so far are kept"
_INTERNAL = "the run stopped on an internal error"

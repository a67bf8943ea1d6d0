"""The fine-tuning API: jobs in SQL, work through Celery, and a reconciler that keeps both true.

The reconciler (every few seconds): requeues a running job whose worker went silent (it
resumes from its last checkpoint), re-sends a queued job whose broker message is gone (a
Redis that lost it), and loads registered adapters into a vLLM that restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import redis
from fastapi import FastAPI

from services.common.app import build_app, serve
from services.common.outbox import ALIAS_OUTCOMES, CAPTURES, USAGE, Consumer
from services.finetune import (
    adapters,
    aliases_api,
    captures_api,
    evals_api,
    responses,
    schedules,
    usage,
    usage_api,
)
from services.finetune.aliases import AliasStore
from services.finetune.aliasgate import alias_feedback, guard_round
from services.finetune.api import router, validate_job
from services.finetune.captures import CaptureStore
from services.finetune.config import FinetuneSettings
from services.finetune.datasets import DatasetStore
from services.finetune.evals import EvalStore
from services.finetune.handoff import HandoffStore, handoff_round
from services.finetune.jobs import JobStore
from services.finetune.metrics import ApiMetrics, LifecycleCollector, cost_model
from services.finetune.schedules import ScheduleStore, schedule_round
from services.finetune.worker import TASK, make_celery, worker_key

log = logging.getLogger("crucible.finetune")
LOST_MESSAGE_AFTER_S = 10.0


class Dispatcher:
    """Sends jobs to the workers and reads the broker's state."""

    def __init__(self, s: FinetuneSettings) -> None:
        self.s = s
        self.celery = make_celery(s)
        self.redis = redis.Redis.from_url(s.redis_url, socket_timeout=2)

    def send(self, job_id: str, model: str) -> None:
        """To the queue of the GPU class the job's model trains on."""
        self.celery.send_task(TASK, args=[job_id], queue=self.s.queue_for(model))

    def depth(self) -> int:
        try:
            return sum(int(self.redis.llen(q)) for q in self.s.queues())
        except redis.RedisError:
            return 0

    def without_worker(self) -> list[str]:
        """The queues no worker has beaten on within `worker_alive_s` (its key lapsed)."""
        return [
            q
            for q in self.s.queues()
            if next(iter(self.redis.scan_iter(match=worker_key(q, "*"), count=1000)), None) is None
        ]

    def holds(self, job_id: str) -> bool:
        """Whether the broker still has a message for the job (waiting or being worked on)."""
        needle = job_id.encode()
        waiting = [m for q in self.s.queues() for m in self.redis.lrange(q, 0, -1)]
        unacked = self.redis.hvals("unacked")
        return any(needle in m for m in [*waiting, *unacked])


def reconcile(jobs: JobStore, d: Dispatcher, s: FinetuneSettings, metrics: ApiMetrics) -> None:
    now = time.time()
    for job in jobs.with_status("running"):
        if job.heartbeat_at is not None and job.heartbeat_at < now - s.stale_after_s:
            if job.cancel_requested:  # its worker is gone and it was cancelled: nothing to resume
                jobs.transition(
                    job.id,
                    "cancelled",
                    only_from=("running",),
                    message="Job cancelled (its worker was gone)",
                )
                continue
            if job.attempts >= s.max_attempts:
                jobs.transition(
                    job.id,
                    "failed",
                    only_from=("running",),
                    error={
                        "code": "too_many_attempts",
                        "param": None,
                        "message": f"the worker was lost {job.attempts} times",
                    },
                )
                continue
            if jobs.transition(
                job.id,
                "queued",
                only_from=("running",),
                message="Worker lost; resuming from the last checkpoint",
            ):
                d.send(job.id, job.model)
                metrics.requeued.labels("worker_lost").inc()
    for job in jobs.with_status("queued"):
        if job.queued_at and job.queued_at < now - LOST_MESSAGE_AFTER_S and not d.holds(job.id):
            jobs.event(job.id, "Queue message lost (broker restarted); queued again")
            d.send(job.id, job.model)
            metrics.requeued.labels("message_lost").inc()
    restored = adapters.restore(jobs, s.inference_urls, s.inference_headers())
    if restored:
        metrics.adapters_restored.inc(restored)
    adapters.sweep(jobs, s.adapters())
    if expired := CaptureStore(jobs.session).purge(expired_before=now):
        metrics.captures_expired.inc(expired)


def create_app(settings: FinetuneSettings | None = None) -> FastAPI:
    s = settings or FinetuneSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        jobs = JobStore(s.db_url())
        dispatcher = Dispatcher(s)
        metrics = ApiMetrics(app.state.registry)
        cost_model(app.state.registry, s.engine_usd_per_second(), s.cost_hosted_prices)
        metrics.watch(jobs.counts, dispatcher.depth)
        tasks: set[asyncio.Task[None]] = set()

        async def validate_and_queue(job_id: str) -> None:
            if await asyncio.to_thread(validate_job, jobs, s, job_id):
                model = (await asyncio.to_thread(jobs.get, job_id)).model
                await asyncio.to_thread(dispatcher.send, job_id, model)

        loop = asyncio.get_running_loop()

        def start_validation(job_id: str) -> None:
            task = asyncio.create_task(validate_and_queue(job_id))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        def validate(job_id: str) -> None:
            """Validate and queue a new job; callable from the loop or from a worker thread (a
            route's `to_thread`, a schedule's run)."""
            loop.call_soon_threadsafe(start_validation, job_id)

        async def reconciler() -> None:
            while True:
                try:
                    await asyncio.to_thread(reconcile, jobs, dispatcher, s, metrics)
                except Exception:  # Redis or vLLM away: report, and try again next round
                    log.warning("reconcile round failed", exc_info=True)
                await asyncio.sleep(s.reconcile_every_s)

        app.state.jobs, app.state.validate, app.state.dispatcher = jobs, validate, dispatcher
        app.state.captures = captures = CaptureStore(jobs.session)
        app.state.datasets = DatasetStore(jobs.session)
        app.state.responses = responses.ResponseStore(jobs.session)
        app.state.evals = evals = EvalStore(jobs.session)
        app.state.aliases = aliases = AliasStore(jobs.session)
        app.state.handoffs = HandoffStore(jobs.session)
        app.state.schedules = ScheduleStore(jobs.session)
        app.state.usage = usage_store = usage.UsageStore(jobs.session)
        metrics.watch_runs(evals.status_counts)
        lifecycle = LifecycleCollector(
            captures.feedback_counts,
            evals.pass_rates,
            lambda limit: alias_feedback(aliases, captures, limit),
        )
        app.state.registry.register(lifecycle)
        consumer = Consumer(
            s.captures_redis_url,
            CAPTURES,
            "finetune",
            lambda records: metrics.captures.inc(captures.ingest(records)),
        )
        consumer.start()
        outcomes = Consumer(s.captures_redis_url, ALIAS_OUTCOMES, "finetune", aliases.ingest)
        outcomes.start()
        usage_records = Consumer(s.captures_redis_url, USAGE, "finetune", usage_store.ingest)
        usage_records.start()

        def rolled_back(alias: str, bar: str) -> None:
            metrics.alias_rollbacks.labels(alias, bar).inc()

        token = s.internal_token.get_secret_value()
        http = httpx.AsyncClient(timeout=10)
        runs_since = max(0.0, usage_store.last("agent_runs") - usage.OVERLAP_S)

        async def storage() -> None:
            r = await http.get(
                f"{s.retrieval_url}/internal/vector_store_bytes",
                headers={"authorization": f"Bearer {token}"},
            )
            r.raise_for_status()
            await asyncio.to_thread(usage_store.snapshot, r.json()["owners"])

        async def agent_runs() -> None:
            nonlocal runs_since
            runs_since = await usage.collect_agent_runs(
                usage_store, http, s.agent_url, token, runs_since
            )

        # The bytes each project's vector stores hold (from retrieval), every
        # `usage_snapshot_every_s`, and the agent runs that ended (from the agent), every
        # `usage_runs_every_s`. A round that cannot reach its service tries again next round;
        # an outage is logged once, when it starts.
        recorders = {
            "storage": (storage, s.usage_snapshot_every_s),
            "agent runs": (agent_runs, s.usage_runs_every_s),
        }
        last_done = dict.fromkeys(recorders, 0.0)
        failing: set[str] = set()

        async def record_usage() -> None:
            for name, (record, every_s) in recorders.items():
                if time.monotonic() - last_done[name] < every_s:
                    continue
                try:
                    await record()
                except httpx.HTTPError as exc:
                    if name not in failing:
                        log.warning(
                            "usage not recorded: its service is unreachable",
                            extra={"usage": name, "error": type(exc).__name__},
                        )
                    failing.add(name)
                    continue
                failing.discard(name)
                last_done[name] = time.monotonic()

        async def guardian() -> None:
            while True:
                try:
                    await record_usage()
                except Exception:
                    log.warning("usage not recorded", exc_info=True)
                try:
                    await asyncio.to_thread(guard_round, aliases, captures, rolled_back)
                    await asyncio.to_thread(handoff_round, app.state)
                    await asyncio.to_thread(schedule_round, app.state)
                    await asyncio.to_thread(aliases.prune, time.time() - 2 * 86_400)
                except Exception:
                    log.warning("alias guard round failed", exc_info=True)
                await asyncio.sleep(s.alias_guard_every_s)

        for job in jobs.with_status("validating_files"):  # interrupted by a restart
            validate(job.id)
        loop_task = asyncio.create_task(reconciler())
        guard_task = asyncio.create_task(guardian())
        try:
            yield
        finally:
            loop_task.cancel()
            app.state.registry.unregister(lifecycle)
            await asyncio.to_thread(consumer.stop)
            await asyncio.to_thread(outcomes.stop)
            await asyncio.to_thread(usage_records.stop)
            for t in [loop_task, guard_task, *tasks]:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await http.aclose()
            jobs.engine.dispose()

    async def redis_ready() -> None:
        await asyncio.to_thread(api.state.dispatcher.redis.ping)

    async def worker_alive() -> None:
        if missing := await asyncio.to_thread(api.state.dispatcher.without_worker):
            raise ConnectionError(
                f"no fine-tuning worker on queue {', '.join(map(repr, missing))} has sent a "
                f"heartbeat in the last {s.worker_alive_s:g}s: jobs would wait in the queue"
            )

    api = build_app(
        "finetune",
        settings=s,
        lifespan=lifespan,
        ready_checks=[("redis", redis_ready), ("worker", worker_alive)],
        title="Crucible fine-tuning",
        version="0.1.0",
    )
    api.include_router(router())
    api.include_router(captures_api.router())
    api.include_router(evals_api.router())
    api.include_router(responses.router())
    api.include_router(aliases_api.router())
    api.include_router(schedules.router())
    api.include_router(usage_api.router())
    return api


def main() -> None:
    s = FinetuneSettings()
    serve("finetune", create_app(s), s)


if __name__ == "__main__":
    main()

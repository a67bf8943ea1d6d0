"""The fine-tuning worker: Celery on Redis, one job per fresh process.

    python -m services.finetune.worker

Settings for hours-long GPU jobs: a message is acknowledged only after its job ends (late ack),
one message at a time (prefetch 1), a fresh child process per job (CUDA and fork do not mix, and
memory is returned), and a visibility timeout longer than any job. Recovery from a dead worker
does not wait for that timeout: jobs beat, and the API's reconciler requeues a silent one.
Cancellation is a flag the training loop checks between steps, never a kill.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from services.common import tracing
from services.finetune.config import FinetuneSettings

TASK = "crucible.finetune.run_job"
log = logging.getLogger("crucible.finetune.worker")


def worker_key(queue: str, name: str) -> str:
    """The Redis key a live worker on `queue` keeps fresh (`name` "*" matches them all)."""
    return f"crucible:finetune:worker:{queue}:{name}"


def make_celery(s: FinetuneSettings) -> Celery:
    app = Celery("crucible-finetune", broker=s.redis_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        broker_transport_options={"visibility_timeout": s.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        task_default_queue=s.queue,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


settings = FinetuneSettings()
app = make_celery(settings)


@app.task(name=TASK)
def run_job(job_id: str) -> None:
    from services.finetune import runner
    from services.finetune.metrics import WorkerMetrics

    worker = f"{socket.gethostname()}:{os.getpid()}"
    tracing.setup("finetune-worker", settings.otlp_endpoint, settings.trace_sample_ratio)
    try:
        runner.run(job_id, settings, worker, WorkerMetrics())
    finally:
        tracing.flush()  # this child exits after one task


class Heartbeat:
    """Sets the worker's key with a lifetime of `worker_alive_s`, every third of it, from a
    thread of the worker's main process (idle or busy); deletes it on a clean shutdown. A killed
    worker's key expires by itself."""

    def __init__(self, s: FinetuneSettings) -> None:
        self.s = s
        self.key = worker_key(s.queue, f"{socket.gethostname()}:{os.getpid()}")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="worker-heartbeat")

    def _beat(self) -> None:
        r = redis.Redis.from_url(self.s.redis_url, socket_timeout=2)
        ttl_ms = int(self.s.worker_alive_s * 1000)
        while not self.stop.is_set():
            try:
                r.set(self.key, "1", px=ttl_ms)
            except redis.RedisError as exc:
                log.warning("worker heartbeat failed: %s", type(exc).__name__)
            self.stop.wait(self.s.worker_alive_s / 3)
        with contextlib.suppress(redis.RedisError):  # it expires anyway
            r.delete(self.key)


_heartbeat: Heartbeat | None = None


@worker_ready.connect
def _start_heartbeat(**_: Any) -> None:
    global _heartbeat
    _heartbeat = Heartbeat(settings)
    _heartbeat.thread.start()


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop.set()
        _heartbeat.thread.join(3)


def main() -> None:
    from services.common.logging import configure_logging

    configure_logging("finetune-worker", settings.log_level)
    # Children write their metrics to files; this process serves the sum on /metrics.
    # One directory per worker (its metrics port): two workers on one host must not share it.
    metrics_dir = (
        settings.var_dir / "run" / f"finetune-worker-metrics-{settings.worker_metrics_port}"
    )
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    from services.finetune.metrics import serve_worker_metrics

    serve_worker_metrics(settings.worker_metrics_port, settings.host)
    argv: list[Any] = [
        "worker",
        f"--loglevel={settings.log_level}",
        "--pool=prefork",
        "--concurrency=1",
        "--max-tasks-per-child=1",
        "-Q",
        settings.queue,
        "--without-gossip",
        "--without-mingle",
        "-n",
        f"finetune-{settings.worker_metrics_port}@{socket.gethostname()}",
    ]
    app.worker_main(argv)


if __name__ == "__main__":
    main()

"""The fine-tuning worker: Celery on Redis, one job per fresh process.

    python -m services.finetune.worker

Settings for hours-long GPU jobs: a message is acknowledged only after its job ends (late ack),
one message at a time (prefetch 1), a fresh child process per job (CUDA and fork do not mix, and
memory is returned), and a visibility timeout longer than any job. Recovery from a dead worker
does not wait for that timeout: jobs beat, and the API's reconciler requeues a silent one.
Cancellation is a flag the training loop checks between steps, never a kill.
"""

from __future__ import annotations

import os
import shutil
import socket
from typing import Any

from celery import Celery

from services.finetune.config import FinetuneSettings

TASK = "crucible.finetune.run_job"


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
    runner.run(job_id, settings, worker, WorkerMetrics())


def main() -> None:
    from services.common.logging import configure_logging

    configure_logging("finetune-worker", settings.log_level)
    # Children write their metrics to files; this process serves the sum on /metrics.
    metrics_dir = settings.var_dir / "run" / "finetune-worker-metrics"
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
        f"finetune@{socket.gethostname()}",
    ]
    app.worker_main(argv)


if __name__ == "__main__":
    main()

"""Jobs go to the queue of the GPU class their model trains on, on a real Redis (the broker):
each class's workers take their own queue (deploy/k8s's gpu-lab runs one worker Deployment per
class), a worker lost mid-job is resumed on its class's queue, and the API is ready only while
every queue a job can go to has a live worker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from services.finetune.app import Dispatcher, reconcile
from services.finetune.config import FinetuneSettings
from services.finetune.jobs import JobRow, JobStore, new_job_id
from services.finetune.metrics import ApiMetrics
from services.finetune.worker import worker_key


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Iterator[FinetuneSettings]:
    tag = uuid.uuid4().hex[:8]  # queues of this test only, on the shared Redis's broker db
    broker = redis_url.rsplit("/", 1)[0] + "/1"
    s = FinetuneSettings(
        var_dir=tmp_path,
        redis_url=broker,
        queue=f"ft-default-{tag}",
        queue_by_model={"qwen3-32b": f"ft-96gb-{tag}", "*": f"ft-32gb-{tag}"},
    )
    yield s
    r = redis.Redis.from_url(broker)
    r.delete(*s.queues(), *(k for q in s.queues() for k in r.scan_iter(worker_key(q, "*"))))


def _queued(s: FinetuneSettings) -> dict[str, list[bytes]]:
    r = redis.Redis.from_url(s.redis_url)
    return {q: cast(list[bytes], r.lrange(q, 0, -1)) for q in s.queues()}


def test_a_job_goes_to_its_models_class_and_a_fine_tuned_base_goes_with_its_base(
    settings: FinetuneSettings,
) -> None:
    big, small = settings.queue_by_model["qwen3-32b"], settings.queue_by_model["*"]
    assert settings.queues() == sorted([big, small])  # "*" takes what `queue` would
    d = Dispatcher(settings)
    d.send("ftjob-big", "qwen3-32b")
    d.send("ftjob-ft", "ft:qwen3-32b:lab:x:ftjob-0")  # continued training: its base's class
    d.send("ftjob-small", "crucible-dev")
    queued = _queued(settings)
    assert [len(queued[big]), len(queued[small])] == [2, 1]
    assert any(b"ftjob-ft" in m for m in queued[big]) and b"ftjob-small" in queued[small][0]
    assert d.depth() == 3
    assert d.holds("ftjob-ft") and not d.holds("ftjob-none")


def test_the_api_is_ready_only_while_every_class_has_a_live_worker(
    settings: FinetuneSettings,
) -> None:
    d = Dispatcher(settings)
    big, small = settings.queue_by_model["qwen3-32b"], settings.queue_by_model["*"]
    assert d.without_worker() == sorted([big, small])
    r = redis.Redis.from_url(settings.redis_url)
    r.set(worker_key(small, "host:1"), "1", ex=30)  # as a worker's heartbeat keeps it
    assert d.without_worker() == [big]
    r.set(worker_key(big, "host:2"), "1", ex=30)
    assert d.without_worker() == []


def test_a_lost_workers_job_is_resumed_on_its_classs_queue(settings: FinetuneSettings) -> None:
    jobs = JobStore(settings.db_url())
    row = JobRow(
        id=new_job_id(),
        owner="lab",
        model="qwen3-32b",
        training_file="file-x",
        seed=1,
        hyperparameters={"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0},
        lora={},
        status="running",
        created_at=int(time.time()),
        attempts=1,
        cancel_requested=False,
        request_hash="-",
        heartbeat_at=time.time() - settings.stale_after_s - 5,  # its worker went silent
    )
    jobs.create(row)
    from prometheus_client import CollectorRegistry

    reconcile(jobs, Dispatcher(settings), settings, ApiMetrics(CollectorRegistry()))
    assert jobs.get(row.id).status == "queued"
    queued = _queued(settings)
    assert [row.id.encode() in m for m in queued[settings.queue_by_model["qwen3-32b"]]] == [True]
    assert queued[settings.queue_by_model["*"]] == []
    jobs.engine.dispose()

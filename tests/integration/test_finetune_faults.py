"""Fine-tuning under faults, on the real stack: a killed worker, a cancel, a Redis restart."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from services.stack import Stack
from tests.finetuning import create_job, wait_job


def steps_seen(client: openai.OpenAI, job_id: str) -> list[int]:
    events = client.fine_tuning.jobs.list_events(job_id, limit=1000)
    data: list[dict[str, Any]] = [e.data for e in events if e.type == "metrics" and e.data]  # type: ignore[misc]
    return [d["step"] for d in data if "step" in d]


@pytest.fixture
def worker(stack: Stack, gateway_url: str) -> Stack:
    stack.up(["finetune-worker"], echo=lambda _: None)
    return stack


def test_a_killed_worker_resumes_from_its_last_checkpoint(
    client: openai.OpenAI, worker: Stack
) -> None:
    job = create_job(client, epochs=120, checkpoint_every=40)  # 360 steps
    wait_job(client, job.id, lambda j: bool(list(client.fine_tuning.jobs.checkpoints.list(j.id))))
    before = max(steps_seen(client, job.id))
    pgid = worker.pid("finetune-worker")
    assert pgid is not None
    os.killpg(pgid, signal.SIGKILL)  # the worker and its job process, mid-training
    time.sleep(1)
    reached = max(steps_seen(client, job.id))
    worker.up(["finetune-worker"], echo=lambda _: None)
    back = time.monotonic()
    resumed = wait_job(
        client,
        job.id,
        lambda j: any(
            "Resumed from the checkpoint" in e.message
            for e in client.fine_tuning.jobs.list_events(j.id, limit=1000)
        ),
    )
    assert time.monotonic() - back < 60  # not the broker's hours-long visibility timeout
    event = next(
        e
        for e in client.fine_tuning.jobs.list_events(resumed.id, limit=1000)
        if "Resumed from the checkpoint" in e.message
    )
    from_step = event.data["resumed_from_step"]  # type: ignore[index]
    assert from_step % 40 == 0 and reached - from_step <= 40 + 10  # redone: one interval
    assert before <= reached
    done = wait_job(client, job.id, lambda j: j.status in ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model


def test_cancel_stops_training_within_seconds_and_the_worker_moves_on(
    client: openai.OpenAI, worker: Stack
) -> None:
    long = create_job(client, epochs=400)
    wait_job(client, long.id, lambda j: j.status == "running" and steps_seen(client, j.id))
    asked = time.monotonic()
    client.fine_tuning.jobs.cancel(long.id)
    wait_job(client, long.id, lambda j: j.status == "cancelled", timeout=10)
    assert time.monotonic() - asked < 10
    short = create_job(client, epochs=2)
    done = wait_job(client, short.id, lambda j: j.status in ("succeeded", "failed"))
    assert done.status == "succeeded", done.error


def test_cancelling_a_job_whose_worker_is_gone_ends_cancelled(
    client: openai.OpenAI, worker: Stack
) -> None:
    """#22: the worker dies mid-job and the researcher cancels. The job must end `cancelled`
    (it used to be re-queued as "worker lost" and wait for a worker, re-sent every round)."""
    long = create_job(client, epochs=400)
    wait_job(client, long.id, lambda j: j.status == "running" and steps_seen(client, j.id))
    pgid = worker.pid("finetune-worker")
    assert pgid is not None
    os.killpg(pgid, signal.SIGKILL)  # the worker dies mid-job...
    worker.down_one("finetune-worker")  # ...and is not started again: no worker at all now
    try:
        client.fine_tuning.jobs.cancel(long.id)
        # Its heartbeat stops; within the stale limit (15 s) and a reconcile round it ends.
        done = wait_job(client, long.id, lambda j: j.status != "running", timeout=40)
        assert done.status == "cancelled"
        messages = [e.message for e in client.fine_tuning.jobs.list_events(long.id, limit=20)]
        assert not any("resuming" in m for m in messages), messages
    finally:
        worker.up(["finetune-worker"], echo=lambda _: None)


def test_a_job_waiting_in_redis_survives_a_redis_restart(
    client: openai.OpenAI, worker: Stack
) -> None:
    worker.down_one("finetune-worker")  # nobody takes the job: it waits in the queue
    job = create_job(client, epochs=2)
    wait_job(client, job.id, lambda j: j.status == "queued")
    worker.down_one("redis")
    worker.up(["redis"], echo=lambda _: None)
    worker.up(["finetune-worker"], echo=lambda _: None)
    done = wait_job(client, job.id, lambda j: j.status in ("succeeded", "failed"))
    assert done.status == "succeeded", done.error


def test_without_a_live_worker_fine_tuning_is_not_ready_and_says_why(
    worker: Stack, gateway_url: str
) -> None:
    """A dead worker used to leave `/ready` green while jobs queued forever (#19). A frozen
    one (SIGSTOP: alive to the kernel, no heartbeat, no exit) is the case a restart on exit
    does not cover: the API must say so, and the stack's monitor must restart it."""
    url = f"http://127.0.0.1:{worker.config.ports.finetune}/ready"
    assert httpx.get(url).status_code == 200
    pgid = worker.pid("finetune-worker")
    assert pgid is not None
    os.killpg(pgid, signal.SIGSTOP)
    killed = time.monotonic()
    deadline = killed + 20
    while (r := httpx.get(url)).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert r.status_code == 503, "still ready 20 s after the only worker froze"
    assert time.monotonic() - killed < 10  # the heartbeat's lifetime (6 s) and a margin
    assert "no fine-tuning worker" in r.json()["checks"]["worker"]
    assert r.json()["checks"]["redis"] == "ok"  # the dependency it had is still named fine
    # Its /metrics stops answering too: the monitor kills it and the stack starts a new one.
    deadline = time.monotonic() + 90
    while (r := httpx.get(url)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert r.json() == {"status": "ready", "checks": {"redis": "ok", "worker": "ok"}}
    assert worker.pid("finetune-worker") not in (None, pgid)


def test_status_shows_a_redis_it_did_not_start_as_ready_not_stopped(
    stack: Stack, redis_url: str, tmp_path: Path
) -> None:
    """A second stack on the same ports, started by no one: the Redis that answers there is
    someone else's, up; everything else is stopped (it used to say Redis was stopped)."""
    other = Stack(dataclasses.replace(stack.config, var_dir=tmp_path))
    status = other.status()
    assert status.pop("redis") == "ready (not managed)"
    assert set(status.values()) == {"stopped"} and "finetune-worker" in status

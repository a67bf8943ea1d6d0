"""A job's files are validated while the files service (retrieval) is away: validation waits for
it, then goes on; or gives up after its window, and the job fails saying why. The outage is
injected at the network boundary (a forwarder that stops listening) in front of the stack's real
retrieval service; validation is the service's own function, on a real job store."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from services.finetune.api import validate_job
from services.finetune.config import FinetuneSettings
from services.finetune.jobs import JobRow, JobStore, new_job_id
from services.stack import Stack
from services.stackconfig import _free_port
from tests.conftest import DENSE, ROOT
from tests.fakes.tcp_forward import Forwarder

DATA = ROOT / "tests" / "data" / "codewords.jsonl"
OWNER = "validation-tester"


@pytest.fixture(scope="module")
def training_file(stack: Stack) -> str:
    stack.up(["redis", "milvus", "retrieval"], echo=lambda _: None)
    r = httpx.post(
        f"http://127.0.0.1:{stack.config.ports.retrieval}/v1/files",
        headers={"authorization": "Bearer dev-internal-token", "x-crucible-owner": OWNER},
        files={"file": ("train.jsonl", DATA.read_bytes())},
        data={"purpose": "fine-tune"},
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def _job(tmp_path: Path, forwarder: Forwarder, training_file: str, retry_s: float):
    s = FinetuneSettings(
        var_dir=tmp_path,
        models_dir=ROOT / "var" / "models",
        retrieval_url=forwarder.url,
        files_retry_s=retry_s,
    )
    jobs = JobStore(s.db_url())
    row = JobRow(
        id=new_job_id(),
        owner=OWNER,
        model=DENSE,
        training_file=training_file,
        seed=1,
        hyperparameters={"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0},
        lora={},
        status="validating_files",
        created_at=int(time.time()),
        attempts=0,
        cancel_requested=False,
        request_hash="-",
    )
    job, _ = jobs.create(row)
    return s, jobs, job.id


def test_validation_waits_for_the_files_service_then_queues_the_job(
    stack: Stack, training_file: str, tmp_path: Path
) -> None:
    forwarder = Forwarder(("127.0.0.1", stack.config.ports.retrieval), _free_port())
    s, jobs, job_id = _job(tmp_path, forwarder, training_file, retry_s=60)
    comes_back = threading.Timer(2.0, forwarder.up)  # the retrieval service is back in 2 s
    comes_back.start()
    try:
        started = time.monotonic()
        assert validate_job(jobs, s, job_id) is True
        waited = time.monotonic() - started
    finally:
        comes_back.cancel()
        forwarder.down()
    job = jobs.get(job_id)
    assert job.status == "queued", job.error
    assert 1.5 < waited < 30


def test_validation_gives_up_on_a_files_service_that_stays_away_and_says_why(
    training_file: str, tmp_path: Path
) -> None:
    forwarder = Forwarder(("127.0.0.1", 1), _free_port())  # never up
    s, jobs, job_id = _job(tmp_path, forwarder, training_file, retry_s=2)
    started = time.monotonic()
    assert validate_job(jobs, s, job_id) is False
    assert time.monotonic() - started < 15
    job = jobs.get(job_id)
    assert job.status == "failed"
    assert job.error is not None and job.error["code"] == "files_unavailable", job.error
    assert "unreachable" in job.error["message"] and "2 s" in job.error["message"]

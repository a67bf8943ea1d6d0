"""Fine-tuning jobs through the gateway with the official client, for the tests that make them."""

from __future__ import annotations

import time
from typing import Any

import openai

from tests.conftest import DENSE, ROOT

DATA = ROOT / "tests" / "data" / "codewords.jsonl"


def create_job(client: openai.OpenAI, epochs: int, checkpoint_every: int = 50) -> Any:
    """A job on the dev model's codewords (3 steps an epoch at batch 8)."""
    upload = client.files.create(file=DATA.open("rb"), purpose="fine-tune")
    return client.fine_tuning.jobs.create(
        model=DENSE,
        training_file=upload.id,
        seed=1,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": epochs,
                    "batch_size": 8,
                    "learning_rate_multiplier": 5,
                }
            },
        },
        extra_body={"crucible": {"checkpoint_every": checkpoint_every}},
    )


def wait_job(client: openai.OpenAI, job_id: str, until: Any, timeout: float = 300) -> Any:
    """The job, once `until(job)` holds (polled every 0.25 s); fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if until(job):
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id}: condition not met in {timeout}s (status {job.status})")

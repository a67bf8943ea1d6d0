"""The closed loop through the gateway with the official `openai` client: upload a JSONL file,
fine-tune `crucible-dev` with LoRA on the CPU, chat with the result under its `ft:` id."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.finetune.jobs import JobStore
from services.gateway.keys import KeyStore
from services.stack import Stack
from tests.conftest import DENSE, ROOT

DATA = ROOT / "tests" / "data" / "codewords.jsonl"
EXAMPLES = [json.loads(line) for line in DATA.read_text().splitlines()]
# LoRA on the tiny random model: 20 examples x 150 epochs / batch 8 = 450 steps.
TRAINING: dict[str, Any] = {"n_epochs": 150, "batch_size": 8, "learning_rate_multiplier": 5}


def wait_for(client: openai.OpenAI, job_id: str, timeout: float = 600) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")


def answers(client: openai.OpenAI, model: str) -> list[bool]:
    right = []
    for example in EXAMPLES:
        reply = client.chat.completions.create(
            model=model, messages=example["messages"][:-1], max_tokens=6, temperature=0
        )
        content = (reply.choices[0].message.content or "").strip()
        right.append(content.startswith(example["messages"][-1]["content"]))
    return right


@pytest.fixture(scope="module")
def finished_job(client: openai.OpenAI) -> Any:
    upload = client.files.create(file=DATA.open("rb"), purpose="fine-tune")
    start = time.monotonic()
    job = client.fine_tuning.jobs.create(
        model=DENSE,
        training_file=upload.id,
        suffix="codewords",
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": TRAINING}},  # type: ignore[arg-type]
        extra_body={"crucible": {"checkpoint_every": 100}},
    )
    assert job.status == "validating_files" and job.model == DENSE
    done = wait_for(client, job.id)
    # Recorded in the test report (pytest -s shows it; BENCHMARKS.md quotes it).
    print(
        f"\nfine-tuning job {job.id}: created to {done.status} in {time.monotonic() - start:.1f} s"
    )
    return done


def test_the_job_succeeds_and_its_model_is_listed(client: openai.OpenAI, finished_job: Any) -> None:
    assert finished_job.status == "succeeded", finished_job.error
    name = finished_job.fine_tuned_model
    assert name == f"ft:{DENSE}:codewords:{finished_job.id}"
    assert finished_job.trained_tokens > 0
    assert finished_job.hyperparameters.n_epochs == TRAINING["n_epochs"]
    deadline = time.monotonic() + 15  # the gateway learns new models within its refresh
    while name not in {m.id for m in client.models.list()}:
        assert time.monotonic() < deadline, "the fine-tuned model never appeared"
        time.sleep(0.5)


def test_the_fine_tuned_model_knows_what_the_base_model_does_not(
    client: openai.OpenAI, finished_job: Any
) -> None:
    tuned = answers(client, finished_job.fine_tuned_model)
    base = answers(client, DENSE)
    assert sum(tuned) >= 0.8 * len(EXAMPLES), tuned
    assert sum(base) == 0, base


def test_the_job_is_in_the_trace_of_the_request_that_made_it(
    stack: Stack, finished_job: Any
) -> None:
    """Its worker's span (another process, started by Celery) continues the create's trace."""
    from tests.spans import spans_when

    trace_id = finished_job.model_extra["crucible"]["trace_id"]
    assert trace_id and len(trace_id) == 32

    def job(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s for s in spans if s["name"] == "finetune.job"]

    db = stack.config.var_dir / "traces.db"
    spans = job(spans_when(db, trace_id, lambda found: bool(job(found)), timeout=20))
    assert spans[0]["service"] == "finetune-worker"
    assert spans[0]["attributes"]["crucible.job_id"] == finished_job.id


def test_the_job_costs_its_training_time(
    finished_job: Any, gateway_url: str, admin_key: str
) -> None:
    """The costs API prices the job's training seconds on the day it ended (the test stack's
    cost model: $1 per engine-second, tests/conftest.py)."""
    admin = openai.OpenAI(
        base_url=f"{gateway_url}/v1", api_key=admin_key, admin_api_key=admin_key, max_retries=0
    )
    done = admin.fine_tuning.jobs.retrieve(finished_job.id)
    assert done.finished_at is not None
    page = admin.admin.organization.usage.costs(
        start_time=done.finished_at, end_time=done.finished_at + 1, group_by=["line_item"]
    ).model_dump()
    lines = {r["line_item"]: r for r in page["data"][0]["results"]}
    job = lines[f"{DENSE}, fine-tuning"]
    # Trained for a while, and never longer than the job existed.
    assert 0 < job["engine_seconds"] <= done.finished_at - done.created_at + 1
    assert job["amount"]["value"] == pytest.approx(job["engine_seconds"])
    admin.close()


def test_public_metrics_count_adapter_traffic_without_naming_the_adapter(
    client: openai.OpenAI, finished_job: Any, gateway_url: str
) -> None:
    """/metrics is on the public port: other owners' job ids and suffixes must not show."""
    wanted = {"route": "/v1/chat/completions", "model": f"ft:{DENSE}", "status": "2xx"}

    def count() -> float:
        text = httpx.get(f"{gateway_url}/metrics").text
        assert finished_job.id not in text and "codewords" not in text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "crucible_gateway_requests_total" and sample.labels == wanted
        )

    before = count()
    answers(client, finished_job.fine_tuned_model)
    deadline = time.monotonic() + 5  # the last request is counted just after its reply
    while (now := count()) < before + len(EXAMPLES) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert now == before + len(EXAMPLES)


def test_events_checkpoints_and_listing(
    client: openai.OpenAI, finished_job: Any, stack: Stack
) -> None:
    events = list(client.fine_tuning.jobs.list_events(finished_job.id, limit=1000))
    messages = [e.message for e in events]
    assert any("validated" in m for m in messages) and any("succeeded" in m for m in messages)
    data: list[dict[str, Any]] = [e.data for e in events if e.data]  # type: ignore[misc]
    metrics = [d for d in data if "train_loss" in d]
    assert metrics and all(d["train_loss"] > 0 for d in metrics)
    steps = sorted(d["step"] for d in metrics)
    assert steps[-1] == 450
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(finished_job.id))
    # Checkpoints at 100, 200, 300 and 400; the newest three are kept (files and listing).
    assert sorted(c.step_number for c in checkpoints) == [200, 300, 400]
    assert all(c.metrics.train_loss is not None for c in checkpoints)
    on_disk = stack.config.var_dir / "adapters" / finished_job.id / "checkpoints"
    assert sorted(p.name for p in on_disk.iterdir()) == [
        "step-000200",
        "step-000300",
        "step-000400",
    ]
    assert finished_job.id in [j.id for j in client.fine_tuning.jobs.list(limit=100)]


def test_event_pages_follow_their_cursor_and_a_bad_cursor_is_400(
    client: openai.OpenAI, finished_job: Any
) -> None:
    first = client.fine_tuning.jobs.list_events(finished_job.id, limit=2)
    assert len(first.data) == 2 and first.has_more
    second = client.fine_tuning.jobs.list_events(finished_job.id, limit=2, after=first.data[-1].id)
    assert second.data and not {e.id for e in second.data} & {e.id for e in first.data}
    assert second.data[0].created_at <= first.data[-1].created_at
    for cursor in ("x", "ftevent-", "ftevent-99999999999999999999999"):
        with pytest.raises(openai.BadRequestError) as bad:
            client.fine_tuning.jobs.list_events(finished_job.id, after=cursor)
        assert bad.value.body["param"] == "after"  # type: ignore[index]


def test_malformed_training_data_fails_with_line_numbers_before_training(
    client: openai.OpenAI, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(e) for e in EXAMPLES[:12]]
    lines[3] = json.dumps({"messages": [{"role": "wizard", "content": "hi"}]})
    lines[7] = json.dumps({"prompt": "only a prompt"})
    bad.write_text("\n".join(lines) + "\n")
    upload = client.files.create(file=bad.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=DENSE, training_file=upload.id)
    done = wait_for(client, job.id, timeout=60)
    assert done.status == "failed" and done.error.code == "invalid_training_file"
    assert "line 4" in done.error.message and "line 8" in done.error.message
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
    assert not any("Training started" in m for m in events)


def test_bad_requests_are_refused_at_once(client: openai.OpenAI) -> None:
    upload = client.files.create(file=DATA.open("rb"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=upload.id)
    assert err.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model=DENSE, training_file="file-doesnotexist")
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(
            model=DENSE, training_file=upload.id, extra_body={"crucible": {"lora_rank": 64}}
        )
    assert "lora_rank" in (err.value.param or "")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-unknown")


def test_one_idempotency_key_makes_one_job(client: openai.OpenAI) -> None:
    upload = client.files.create(file=DATA.open("rb"), purpose="fine-tune")
    key = {"Idempotency-Key": f"test-{time.time()}"}
    first = client.fine_tuning.jobs.create(model=DENSE, training_file=upload.id, extra_headers=key)
    again = client.fine_tuning.jobs.create(model=DENSE, training_file=upload.id, extra_headers=key)
    assert first.id == again.id
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.create(
            model=DENSE, training_file=upload.id, suffix="other", extra_headers=key
        )
    client.fine_tuning.jobs.cancel(first.id)


def test_concurrent_creates_with_one_idempotency_key_make_one_job(client: openai.OpenAI) -> None:
    from concurrent.futures import ThreadPoolExecutor

    upload = client.files.create(file=DATA.open("rb"), purpose="fine-tune")
    key = {"Idempotency-Key": f"race-{time.time()}"}
    before = {j.id for j in client.fine_tuning.jobs.list(limit=100)}

    def create(_: int) -> str:
        job = client.fine_tuning.jobs.create(
            model=DENSE, training_file=upload.id, extra_headers=key
        )
        return job.id

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(create, range(8)))  # any 5xx raises here
    assert len(ids) == 1
    after = {j.id for j in client.fine_tuning.jobs.list(limit=100)}
    assert after - before == ids
    client.fine_tuning.jobs.cancel(ids.pop())


def test_an_example_longer_than_the_context_fails_validation_naming_its_line(
    client: openai.OpenAI,
) -> None:
    """Not a job that reaches a worker and fails there, worker after worker: validation
    counts the tokens of examples that could be too long, with the model's own tokenizer."""
    lines = DATA.read_text().splitlines()
    long = json.loads(lines[6])
    long["messages"][-1]["content"] = " ".join(f"word{i}" for i in range(3000))
    lines[6] = json.dumps(long)
    upload = client.files.create(
        file=("long.jsonl", "\n".join(lines).encode()), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(model=DENSE, training_file=upload.id)
    done = wait_for(client, job.id, timeout=60)
    assert done.status == "failed"
    assert done.error.code == "invalid_training_file", done.error
    assert "line 7" in done.error.message and "tokens" in done.error.message, done.error
    assert "2048" in done.error.message
    statuses = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert not any("Training started" in m for m in statuses), statuses


def test_another_owner_can_neither_see_nor_use_the_fine_tuned_model(
    finished_job: Any, gateway_url: str, keys: KeyStore
) -> None:
    secret, _ = keys.create("stranger", rpm=0)
    other = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=secret, max_retries=0)
    name = finished_job.fine_tuned_model
    assert name not in {m.id for m in other.models.list()}
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(finished_job.id)
    assert finished_job.id not in [j.id for j in other.fine_tuning.jobs.list()]


def test_after_vllm_restarts_the_adapter_is_served_again(
    client: openai.OpenAI, finished_job: Any, stack: Stack
) -> None:
    stack.down_one("inference")
    stack.up(["inference"], echo=lambda _: None)  # a bare vLLM: no adapter loaded
    name = finished_job.fine_tuned_model
    deadline = time.monotonic() + 60  # the reconciler's next rounds load it back
    while True:
        try:
            reply = client.chat.completions.create(
                model=name, messages=EXAMPLES[0]["messages"][:-1], max_tokens=6, temperature=0
            )
            break
        except (openai.NotFoundError, openai.APIStatusError):
            assert time.monotonic() < deadline, "the adapter was not served again"
            time.sleep(1)
    assert (
        (reply.choices[0].message.content or "")
        .strip()
        .startswith(EXAMPLES[0]["messages"][-1]["content"])
    )


def _served_by_vllm(inference_url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{inference_url}/v1/models").json()["data"]}


def test_an_adapter_a_server_serves_unregistered_is_unloaded(
    finished_job: Any, stack: Stack, inference_url: str
) -> None:
    """One retired while its server was unreachable comes back with that server: the
    reconciler unloads adapters nobody registered."""
    jobs = JobStore(f"sqlite:///{stack.config.var_dir / 'finetune.db'}")
    row = jobs.adapter(finished_job.fine_tuned_model)
    jobs.engine.dispose()
    assert row is not None
    stray = f"ft:{DENSE}:stray:ftjob-{uuid.uuid4().hex[:24]}"
    r = httpx.post(
        f"{inference_url}/v1/load_lora_adapter",
        json={"lora_name": stray, "lora_path": row.path},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert stray in _served_by_vllm(inference_url)
    deadline = time.monotonic() + 30  # reconciler rounds every 3 s
    while stray in _served_by_vllm(inference_url):
        assert time.monotonic() < deadline, "the unregistered adapter is still served"
        time.sleep(0.5)
    assert finished_job.fine_tuned_model in _served_by_vllm(inference_url)  # the real one stays


def test_deleting_the_fine_tuned_model_stops_serving_it_and_frees_its_disk(
    client: openai.OpenAI,
    finished_job: Any,
    gateway_url: str,
    keys: KeyStore,
    stack: Stack,
    inference_url: str,
) -> None:
    """Last in this module: the model is gone afterwards. An alias still routing to it keeps
    it (409), another owner cannot delete it (404), and the job still names what it made."""
    name = finished_job.fine_tuned_model
    alias = f"keeps-{uuid.uuid4().hex[:6]}"
    client.post(
        "/model_aliases",
        body={"name": alias, "routes": [{"model": name, "weight": 1}]},
        cast_to=object,
    )
    with pytest.raises(openai.ConflictError) as held:
        client.models.delete(name)
    assert alias in held.value.message
    client.delete(f"/model_aliases/{alias}", cast_to=object)
    secret, _ = keys.create("stranger", rpm=0)
    other = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.models.delete(name)

    gone = client.models.delete(name)
    assert (gone.id, gone.deleted) == (name, True)
    assert name not in {m.id for m in client.models.list()}  # at once, not after a refresh
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=name, messages=EXAMPLES[0]["messages"][:-1])
    assert name not in _served_by_vllm(inference_url)
    assert not (stack.config.var_dir / "adapters" / finished_job.id).exists()
    assert client.fine_tuning.jobs.retrieve(finished_job.id).fine_tuned_model == name
    with pytest.raises(openai.NotFoundError):
        client.models.delete(name)
    # Nothing can load it back: the registry the reconciler loads from no longer has it.
    jobs = JobStore(f"sqlite:///{stack.config.var_dir / 'finetune.db'}")
    assert jobs.adapter(name) is None, "the deleted adapter is still registered"
    jobs.engine.dispose()

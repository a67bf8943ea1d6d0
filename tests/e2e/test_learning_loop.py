"""The learning loop with the official `openai` client: the lab's app asks through a model alias
and its questions are stored, a researcher corrects the answers, a dataset is made from the
corrections, and the weekly retraining schedule trains on them; the fine-tuned model clears the
alias's evaluation gate (the base model, with random weights, cannot), serves a 10% canary, is
promoted and rolled back, and the alias rides out a vLLM restart."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from typing import Any, cast

import openai
import pytest

from services.gateway.keys import KeyStore
from services.stack import Stack
from tests.conftest import DENSE
from tests.e2e.test_evals import QA_SCHEMA, finished, sampled
from tests.e2e.test_finetune_openai import EXAMPLES, TRAINING, answers, wait_for
from tests.e2e.test_stored_completions import feedback, stored


def make_dataset(client: openai.OpenAI, **body: Any) -> dict[str, Any]:
    made: Any = client.post("/fine_tuning/datasets", body=body, cast_to=object)
    return dict(made)


FACTS: list[Any] = [
    {"item": {"question": e["messages"][0]["content"], "answer": e["messages"][1]["content"]}}
    for e in EXAMPLES
]


def api(client: openai.OpenAI, path: str, body: Any = None) -> Any:
    if body is None:
        return client.get(path, cast_to=object)
    return client.post(path, body=body, cast_to=object)


@pytest.fixture(scope="module")
def gate(client: openai.OpenAI) -> str:
    """The lab's eval: does the model recall each corrected codeword?"""
    ev = client.evals.create(
        name="codewords",
        data_source_config={"type": "custom", "item_schema": dict(QA_SCHEMA)},
        testing_criteria=[
            {
                "type": "string_check",
                "name": "recalls the codeword",
                "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}",
                "operation": "like",
            }
        ],
    )
    return ev.id


@pytest.fixture(scope="module")
def alias(client: openai.OpenAI, gate: str) -> str:
    """The name the lab's app calls: the base model, gated by the codewords eval."""
    name = f"chem-assistant-{uuid.uuid4().hex[:6]}"
    api(
        client,
        "/model_aliases",
        {
            "name": name,
            "routes": [{"model": DENSE, "weight": 100}],
            "sticky": "user",
            "gate": {"eval_id": gate, "min_pass_rate": 0.8},
        },
    )
    deadline = time.monotonic() + 5  # every gateway routes a new alias within a second or two
    while name not in {m.id for m in client.models.list()}:
        assert time.monotonic() < deadline, "the alias was not routed within 5 s"
        time.sleep(0.1)
    return name


@pytest.fixture(scope="module")
def corrected(client: openai.OpenAI, alias: str) -> str:
    """Every codeword question asked through the alias with store=True and its answer corrected;
    plus one question asked twice (case and spacing aside). Returns the run's tag."""
    tag = uuid.uuid4().hex[:12]
    ids = []
    for i, example in enumerate(EXAMPLES):
        question, answer = cast(list[Any], example["messages"])
        raw = client.chat.completions.with_raw_response.create(
            model=alias,
            messages=[question],
            max_tokens=4,
            store=True,
            metadata={"loop": tag, "half": str(i % 2)},
            extra_body={"safety_identifier": f"researcher-{i}"},
        )
        reply = raw.parse()
        assert reply.model == DENSE == raw.headers["x-crucible-model"]  # the alias said who
        ids.append(reply.id)
        feedback(client, reply.id, metric="rating", value="bad", correction=answer)
    again: Any = {"role": "user", "content": "  " + EXAMPLES[0]["messages"][0]["content"].upper()}
    twice = client.chat.completions.create(
        model=DENSE, messages=[again], max_tokens=4, store=True, metadata={"loop": tag, "half": "0"}
    )
    stored(client, twice.id)
    feedback(client, twice.id, metric="rating", value="bad")  # uncorrected: the corrected one wins
    return tag


def test_a_dataset_is_the_corrected_answers_once_each(
    client: openai.OpenAI, corrected: str
) -> None:
    made = make_dataset(
        client, filter={"metadata": {"loop": corrected}, "feedback": {"rating": "bad"}}
    )
    assert made["counts"]["matched"] == len(EXAMPLES) + 1
    assert made["counts"]["duplicates_collapsed"] == 1
    assert made["counts"]["training"] == len(EXAMPLES) == made["counts"]["corrected"]
    assert made["validation_file"] is None and len(made["completion_ids"]) == len(EXAMPLES)
    text = client.files.content(made["training_file"]).text
    rows = [json.loads(line) for line in text.splitlines()]
    assert sorted(map(json.dumps, (r["messages"] for r in rows))) == sorted(
        json.dumps(e["messages"]) for e in EXAMPLES
    )
    assert client.files.retrieve(made["training_file"]).purpose == "fine-tune"
    assert make_dataset(client, filter={"metadata": {"loop": corrected}})["id"] != made["id"]


def test_a_stratified_validation_split(client: openai.OpenAI, corrected: str) -> None:
    made = make_dataset(
        client,
        filter={"metadata": {"loop": corrected}},
        validation_split=0.2,
        stratify_by="half",
        seed=3,
    )
    assert made["counts"]["training"] == 16 and made["counts"]["validation"] == 4
    valid = client.files.content(made["validation_file"]).text.splitlines()
    questions = [json.loads(line)["messages"][0]["content"] for line in valid]
    halves = [
        next(i % 2 for i, e in enumerate(EXAMPLES) if e["messages"][0]["content"] == q)
        for q in questions
    ]
    assert sorted(halves) == [0, 0, 1, 1]  # each stratum split alike
    again = make_dataset(
        client,
        filter={"metadata": {"loop": corrected}},
        validation_split=0.2,
        stratify_by="half",
        seed=3,
    )
    assert client.files.content(again["validation_file"]).text.splitlines() == valid


def test_too_few_rows_and_bad_filters_are_400(client: openai.OpenAI, corrected: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        make_dataset(client, filter={"metadata": {"loop": corrected}}, min_rows=50)
    assert err.value.param == "min_rows"
    with pytest.raises(openai.BadRequestError):
        make_dataset(client, filter={"metadata": {"loop": 7}})
    with pytest.raises(openai.BadRequestError):
        make_dataset(client, filter={"nonsense": True})


def test_another_owner_gets_nothing_from_the_filter(
    gateway_url: str, keys: KeyStore, client: openai.OpenAI, corrected: str
) -> None:
    made = make_dataset(client, filter={"metadata": {"loop": corrected}})
    secret, _ = keys.create("stranger-datasets")
    other = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        make_dataset(other, filter={"metadata": {"loop": corrected}}, min_rows=1)
    assert "0 rows" in err.value.message
    with pytest.raises(openai.NotFoundError):
        other.get(f"/fine_tuning/datasets/{made['id']}", cast_to=object)


def routed(client: openai.OpenAI, alias: str, revision: int, timeout: float = 5) -> None:
    """Wait until the gateway routes by `revision` of the alias (its model card says which)."""
    deadline = time.monotonic() + timeout
    while cast(Any, client.models.retrieve(alias)).alias["revision"] != revision:
        assert time.monotonic() < deadline, f"revision {revision} not routed in {timeout} s"
        time.sleep(0.1)


def served(client: openai.OpenAI, model: str, who: str) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=1,
        extra_body={"safety_identifier": who},
    )
    return reply.model


def test_the_weekly_loop_trains_gates_and_canaries_the_new_model(
    client: openai.OpenAI, stack: Stack, corrected: str, alias: str, gate: str
) -> None:
    # The base model fails the gate's eval: it never saw the codewords.
    base = client.evals.runs.create(gate, data_source=sampled(DENSE, FACTS, max_tokens=6))
    base_result = finished(client, gate, base.id)
    assert base_result.result_counts.passed <= 0.1 * len(EXAMPLES), base_result.result_counts
    # The weekly schedule, run now: the corrections → a dataset → a job that hands its model
    # to the alias (an eval run on the gate; past it, a 10% canary).
    gate_run = {k: v for k, v in sampled("-", FACTS, max_tokens=6).items() if k != "model"}
    schedule = api(
        client,
        "/fine_tuning/schedules",
        {
            "name": "weekly codewords",
            "cron": "0 3 * * 1",
            "dataset": {"filter": {"metadata": {"loop": corrected}, "feedback": {"rating": "bad"}}},
            "window_days": 7,
            "job": {
                "model": DENSE,
                "suffix": "weekly",
                "seed": 7,
                "method": {"type": "supervised", "supervised": {"hyperparameters": TRAINING}},
                "crucible": {"promote": {"alias": alias, "weight": 10, "data_source": gate_run}},
            },
        },
    )
    assert schedule["next_run_at"] > time.time() and schedule["enabled"]
    run = api(client, f"/fine_tuning/schedules/{schedule['id']}/run", {})
    assert run["status"] == "succeeded", run["error"]
    done = wait_for(client, run["fine_tuning_job_id"])
    assert done.status == "succeeded", done.error
    ft = done.fine_tuned_model
    deadline = time.monotonic() + 240
    while (
        handoff := api(client, f"/fine_tuning/schedules/{schedule['id']}/runs")["data"][0][
            "handoff"
        ]
    )["status"] in ("waiting", "evaluating"):
        assert time.monotonic() < deadline, f"the hand-off is still {handoff['status']}"
        time.sleep(1)
    assert handoff["status"] == "promoted", handoff
    ft_run = client.evals.runs.retrieve(handoff["eval_run_id"], eval_id=gate)
    assert ft_run.result_counts.passed >= 0.8 * len(EXAMPLES), ft_run.result_counts
    canary = api(client, f"/model_aliases/{alias}")
    assert canary["revision"] == 2 and canary["shares"] == {ft: 0.1, DENSE: 0.9}
    events = [e.message for e in client.fine_tuning.jobs.list_events(done.id, limit=50)]
    assert any(f"joined alias {alias} at 10%" in m for m in events), events
    # The canary: 400 requests from 200 researchers, each staying on one model.
    routed(client, alias, 2)
    on: dict[str, set[str]] = {}
    for _ in range(2):
        for i in range(200):
            on.setdefault(f"r{i}", set()).add(served(client, alias, f"r{i}"))
    assert all(len(models) == 1 for models in on.values()), "a researcher switched model"
    share = sum(ft in models for models in on.values()) / 200
    assert 0.05 <= share <= 0.15, share
    # A vLLM restart during the canary: the alias comes back by itself, adapter and all.
    pid = stack.pid("inference")
    assert pid is not None
    os.killpg(os.getpgid(pid), signal.SIGKILL)  # the launcher and vLLM: a crash
    canaried = [who for who, models in on.items() if ft in models]
    deadline = time.monotonic() + 240
    while True:
        try:
            if served(client, alias, canaried[0]) == ft:
                break
        except (openai.APIStatusError, openai.APIConnectionError):
            pass  # 503 while no engine is up; the base model while the adapter is reloaded
        assert time.monotonic() < deadline, "the alias did not recover after the vLLM restart"
        time.sleep(1)
    assert all(served(client, alias, who) == ft for who in canaried)
    # Promotion to 100%, then a rollback to the canary.
    full = api(client, f"/model_aliases/{alias}/promote", {"model": ft, "reason": "won the week"})
    assert full["shares"] == {ft: 1.0, DENSE: 0.0}
    routed(client, alias, 3)
    assert {served(client, alias, f"r{i}") for i in range(20)} == {ft}
    back = api(client, f"/model_aliases/{alias}/rollback", {"reason": "second thoughts"})
    assert back["revision"] == 4 and back["shares"] == canary["shares"]
    revisions = api(client, f"/model_aliases/{alias}/revisions")["data"]
    assert [r["action"] for r in revisions] == ["rollback", "promote", "promote", "create"]
    assert revisions[2]["actor"] == f"job:{done.id}"
    assert revisions[2]["evidence"][ft]["run_id"] == handoff["eval_run_id"]
    # The same facts asked directly agree with the eval.
    assert sum(answers(client, ft)) >= 0.8 * len(EXAMPLES)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "every monday"}, "cron"),
        ({"job": {"model": DENSE, "training_file": "file-x"}}, "job.training_file"),
        ({"job": {"model": "no-such-base"}}, "model"),
        ({"job": {"model": DENSE, "seed": "seven"}}, "job.seed"),
        ({"window_days": 0}, None),
        (
            {
                "job": {
                    "model": DENSE,
                    "crucible": {"promote": {"alias": "nope", "data_source": {}}},
                }
            },
            "crucible.promote.alias",
        ),
    ],
)
def test_bad_schedules_are_refused_naming_the_param(
    client: openai.OpenAI, change: dict[str, Any], param: str | None
) -> None:
    body = {"cron": "0 3 * * 1", "dataset": {}, "job": {"model": DENSE}, **change}
    with pytest.raises(openai.BadRequestError) as err:
        api(client, "/fine_tuning/schedules", body)
    if param:
        assert err.value.param == param, err.value.message


def test_a_schedule_is_its_owners_and_can_be_paused(
    client: openai.OpenAI, gateway_url: str, keys: KeyStore
) -> None:
    nothing = {"filter": {"metadata": {"loop": "never-stored"}}}  # no answers this week
    body = {"cron": "0 3 * * 1", "dataset": nothing, "job": {"model": DENSE}}
    made = api(client, "/fine_tuning/schedules", body)
    paused = api(client, f"/fine_tuning/schedules/{made['id']}", {"enabled": False})
    assert paused["enabled"] is False and paused["next_run_at"] is None
    assert made["id"] in [s["id"] for s in api(client, "/fine_tuning/schedules?limit=100")["data"]]
    secret, _ = keys.create("stranger-schedules")
    other = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=secret, max_retries=0)
    for path in (
        f"/fine_tuning/schedules/{made['id']}",
        f"/fine_tuning/schedules/{made['id']}/runs",
    ):
        with pytest.raises(openai.NotFoundError):
            api(other, path)
    with pytest.raises(openai.NotFoundError):
        api(other, f"/fine_tuning/schedules/{made['id']}/run", {})
    # No answers this week: the run is recorded as failed, with the reason, and no job starts.
    run = api(client, f"/fine_tuning/schedules/{made['id']}/run", {})
    assert run["status"] == "failed" and run["fine_tuning_job_id"] is None
    assert run["error"]["param"] == "min_rows" and "0 rows" in run["error"]["message"]
    assert api(client, f"/fine_tuning/schedules/{made['id']}/runs")["data"][0]["id"] == run["id"]
    assert client.delete(f"/fine_tuning/schedules/{made['id']}", cast_to=object)["deleted"]  # type: ignore[index]

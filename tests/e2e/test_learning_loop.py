"""The learning loop with the official `openai` client: the lab's questions are stored, a
researcher corrects the answers, a dataset is made from the corrections, a fine-tuning job trains
on it, and the fine-tuned model now gives the corrected answers (the base model, with random
weights, cannot)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, cast

import openai
import pytest

from services.gateway.keys import KeyStore
from tests.conftest import DENSE
from tests.e2e.test_evals import QA_SCHEMA, finished, sampled
from tests.e2e.test_finetune_openai import EXAMPLES, TRAINING, answers, wait_for
from tests.e2e.test_stored_completions import feedback, stored


def make_dataset(client: openai.OpenAI, **body: Any) -> dict[str, Any]:
    made: Any = client.post("/fine_tuning/datasets", body=body, cast_to=object)
    return dict(made)


@pytest.fixture(scope="module")
def corrected(client: openai.OpenAI) -> str:
    """Every codeword question asked with store=True and its answer corrected; plus one question
    asked twice (case and spacing aside). Returns the run's tag."""
    tag = uuid.uuid4().hex[:12]
    ids = []
    for i, example in enumerate(EXAMPLES):
        question, answer = cast(list[Any], example["messages"])
        reply = client.chat.completions.create(
            model=DENSE,
            messages=[question],
            max_tokens=4,
            store=True,
            metadata={"loop": tag, "half": str(i % 2)},
        )
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


def test_fine_tuning_on_the_corrections_teaches_them(client: openai.OpenAI, corrected: str) -> None:
    made = make_dataset(
        client, filter={"metadata": {"loop": corrected}, "feedback": {"rating": "bad"}}
    )
    job = client.fine_tuning.jobs.create(
        model=DENSE,
        training_file=made["training_file"],
        suffix="loop",
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": TRAINING}},  # type: ignore[arg-type]
    )
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    deadline = time.monotonic() + 15  # the gateway learns new models within its refresh
    while done.fine_tuned_model not in {m.id for m in client.models.list()}:
        assert time.monotonic() < deadline, "the fine-tuned model never appeared"
        time.sleep(0.5)
    # The eval: both models over the corrected facts, graded by string_check.
    facts: list[Any] = [
        {"item": {"question": e["messages"][0]["content"], "answer": e["messages"][1]["content"]}}
        for e in EXAMPLES
    ]
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
    passed = {}
    for model in (done.fine_tuned_model, DENSE):
        run = client.evals.runs.create(ev.id, data_source=sampled(model, facts, max_tokens=6))
        result = finished(client, ev.id, run.id)
        assert result.status == "completed" and result.result_counts.total == len(EXAMPLES)
        passed[model] = result.result_counts.passed
    assert passed[done.fine_tuned_model] >= 0.8 * len(EXAMPLES), passed
    assert passed[DENSE] <= 0.1 * len(EXAMPLES), passed
    # The same facts asked directly agree with the eval.
    assert sum(answers(client, done.fine_tuned_model)) >= 0.8 * len(EXAMPLES)

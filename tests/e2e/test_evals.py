"""Evaluations through the gateway with the official `openai` client: OpenAI's Evals API over the
lab's models, run by the eval worker; bad input refused at once; runs cancelled, resumed after a
worker kill, and invisible to another owner."""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

import openai
import pytest

from services.gateway.keys import KeyStore
from services.stack import Stack
from tests.conftest import DENSE
from tests.e2e.test_responses import kept as kept_response

QA_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}
CUSTOM: Any = {"type": "custom", "item_schema": QA_SCHEMA, "include_sample_schema": True}
EXACT: Any = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}
SAID_SOMETHING: Any = {
    "type": "string_check",
    "name": "said something",
    "input": "{{sample.output_text}}",
    "reference": "",
    "operation": "ne",
}


def finished(client: openai.OpenAI, eval_id: str, run_id: str, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
        if run.status in ("completed", "failed", "canceled"):
            return run
        assert time.monotonic() < deadline, f"run {run_id} still {run.status}"
        time.sleep(0.2)


def items(n: int) -> list[dict[str, Any]]:
    return [{"item": {"question": f"question {i}?", "answer": str(i)}} for i in range(n)]


def given(content: list[Any]) -> Any:
    """A jsonl data source whose items bring their samples."""
    return {"type": "jsonl", "source": {"type": "file_content", "content": content}}


def sampled(model: str, content: list[dict[str, Any]], max_tokens: int = 4) -> Any:
    return {
        "type": "completions",
        "model": model,
        "input_messages": {
            "type": "template",
            "template": [{"role": "user", "content": "{{item.question}}"}],
        },
        "sampling_params": {"temperature": 0, "max_completion_tokens": max_tokens},
        "source": {"type": "file_content", "content": content},
    }


def test_evals_are_created_listed_updated_and_deleted(client: openai.OpenAI) -> None:
    made = client.evals.create(
        name="qa", data_source_config=CUSTOM, testing_criteria=[EXACT], metadata={"team": "chem"}
    )
    assert made.id.startswith("eval_") and made.name == "qa"
    config: Any = made.data_source_config.to_dict()
    assert config["schema"]["properties"]["item"] == QA_SCHEMA
    assert client.evals.retrieve(made.id).testing_criteria[0].name == "exact"
    assert made.id in [e.id for e in client.evals.list(limit=100, order="desc")]
    renamed = client.evals.update(made.id, name="qa v2", metadata={"team": "bio"})
    assert renamed.name == "qa v2" and renamed.metadata == {"team": "bio"}
    assert client.evals.delete(made.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.evals.retrieve(made.id)


def test_graders_over_given_samples(client: openai.OpenAI) -> None:
    """A jsonl run with its own samples: every grader, and a reason per result."""
    ev = client.evals.create(
        data_source_config=CUSTOM,
        testing_criteria=[
            EXACT,
            {
                "type": "text_similarity",
                "name": "close",
                "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}",
                "evaluation_metric": "fuzzy_match",
                "pass_threshold": 0.8,
            },
            {
                "type": "text_similarity",
                "name": "rouge",
                "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}",
                "evaluation_metric": "rouge_l",
                "pass_threshold": 0.6,  # '{"a": 2}' vs '{"a": 1}' shares half its words
            },
            {  # type: ignore[list-item]
                "type": "json_schema",
                "name": "is json",
                "input": "{{sample.output_text}}",
                "schema": {"type": "object", "required": ["a"]},
            },
        ],
    )
    content = [
        {"item": {"question": "q", "answer": '{"a": 1}'}, "sample": {"output_text": '{"a": 1}'}},
        {"item": {"question": "q", "answer": '{"a": 1}'}, "sample": {"output_text": '{"a": 2}'}},
        {"item": {"question": "q", "answer": "amber"}, "sample": {"output_text": "basil"}},
    ]
    run = client.evals.runs.create(ev.id, data_source=given(content))
    done = finished(client, ev.id, run.id)
    assert done.status == "completed"
    assert (done.result_counts.total, done.result_counts.passed) == (3, 1)
    per = {r.testing_criteria: (r.passed, r.failed) for r in done.per_testing_criteria_results}
    assert per == {"exact": (1, 2), "close": (2, 1), "rouge": (1, 2), "is json": (2, 1)}
    failed = list(client.evals.runs.output_items.list(run.id, eval_id=ev.id, status="fail"))
    assert sorted(i.datasource_item_id for i in failed) == [1, 2]
    one = client.evals.runs.output_items.retrieve(failed[0].id, eval_id=ev.id, run_id=run.id)
    assert one.results and all("reason" in (r.sample or {}) for r in one.results)


def test_smiles_match_compares_molecules_not_strings(client: openai.OpenAI) -> None:
    ev = client.evals.create(
        data_source_config={
            "type": "custom",
            "item_schema": {"type": "object", "properties": {"smiles": {"type": "string"}}},
        },
        testing_criteria=[
            {  # type: ignore[list-item]
                "type": "smiles_match",
                "name": "same molecule",
                "input": "{{sample.output_text}}",
                "reference": "{{item.smiles}}",
            }
        ],
    )
    pairs = [("OCC", "CCO"), ("C1=CC=CC=C1", "c1ccccc1"), ("CCN", "CCO"), ("not a molecule", "CCO")]
    content = [{"item": {"smiles": ref}, "sample": {"output_text": got}} for got, ref in pairs]
    run = client.evals.runs.create(ev.id, data_source=given(content))
    done = finished(client, ev.id, run.id)
    outcome = {
        i.datasource_item_id: i.status
        for i in client.evals.runs.output_items.list(run.id, eval_id=ev.id)
    }
    assert outcome == {0: "pass", 1: "pass", 2: "fail", 3: "fail"}, done


def test_the_retrieval_grader_scores_hits_and_ranks(client: openai.OpenAI) -> None:
    store = client.vector_stores.create(name="eval-retrieval")
    docs = {
        "caffeine.md": b"Caffeine is the stimulant in coffee and tea that keeps people awake.",
        "aspirin.md": b"Aspirin, acetylsalicylic acid, relieves pain and reduces fever.",
    }
    ids = {}
    for name, text in docs.items():
        done = client.vector_stores.files.upload_and_poll(
            vector_store_id=store.id, file=(name, text), poll_interval_ms=200
        )
        assert done.status == "completed"
        ids[name] = done.id
    search = {"type": "retrieval", "vector_store_id": store.id, "query": "{{item.q}}"}
    ev = client.evals.create(
        data_source_config={
            "type": "custom",
            "item_schema": {
                "type": "object",
                "properties": {"q": {"type": "string"}, "file": {"type": "string"}},
            },
        },
        testing_criteria=[
            {**search, "name": "top hit", "expected": "{{item.file}}", "k": 1},  # type: ignore[list-item]
            {**search, "name": "rank", "expected": "{{item.file}}", "k": 2, "metric": "mrr"},  # type: ignore[list-item]
        ],
    )
    content = [
        {"item": {"q": "what keeps you awake in coffee", "file": ids["caffeine.md"]}},
        {"item": {"q": "a drug against pain and fever", "file": ids["aspirin.md"]}},
        {"item": {"q": "what keeps you awake in coffee", "file": ids["aspirin.md"]}},
    ]
    run = client.evals.runs.create(ev.id, data_source=given(content))
    finished(client, ev.id, run.id)
    scores = {
        i.datasource_item_id: [(r.name, r.score) for r in i.results]
        for i in client.evals.runs.output_items.list(run.id, eval_id=ev.id)
    }
    assert scores == {
        0: [("top hit", 1.0), ("rank", 1.0)],
        1: [("top hit", 1.0), ("rank", 1.0)],
        2: [("top hit", 0.0), ("rank", 0.5)],
    }
    with pytest.raises(openai.BadRequestError) as err:
        client.evals.create(
            data_source_config=ev.data_source_config.to_dict(),  # type: ignore[arg-type]
            testing_criteria=[{**search, "vector_store_id": "vs_unknown", "expected": "x"}],  # type: ignore[list-item]
        )
    assert err.value.param == "testing_criteria[0].vector_store_id"
    client.vector_stores.delete(store.id)


def test_a_model_is_sampled_through_the_gateway(client: openai.OpenAI) -> None:
    ev = client.evals.create(data_source_config=CUSTOM, testing_criteria=[SAID_SOMETHING])
    run = client.evals.runs.create(ev.id, data_source=sampled(DENSE, items(6)))
    done = finished(client, ev.id, run.id)
    assert done.status == "completed" and done.result_counts.total == 6
    usage = {u.model_name: u for u in done.per_model_usage}
    assert usage[DENSE].invocation_count == 6 and usage[DENSE].completion_tokens > 0
    out = list(client.evals.runs.output_items.list(run.id, eval_id=ev.id))
    assert all(i.sample.model == DENSE and i.sample.output for i in out)


def test_stored_responses_are_graded_and_resampled(client: openai.OpenAI) -> None:
    """The `responses` data source: stored responses picked by metadata and graded as answered,
    then the same inputs sampled again through the Responses API (not stored again)."""
    tag = uuid.uuid4().hex[:12]
    made = [
        client.responses.create(
            model=DENSE,
            input=f"Name element {i}.",
            max_output_tokens=6,
            store=True,
            metadata={"suite": tag},
        )
        for i in range(3)
    ]
    for r in made:
        kept_response(client, r.id)
    ev = client.evals.create(
        data_source_config={"type": "logs", "metadata": {"suite": tag}},
        testing_criteria=[
            {
                "type": "string_check",
                "name": "as answered",
                "input": "{{sample.output_text}}",
                "reference": "{{item.output_text}}",
                "operation": "eq",
            }
        ],
    )
    source: Any = {"type": "responses", "metadata": {"suite": tag}}
    run = client.evals.runs.create(ev.id, data_source={"type": "responses", "source": source})
    done = finished(client, ev.id, run.id)
    assert done.status == "completed" and done.result_counts.passed == 3
    out = list(client.evals.runs.output_items.list(run.id, eval_id=ev.id))
    assert sorted(str(i.datasource_item["response_id"]) for i in out) == sorted(r.id for r in made)
    resampled: Any = {
        "type": "responses",
        "model": DENSE,
        "input_messages": {"type": "item_reference", "item_reference": "item.input"},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 6},
        "source": source,
    }
    run = client.evals.runs.create(ev.id, data_source=resampled)
    done = finished(client, ev.id, run.id)
    assert done.status == "completed" and done.result_counts.total == 3
    usage = {u.model_name: u for u in done.per_model_usage}
    assert usage[DENSE].invocation_count == 3 and usage[DENSE].completion_tokens > 0
    out = list(client.evals.runs.output_items.list(run.id, eval_id=ev.id))
    assert all(i.sample.model == DENSE and i.sample.output for i in out)
    # The evaluation's own calls were not stored: the source still holds the three.
    again = client.evals.runs.create(ev.id, data_source={"type": "responses", "source": source})
    assert finished(client, ev.id, again.id).result_counts.total == 3


def test_a_judge_that_answers_nonsense_errors_the_item(client: openai.OpenAI) -> None:
    """The dev model has random weights: as a label judge it never answers a label."""
    ev = client.evals.create(
        data_source_config=CUSTOM,
        testing_criteria=[
            {
                "type": "label_model",
                "name": "judge",
                "model": DENSE,
                "input": [{"role": "user", "content": "Is {{item.answer}} right?"}],
                "labels": ["correct", "incorrect"],
                "passing_labels": ["correct"],
            }
        ],
    )
    content = [{"item": {"question": "q", "answer": "a"}, "sample": {"output_text": "a"}}]
    run = client.evals.runs.create(ev.id, data_source=given(content))
    done = finished(client, ev.id, run.id)
    assert done.status == "completed" and done.result_counts.errored == 1
    errored: Any = "error"  # Crucible's third status (the SDK's types know pass and fail)
    [item] = client.evals.runs.output_items.list(run.id, eval_id=ev.id, status=errored)
    assert "not one of the labels" in str(item.results[0].sample)


@pytest.mark.parametrize(
    ("criteria", "param"),
    [
        (
            [{**EXACT, "type": "python", "source": "def grade(s, i): return 1"}],
            "testing_criteria[0].type",
        ),
        ([{**EXACT, "reference": "{{item.nonexistent}}"}], "testing_criteria[0]"),
        ([{**EXACT, "input": "{{sample.bogus}}"}], "testing_criteria[0]"),
        ([{**EXACT, "name": f"c{i}"} for i in range(21)], "testing_criteria"),
        ([{**EXACT, "reference": "x" * (65 << 10)}], "testing_criteria[0]"),
        ([{**EXACT, "operation": "sounds_like"}], "testing_criteria[0].operation"),
        (
            [
                {
                    "type": "label_model",
                    "name": "j",
                    "model": "no-such-judge",
                    "input": [{"role": "user", "content": "?"}],
                    "labels": ["a"],
                    "passing_labels": ["a"],
                }
            ],
            "testing_criteria[0].model",
        ),
    ],
)
def test_bad_evals_are_refused_naming_the_param(
    client: openai.OpenAI, criteria: list[Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.evals.create(data_source_config=CUSTOM, testing_criteria=criteria)
    assert err.value.param == param, err.value.message


def test_bad_runs_are_refused_with_the_line(client: openai.OpenAI) -> None:
    ev = client.evals.create(data_source_config=CUSTOM, testing_criteria=[EXACT])
    content = items(4)
    content[2] = {"item": {"question": "no answer"}}
    with pytest.raises(openai.BadRequestError) as err:
        client.evals.runs.create(
            ev.id,
            data_source=given(content),
        )
    assert "item 3" in err.value.message and "answer" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.evals.runs.create(ev.id, data_source=sampled(DENSE, items(10_001)))
    assert "10000" in err.value.message.replace(",", "")
    with pytest.raises(openai.BadRequestError) as err:
        client.evals.runs.create(ev.id, data_source=sampled("no-such-model", items(1)))
    assert err.value.param == "data_source.model"
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.create("eval_unknown", data_source=sampled(DENSE, items(1)))


def test_a_cancelled_run_stops_within_seconds(client: openai.OpenAI) -> None:
    ev = client.evals.create(data_source_config=CUSTOM, testing_criteria=[SAID_SOMETHING])
    run = client.evals.runs.create(ev.id, data_source=sampled(DENSE, items(300), max_tokens=32))
    deadline = time.monotonic() + 60
    while client.evals.runs.retrieve(run.id, eval_id=ev.id).result_counts.total == 0:
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.2)
    asked = time.monotonic()
    client.evals.runs.cancel(run.id, eval_id=ev.id)
    done = finished(client, ev.id, run.id, timeout=15)
    assert done.status == "canceled" and time.monotonic() - asked < 10
    assert done.result_counts.total < 300


def test_a_run_survives_a_worker_kill_and_grades_each_item_once(
    client: openai.OpenAI, stack: Stack
) -> None:
    ev = client.evals.create(data_source_config=CUSTOM, testing_criteria=[SAID_SOMETHING])
    n = 300  # long enough (seconds on the dev model) to be killed in the middle
    run = client.evals.runs.create(ev.id, data_source=sampled(DENSE, items(n), max_tokens=32))
    deadline = time.monotonic() + 60
    while client.evals.runs.retrieve(run.id, eval_id=ev.id).result_counts.total < 5:
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.1)
    pid = stack.pid("eval-worker")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    seen = client.evals.runs.retrieve(run.id, eval_id=ev.id).result_counts.total
    assert seen < n, "the run ended before the kill"
    done = finished(client, ev.id, run.id, timeout=240)
    assert done.status == "completed"
    out = list(client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100))
    assert sorted(i.datasource_item_id for i in out) == list(range(n))  # each once
    assert done.result_counts.total == n


def test_another_owner_sees_no_eval_run_or_item(
    client: openai.OpenAI, gateway_url: str, keys: KeyStore
) -> None:
    ev = client.evals.create(data_source_config=CUSTOM, testing_criteria=[EXACT])
    content = [{"item": {"question": "q", "answer": "a"}, "sample": {"output_text": "a"}}]
    run = client.evals.runs.create(ev.id, data_source=given(content))
    finished(client, ev.id, run.id)
    [item] = client.evals.runs.output_items.list(run.id, eval_id=ev.id)
    secret, _ = keys.create("stranger-evals")
    other = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=secret, max_retries=0)
    assert ev.id not in [e.id for e in other.evals.list(limit=100)]
    for call in (
        lambda: other.evals.retrieve(ev.id),
        lambda: other.evals.update(ev.id, name="mine"),
        lambda: other.evals.delete(ev.id),
        lambda: other.evals.runs.list(ev.id),
        lambda: other.evals.runs.retrieve(run.id, eval_id=ev.id),
        lambda: other.evals.runs.cancel(run.id, eval_id=ev.id),
        lambda: other.evals.runs.delete(run.id, eval_id=ev.id),
        lambda: other.evals.runs.output_items.list(run.id, eval_id=ev.id),
        lambda: other.evals.runs.output_items.retrieve(item.id, eval_id=ev.id, run_id=run.id),
        lambda: other.evals.runs.create(ev.id, data_source=sampled(DENSE, items(1))),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert client.evals.retrieve(ev.id).name == "eval"

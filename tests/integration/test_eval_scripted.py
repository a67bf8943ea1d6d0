"""Evaluations whose model answers from a script (tests/fakes), behind a real gateway, finetune
service, eval worker and agent: judges (label_model, score_model) decide as scripted, and an
agent configuration (model, tools, budgets) is sampled like a model. The dev model answers at
random, so verdicts can only be checked against a scripted one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.e2e.test_evals import finished
from tests.integration.conftest import Lifecycle

Env = Lifecycle

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
QA: Any = {
    "type": "custom",
    "item_schema": {
        "type": "object",
        "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
        "required": ["question", "answer"],
    },
    "include_sample_schema": True,
}


@pytest.fixture(scope="module")
def env(lifecycle: Lifecycle) -> Lifecycle:
    return lifecycle


@pytest.fixture(scope="module")
def client(env: Env) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"{env.gw.url}/v1", api_key=env.key, max_retries=0)
    yield c
    c.close()


def given(*answers: str) -> Any:
    content = [
        {"item": {"question": f"q{i}", "answer": a}, "sample": {"output_text": a}}
        for i, a in enumerate(answers)
    ]
    return {"type": "jsonl", "source": {"type": "file_content", "content": content}}


def outcomes(client: openai.OpenAI, eval_id: str, run_id: str) -> list[tuple[str, Any]]:
    out = sorted(
        client.evals.runs.output_items.list(run_id, eval_id=eval_id),
        key=lambda i: i.datasource_item_id,
    )
    return [(i.status, i.results[0]) for i in out]


def test_a_label_judge_decides_each_item(env: Env, client: openai.OpenAI) -> None:
    ev = client.evals.create(
        data_source_config=QA,
        testing_criteria=[
            {
                "type": "label_model",
                "name": "judge",
                "model": "scripted",
                "input": [{"role": "user", "content": "Is {{sample.output_text}} right?"}],
                "labels": ["correct", "incorrect"],
                "passing_labels": ["correct"],
            }
        ],
    )
    env.script(
        {"content": "correct"}, {"content": '{"label": "incorrect"}'}, {"content": "who knows"}
    )
    run = client.evals.runs.create(ev.id, data_source=given("Au", "Ag", "Cu"))
    done = finished(client, ev.id, run.id)
    counts = done.result_counts
    assert (counts.passed, counts.failed, counts.errored) == (1, 1, 1)
    got = outcomes(client, ev.id, run.id)
    assert [s for s, _ in got] == ["pass", "fail", "error"]
    assert got[0][1].sample["label"] == "correct"
    assert "not one of the labels" in got[2][1].sample["error"]
    asked = env.seen()
    assert [r["messages"][0]["content"] for r in asked] == [
        "Is Au right?",
        "Is Ag right?",
        "Is Cu right?",
    ]
    assert all(r["max_completion_tokens"] == 64 and r["store"] is False for r in asked)
    usage = {u.model_name: u for u in done.per_model_usage}
    assert usage["scripted"].invocation_count == 3


def test_a_score_judge_passes_at_its_threshold(env: Env, client: openai.OpenAI) -> None:
    ev = client.evals.create(
        data_source_config=QA,
        testing_criteria=[
            {
                "type": "score_model",
                "name": "score",
                "model": "scripted",
                "input": [{"role": "user", "content": "Score {{sample.output_text}}."}],
                "range": [0, 1],
                "pass_threshold": 0.5,
            }
        ],
    )
    env.script({"content": "0.9"}, {"content": '{"score": 0.2}'}, {"content": "7"})
    run = client.evals.runs.create(ev.id, data_source=given("a", "b", "c"))
    finished(client, ev.id, run.id)
    got = outcomes(client, ev.id, run.id)
    assert [s for s, _ in got] == ["pass", "fail", "error"]
    assert [r.score for _, r in got[:2]] == [0.9, 0.2]
    assert "outside [0, 1]" in got[2][1].sample["error"]


AGENT: Any = {
    "type": "custom",
    "item_schema": {
        "type": "object",
        "properties": {"smiles": {"type": "string"}, "formula": {"type": "string"}},
        "required": ["smiles", "formula"],
    },
    "include_sample_schema": True,
}


def agent_run(config: dict[str, Any], n: int = 2) -> Any:
    return {
        "type": "completions",
        "model": "scripted",
        "agent": config,
        "input_messages": {
            "type": "template",
            "template": [{"role": "user", "content": "What is the formula of {{item.smiles}}?"}],
        },
        "source": {
            "type": "file_content",
            "content": [{"item": {"smiles": ASPIRIN, "formula": "C9H8O4"}}] * n,
        },
    }


def act(action: str, **arguments: Any) -> dict[str, Any]:
    return {"content": json.dumps({"action": action, "arguments": arguments})}


def final(answer: str) -> dict[str, Any]:
    return {"content": json.dumps({"action": "final_answer", "answer": answer, "citations": []})}


def test_an_agent_configuration_is_sampled_as_the_key(env: Env, client: openai.OpenAI) -> None:
    ev = client.evals.create(
        data_source_config=AGENT,
        testing_criteria=[
            {
                "type": "string_check",
                "name": "formula",
                "input": "{{sample.output_text}}",
                "reference": "{{item.formula}}",
                "operation": "like",
            }
        ],
    )
    env.script(
        act("molecule_info", smiles=ASPIRIN),
        final("Aspirin is C9H8O4."),
        final("I cannot say."),
    )
    config = {"tools": ["molecule_info"], "budgets": {"max_steps": 3}}
    run = client.evals.runs.create(ev.id, data_source=agent_run(config))
    done = finished(client, ev.id, run.id)
    assert (done.result_counts.passed, done.result_counts.failed) == (1, 1)
    out = sorted(
        client.evals.runs.output_items.list(run.id, eval_id=ev.id),
        key=lambda i: i.datasource_item_id,
    )
    first: Any = out[0].sample
    assert first.output_tools == [{"name": "molecule_info", "arguments": {"smiles": ASPIRIN}}]
    # The agent ran as the run's key: its run is the key owner's, with the run's budgets.
    agent: Any = client.get(f"/agent/runs/{first.agent_run_id}", cast_to=object)
    assert agent["status"] == "completed" and agent["budgets"]["max_steps"] == 3
    # The model saw the tool's result (RDKit's formula) before answering.
    assert "C9H8O4" in json.dumps(env.seen()[1]["messages"])
    usage = {u.model_name: u for u in done.per_model_usage}
    assert usage["scripted"].invocation_count == 2 and usage["scripted"].prompt_tokens > 0
    other = openai.OpenAI(base_url=f"{env.gw.url}/v1", api_key=env.other_key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.get(f"/agent/runs/{first.agent_run_id}", cast_to=object)
    other.close()


@pytest.mark.parametrize(
    ("config", "param"),
    [
        ({"tools": ["shell"]}, "data_source.agent.tools"),
        ({"budgets": {"max_steps": -1}}, "data_source.agent.budgets"),
        ({"tools": ["search_documents"]}, "data_source.agent.vector_store_ids"),
        ({"vector_store_ids": ["vs_nope"]}, "data_source.agent.vector_store_ids"),
        ({"temperature": 2}, "data_source.agent.temperature"),
    ],
)
def test_a_bad_agent_configuration_is_refused_at_create(
    client: openai.OpenAI, config: dict[str, Any], param: str
) -> None:
    ev = client.evals.create(
        data_source_config=AGENT,
        testing_criteria=[
            {
                "type": "string_check",
                "name": "x",
                "input": "{{sample.output_text}}",
                "reference": "{{item.formula}}",
                "operation": "eq",
            }
        ],
    )
    with pytest.raises(openai.BadRequestError) as err:
        client.evals.runs.create(ev.id, data_source=agent_run(config, 1))
    assert err.value.param == param, err.value.message

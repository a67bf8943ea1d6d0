"""The graders on their own: templates, every built-in check, and judge models scripted at the
boundary the eval worker calls them through (the dev model answers at random, so the judges'
happy paths are tested here; tests/e2e/test_evals.py runs a real nonsense-answering one)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.finetune.graders import GradeError, grade, render

ITEM = {"question": "Colour of zorblat?", "answer": "amber", "nested": {"n": 3}}


def scripted(answer: str) -> Any:
    calls: list[Any] = []

    async def chat(model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> Any:
        calls.append((model, messages))
        return {"choices": [{"message": {"role": "assistant", "content": answer}}]}

    chat.calls = calls  # type: ignore[attr-defined]
    return chat


async def no_molecule(_: str) -> str | None:
    return None


async def no_search(*_: Any) -> list[dict[str, Any]]:
    return []


def run(criterion: dict[str, Any], output: str, chat: Any = None, search: Any = None) -> Any:
    c = {"name": "c", **criterion}
    sample = {"output_text": output}
    return asyncio.run(
        grade(c, ITEM, sample, chat or scripted(""), no_molecule, search or no_search)
    )


def test_templates_read_items_samples_and_nested_fields() -> None:
    text = "{{item.question}} {{ sample.output_text }} {{item.nested.n}} {{item.missing}}!"
    assert render(text, ITEM, {"output_text": "amber"}) == "Colour of zorblat? amber 3 !"
    assert render("{{item.nested}}", ITEM, None) == '{"n": 3}'


@pytest.mark.parametrize(
    ("operation", "output", "passed"),
    [
        ("eq", "amber", True),
        ("eq", "Amber", False),
        ("ne", "basil", True),
        ("like", "it is amber.", True),
        ("like", "it is Amber.", False),
        ("ilike", "it is AMBER.", True),
    ],
)
def test_string_check(operation: str, output: str, passed: bool) -> None:
    c = {"type": "string_check", "operation": operation}
    result = run({**c, "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}, output)
    assert result["passed"] is passed and result["score"] == float(passed)


@pytest.mark.parametrize(
    ("metric", "output", "low", "high"),
    [
        ("fuzzy_match", "amber", 1.0, 1.0),
        ("fuzzy_match", "ambre", 0.5, 0.9),
        ("bleu", "the colour is amber today", 0.0, 0.2),
        ("rouge_1", "amber", 1.0, 1.0),
        ("rouge_l", "basil", 0.0, 0.0),
    ],
)
def test_text_similarity(metric: str, output: str, low: float, high: float) -> None:
    c = {"type": "text_similarity", "evaluation_metric": metric, "pass_threshold": 0.95}
    result = run({**c, "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}, output)
    assert low <= result["score"] <= high
    assert result["passed"] is (result["score"] >= 0.95)


def test_json_schema() -> None:
    c = {"type": "json_schema", "input": "{{sample.output_text}}"}
    c["schema"] = {"type": "object", "required": ["smiles"]}  # type: ignore[assignment]
    assert run(c, '{"smiles": "CCO"}')["passed"]
    wrong = run(c, '{"name": "ethanol"}')
    assert not wrong["passed"] and "smiles" in wrong["sample"]["reason"]
    assert run(c, "not json")["sample"]["reason"] == "the output is not JSON"


LABEL = {
    "type": "label_model",
    "model": "judge",
    "input": [{"role": "user", "content": "Is {{sample.output_text}} the answer {{item.answer}}?"}],
    "labels": ["correct", "incorrect"],
    "passing_labels": ["correct"],
}


def test_a_label_judge_is_asked_with_the_templates_filled_and_its_label_decides() -> None:
    judge = scripted("correct")
    result = run(LABEL, "amber", judge)
    assert result["passed"] and result["sample"]["label"] == "correct"
    model, messages = judge.calls[0]
    assert model == "judge" and messages[0]["content"] == "Is amber the answer amber?"
    assert not run(LABEL, "basil", scripted('{"label": "incorrect"}'))["passed"]


def test_a_judge_answering_nonsense_is_an_error_not_a_verdict() -> None:
    with pytest.raises(GradeError, match="not one of the labels"):
        run(LABEL, "amber", scripted("perhaps"))
    score = {"type": "score_model", "model": "judge", "input": LABEL["input"]}
    with pytest.raises(GradeError, match="not a score"):
        run({**score, "range": [0, 1]}, "amber", scripted("very good"))
    with pytest.raises(GradeError, match="outside"):
        run({**score, "range": [0, 1]}, "amber", scripted("7"))
    passed = run(
        {**score, "range": [0, 10], "pass_threshold": 6}, "amber", scripted('{"score": 7}')
    )
    assert passed["passed"] and passed["score"] == 7.0


def test_retrieval_hit_and_reciprocal_rank() -> None:
    async def search(store: str, query: str, k: int) -> list[dict[str, Any]]:
        assert store == "vs_1" and query == "Colour of zorblat?"
        hits = [
            {"file_id": "file-a", "content": [{"type": "text", "text": "basil is green"}]},
            {"file_id": "file-b", "content": [{"type": "text", "text": "zorblat is amber"}]},
        ]
        return hits[:k]

    c = {"type": "retrieval", "vector_store_id": "vs_1", "query": "{{item.question}}"}
    assert run({**c, "expected": "file-b", "k": 1}, "", search=search)["score"] == 0.0
    assert run({**c, "expected": "file-b", "k": 2}, "", search=search)["passed"]
    by_text = run({**c, "expected": "{{item.answer}}", "k": 2, "metric": "mrr"}, "", search=search)
    assert by_text["score"] == 0.5 and by_text["passed"]

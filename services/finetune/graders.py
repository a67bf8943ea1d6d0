"""Graders: OpenAI's (string_check, text_similarity, label_model, score_model) and the lab's
(json_schema, smiles_match, retrieval). Each takes a criterion, the item and the sample, and
returns OpenAI's result object (`name`, `type`, `score`, `passed`, `sample` with the reason).

A grader that cannot judge (a judge model that answers nonsense, a model call that failed)
raises `GradeError`: the item is `error`, never a crash of the run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import jsonschema
from rapidfuzz import fuzz

from services.finetune.evalspec import TEMPLATE_RE

Chat = Callable[[str, list[dict[str, Any]], dict[str, Any]], Awaitable[dict[str, Any]]]
Canonical = Callable[[str], Awaitable[str | None]]
Search = Callable[[str, str, int], Awaitable[list[dict[str, Any]]]]


class GradeError(Exception):
    """The grader could not reach a verdict (the item is `error`)."""


def lookup(path: str, scope: dict[str, Any]) -> Any:
    value: Any = scope
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def render(template: str, item: dict[str, Any], sample: dict[str, Any] | None) -> str:
    """`{{item.x}}` and `{{sample.output_text}}` replaced by their values (objects as JSON)."""
    scope = {"item": item, "sample": sample or {}}

    def value(m: re.Match[str]) -> str:
        found = lookup(m.group(1) + m.group(2), scope)
        if found is None:
            return ""
        return found if isinstance(found, str) else json.dumps(found)

    return TEMPLATE_RE.sub(value, template)


def render_messages(
    messages: list[dict[str, Any]], item: dict[str, Any], sample: dict[str, Any] | None
) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, dict):  # OpenAI's EvalItem content: {"type": "input_text", ...}
            content = content.get("text", "")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({"role": m.get("role", "user"), "content": render(str(content), item, sample)})
    return out


def _result(c: dict[str, Any], score: float, passed: bool, **why: Any) -> dict[str, Any]:
    return {"name": c["name"], "type": c["type"], "score": score, "passed": passed, "sample": why}


def string_check(c: dict[str, Any], got: str, want: str) -> dict[str, Any]:
    op = c["operation"]
    passed = {
        "eq": got == want,
        "ne": got != want,
        "like": want in got,
        "ilike": want.lower() in got.lower(),
    }[op]
    return _result(c, float(passed), passed, reason=f"{got[:200]!r} {op} {want[:200]!r}")


_ROUGE: dict[str, Any] = {}


def similarity(metric: str, got: str, want: str) -> float:
    if metric == "fuzzy_match":
        return float(fuzz.ratio(got, want)) / 100
    if metric == "bleu":
        import sacrebleu

        return float(sacrebleu.sentence_bleu(got, [want]).score) / 100
    from rouge_score import rouge_scorer

    name = {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_l": "rougeL"}[metric]
    scorer = _ROUGE.get(name) or _ROUGE.setdefault(name, rouge_scorer.RougeScorer([name]))
    return float(scorer.score(want, got)[name].fmeasure)


def text_similarity(c: dict[str, Any], got: str, want: str) -> dict[str, Any]:
    score = similarity(c["evaluation_metric"], got, want)
    passed = score >= float(c["pass_threshold"])
    return _result(c, score, passed, reason=f"{c['evaluation_metric']} {score:.3f}")


def json_schema(c: dict[str, Any], got: str) -> dict[str, Any]:
    try:
        value = json.loads(got)
    except ValueError:
        return _result(c, 0.0, False, reason="the output is not JSON")
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(c["schema"]).iter_errors(value)
    )
    if error is None:
        return _result(c, 1.0, True, reason="valid")
    return _result(c, 0.0, False, reason=error.message[:300])


def _answer(response: dict[str, Any]) -> str:
    choices = response.get("choices") or [{}]
    return str((choices[0].get("message") or {}).get("content") or "").strip()


def _parsed(text: str) -> Any:
    match = re.search(r"\{.*\}", text, re.S)
    if match:
        try:
            return json.loads(match.group(0))
        except ValueError:
            pass
    return None


def judge_params(c: dict[str, Any]) -> dict[str, Any]:
    """A judge answers one label or one number: 64 tokens unless the criterion says more."""
    params = dict(c.get("sampling_params") or {})
    if "max_completion_tokens" not in params and "max_tokens" not in params:
        params["max_completion_tokens"] = 64
    return params


async def label_model(
    c: dict[str, Any], item: dict[str, Any], sample: dict[str, Any] | None, chat: Chat
) -> dict[str, Any]:
    labels = [str(x) for x in c["labels"]]
    messages = render_messages(c["input"], item, sample)
    messages.append(
        {
            "role": "system",
            "content": f"Answer with exactly one of these labels: {', '.join(labels)}.",
        }
    )
    answer = _answer(await chat(c["model"], messages, judge_params(c)))
    parsed = _parsed(answer)
    label = parsed.get("label") if isinstance(parsed, dict) else answer.strip().strip(".\"'")
    if label not in labels:
        raise GradeError(f"the judge answered {answer[:200]!r}, not one of the labels {labels}")
    passed = label in c["passing_labels"]
    return _result(c, float(passed), passed, label=label, reason=f"judged {label!r}")


async def score_model(
    c: dict[str, Any], item: dict[str, Any], sample: dict[str, Any] | None, chat: Chat
) -> dict[str, Any]:
    low, high = (c.get("range") or [0, 1])[:2]
    messages = render_messages(c["input"], item, sample)
    messages.append(
        {
            "role": "system",
            "content": f"Answer with a score from {low} to {high}, and nothing else.",
        }
    )
    answer = _answer(await chat(c["model"], messages, judge_params(c)))
    parsed = _parsed(answer)
    raw = parsed.get("score") if isinstance(parsed, dict) else answer
    try:
        score = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise GradeError(f"the judge answered {answer[:200]!r}, not a score") from None
    if not low <= score <= high:
        raise GradeError(f"the judge's score {score} is outside [{low}, {high}]")
    threshold = c.get("pass_threshold")
    passed = score >= float(threshold) if threshold is not None else True
    return _result(c, score, passed, reason=f"scored {score}")


def _holds(hit: dict[str, Any], expected: str) -> bool:
    """A search result is the expected one: its file id, or a passage containing the text."""
    if hit.get("file_id") == expected:
        return True
    text = " ".join(
        str(part.get("text", "")) for part in hit.get("content") or [] if isinstance(part, dict)
    )
    return len(expected) > 3 and expected.lower() in text.lower()


async def retrieval(
    c: dict[str, Any], item: dict[str, Any], sample: dict[str, Any] | None, search: Search
) -> dict[str, Any]:
    """Hit@k or reciprocal rank of a vector-store search for `query` against `expected`."""
    k = int(c.get("k") or 5)
    query = render(c["query"], item, sample)
    expected = render(c["expected"], item, sample)
    hits = await search(c["vector_store_id"], query, k)
    rank = next((i for i, hit in enumerate(hits[:k], start=1) if _holds(hit, expected)), None)
    metric = c.get("metric") or "hit"
    score = (1.0 if rank else 0.0) if metric == "hit" else (1.0 / rank if rank else 0.0)
    threshold = float(c.get("pass_threshold") or (1.0 if metric == "hit" else 1e-9))
    where = f"rank {rank} of {len(hits)}" if rank else f"not in the top {k}"
    return _result(c, score, score >= threshold, reason=f"{expected[:100]!r}: {where}")


async def grade(
    c: dict[str, Any],
    item: dict[str, Any],
    sample: dict[str, Any] | None,
    chat: Chat,
    canonical: Canonical,
    search: Search,
) -> dict[str, Any]:
    kind = c["type"]
    if kind == "retrieval":
        return await retrieval(c, item, sample, search)
    if kind == "label_model":
        return await label_model(c, item, sample, chat)
    if kind == "score_model":
        return await score_model(c, item, sample, chat)
    got = render(c["input"], item, sample)
    if kind == "json_schema":
        return json_schema(c, got)
    want = render(c["reference"], item, sample)
    if kind == "string_check":
        return string_check(c, got, want)
    if kind == "text_similarity":
        return text_similarity(c, got, want)
    if kind == "smiles_match":
        a, b = await canonical(got.strip()), await canonical(want.strip())
        if b is None:
            raise GradeError(f"the reference {want[:200]!r} is not a molecule")
        passed = a == b
        reason = f"{a or 'not a molecule'} vs {b}"
        return _result(c, float(passed), passed, reason=reason)
    raise GradeError(f"unknown grader {kind!r}")

"""Training files are checked line by line; the batch schedule is reproducible."""

from __future__ import annotations

import json

import pytest

from services.finetune.training import auto_epochs, latest_checkpoint, schedule
from services.finetune.validation import TrainingFileError, parse

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
PAIR = {"prompt": "2+2=", "completion": "4"}


def jsonl(*rows: object) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


def test_both_formats_parse() -> None:
    assert len(parse(jsonl(*[CHAT] * 10))) == 10
    assert len(parse(jsonl(*[PAIR] * 10, ""))) == 10  # blank lines are fine


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        (json.dumps({"messages": []}), "non-empty list"),
        (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), "role must be"),
        (json.dumps({"messages": [{"role": "user", "content": 3}]}), "content must be"),
        (
            json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
            "assistant message",
        ),
        (json.dumps({"prompt": "p"}), "`completion` must be"),
        (json.dumps({"text": "x"}), "expected `messages`"),
    ],
)
def test_each_error_names_its_line(line: str, needle: str) -> None:
    with pytest.raises(TrainingFileError) as err:
        parse(jsonl(*[CHAT] * 5, line, *[CHAT] * 5))
    assert f"line 6: {needle}" in str(err.value) or (
        "line 6" in str(err.value) and needle in str(err.value)
    )


def test_every_bad_line_is_reported_not_just_the_first() -> None:
    with pytest.raises(TrainingFileError) as err:
        parse(jsonl("{", *[CHAT] * 10, "[]"))
    assert [e.split(":")[0] for e in err.value.errors] == ["line 1", "line 12"]


def test_mixed_formats_and_too_few_examples_are_refused() -> None:
    with pytest.raises(TrainingFileError, match="mixes"):
        parse(jsonl(*[CHAT] * 6, *[PAIR] * 6))
    with pytest.raises(TrainingFileError, match="at least 10"):
        parse(jsonl(*[CHAT] * 3))


def test_the_schedule_is_a_pure_function_of_its_arguments() -> None:
    a = schedule(20, 8, 5, seed=3)
    assert a == schedule(20, 8, 5, seed=3) and a != schedule(20, 8, 5, seed=4)
    assert len(a) == 5 * 3
    for epoch in range(5):  # each epoch sees every example once
        seen = sorted(i for batch in a[epoch * 3 : epoch * 3 + 3] for i in batch)
        assert seen == list(range(20))


def test_auto_epochs_gives_small_datasets_more_passes() -> None:
    assert auto_epochs(20) > auto_epochs(200) >= auto_epochs(100_000) == 3


def test_only_complete_checkpoints_are_resumed(tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path))
    for step, complete in ((50, True), (100, True), (150, False)):
        d = root / "checkpoints" / f"step-{step:06d}"
        d.mkdir(parents=True)
        if complete:
            (d / "COMPLETE").write_text("")
    found = latest_checkpoint(root)
    assert found is not None and found.name == "step-000100"

"""OpenAI's EvalResponsesSource filters over a stored response's request."""

from __future__ import annotations

from typing import Any

import pytest

from services.finetune.responses import responses_match

REQUEST: dict[str, Any] = {
    "model": "m",
    "instructions": "You are a careful CHEMIST.",
    "temperature": 0.2,
    "top_p": 1.0,
    "user": "ana",
    "reasoning": {"effort": "low"},
    "tools": [{"type": "function", "name": "molecule_info"}, {"type": "web_search"}],
}


@pytest.mark.parametrize(
    ("f", "matches"),
    [
        ({}, True),
        ({"metadata": {"suite": "a"}}, True),
        ({"metadata": {"suite": "b"}}, False),
        ({"instructions_search": "chemist"}, True),
        ({"instructions_search": "biologist"}, False),
        ({"temperature": 0.2, "top_p": 1.0}, True),
        ({"temperature": 0.7}, False),
        ({"reasoning_effort": "low"}, True),
        ({"reasoning_effort": "high"}, False),
        ({"users": ["bo", "ana"]}, True),
        ({"users": ["bo"]}, False),
        ({"tools": ["molecule_info", "web_search"]}, True),
        ({"tools": ["calculator"]}, False),
    ],
)
def test_every_filter_given_must_hold(f: dict[str, Any], matches: bool) -> None:
    assert responses_match(REQUEST, {"suite": "a"}, f) is matches

"""OpenAI's attribute filters: strict parsing, and the semantics users rely on."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from services.retrieval.filters import Attributes, Filter, check_attributes, matches

PARSE: TypeAdapter[Any] = TypeAdapter(Filter)
ATTRS: Attributes = {"author": "Curie", "year": 1911, "reviewed": True, "score": 4.5}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"type": "eq", "key": "author", "value": "Curie"}, True),
        ({"type": "eq", "key": "author", "value": "curie"}, False),
        ({"type": "ne", "key": "author", "value": "Pauling"}, True),
        ({"type": "gt", "key": "year", "value": 1900}, True),
        ({"type": "gte", "key": "year", "value": 1911}, True),
        ({"type": "lt", "key": "score", "value": 4.5}, False),
        ({"type": "lte", "key": "score", "value": 4.5}, True),
        ({"type": "eq", "key": "reviewed", "value": True}, True),
        ({"type": "eq", "key": "year", "value": True}, False),  # a number is not a boolean
        ({"type": "gt", "key": "author", "value": 3}, False),  # incomparable: no match
        ({"type": "in", "key": "author", "value": ["Bohr", "Curie"]}, True),
        ({"type": "nin", "key": "author", "value": ["Bohr", "Curie"]}, False),
        ({"type": "eq", "key": "missing", "value": "x"}, False),
        ({"type": "ne", "key": "missing", "value": "x"}, True),
        (
            {
                "type": "and",
                "filters": [
                    {"type": "eq", "key": "author", "value": "Curie"},
                    {"type": "lt", "key": "year", "value": 1900},
                ],
            },
            False,
        ),
        (
            {
                "type": "or",
                "filters": [
                    {"type": "eq", "key": "author", "value": "Bohr"},
                    {"type": "and", "filters": [{"type": "eq", "key": "reviewed", "value": True}]},
                ],
            },
            True,
        ),
    ],
)
def test_filter_semantics(spec: dict[str, Any], expected: bool) -> None:
    assert matches(PARSE.validate_python(spec), ATTRS) is expected


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "like", "key": "author", "value": "C%"},  # unknown operator
        {"type": "eq", "key": "author", "value": "Curie", "extra": 1},  # unknown field
        {"type": "eq", "key": "", "value": "x"},
        {"type": "eq", "key": "author", "value": {"$ne": None}},  # not a scalar
        {"type": "and", "filters": []},
        {"type": "or"},
    ],
)
def test_malformed_filters_are_rejected(spec: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PARSE.validate_python(spec)


def test_attribute_limits_follow_openai() -> None:
    assert check_attributes({"a": "x" * 512, "b": 1, "c": False}) == {
        "a": "x" * 512,
        "b": 1,
        "c": False,
    }
    for bad in ({f"k{i}": i for i in range(17)}, {"a": "x" * 513}, {"a": [1]}, {"k" * 65: 1}):
        with pytest.raises(ValueError):
            check_attributes(bad)

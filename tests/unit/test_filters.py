"""OpenAI's attribute filters: strict parsing, and the semantics users rely on."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from services.retrieval.filters import (
    Attributes,
    Filter,
    NotInEngine,
    check_attributes,
    check_size,
    compile_filter,
    matches,
)

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
    for huge in ({"a": float("nan")}, {"a": float("inf")}, {"a": 1 << 63}):
        with pytest.raises(ValueError, match=r"finite|64 bits"):
            check_attributes(huge)


HOSTILE = 'x" or owner != "y'


def test_a_filters_strings_reach_milvus_as_digests_only() -> None:
    """Equality and membership compare digests: nothing the user wrote is in the expression
    (the engine's results for such strings are checked in tests/integration)."""
    for spec in (
        {"type": "eq", "key": HOSTILE, "value": HOSTILE},
        {"type": "nin", "key": "author", "value": [HOSTILE, 'a\\"b']},
        {"type": "ne", "key": "author\n", "value": "line\nbreak"},
    ):
        expr = compile_filter(PARSE.validate_python(spec))
        assert isinstance(expr, str)
        assert "or owner" not in expr and "\\" not in expr and "\n" not in expr
        assert expr.count('"') % 2 == 0
    # Ordering needs the string itself: written only when nothing in it is syntax.
    safe = compile_filter(PARSE.validate_python({"type": "gte", "key": "d", "value": "2024-05"}))
    assert isinstance(safe, str) and safe.endswith('>= "2024-05"')
    with pytest.raises(NotInEngine):
        compile_filter(PARSE.validate_python({"type": "gt", "key": "d", "value": HOSTILE}))


def test_filters_that_admit_everything_or_nothing_fold_to_constants() -> None:
    nothing = {"type": "in", "key": "author", "value": []}
    everything = {"type": "nin", "key": "author", "value": []}
    unordered = {"type": "gt", "key": "reviewed", "value": True}  # booleans have no order
    assert compile_filter(PARSE.validate_python(nothing)) is False
    assert compile_filter(PARSE.validate_python(everything)) is True
    assert compile_filter(PARSE.validate_python(unordered)) is False
    both = {"type": "and", "filters": [everything, {"type": "eq", "key": "year", "value": 1911}]}
    assert compile_filter(PARSE.validate_python(both)) == (
        compile_filter(PARSE.validate_python({"type": "eq", "key": "year", "value": 1911.0}))
    )  # `and true` dropped; 1911.0 is 1911, as in Python
    assert compile_filter(PARSE.validate_python({"type": "or", "filters": [everything]})) is True


def test_a_filters_numbers_must_be_finite_and_fit_64_bits() -> None:
    for value in (float("inf"), 1 << 64):
        with pytest.raises(ValueError):
            check_size(PARSE.validate_python({"type": "eq", "key": "n", "value": value}))

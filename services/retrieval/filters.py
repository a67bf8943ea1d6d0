"""OpenAI's attribute filters (comparison and compound), parsed strictly and evaluated here.

Filters select files by their attributes. They are evaluated in Python over the store's file
attributes, never turned into a database expression: a filter value cannot inject anything,
and the owner's scope is applied before a filter is looked at.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Scalar = StrictStr | StrictBool | StrictInt | StrictFloat
Key = Annotated[str, Field(min_length=1, max_length=64)]


class Comparison(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "nin"]
    key: Key
    value: Scalar | list[Scalar]


class Compound(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["and", "or"]
    filters: list[Annotated[Comparison | Compound, Field(discriminator="type")]] = Field(
        min_length=1, max_length=32
    )


Filter = Annotated[Comparison | Compound, Field(discriminator="type")]

# Bounds of one filter: it is evaluated for every file of a store.
MAX_DEPTH = 8
MAX_COMPARISONS = 64
MAX_VALUES = 256  # in an `in` / `nin` list


def check_size(f: Comparison | Compound, depth: int = 1) -> int:
    """The number of comparisons in `f`; ValueError past a bound (pydantic makes it a 400)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"filters nested deeper than {MAX_DEPTH} levels")
    if isinstance(f, Comparison):
        if isinstance(f.value, list) and len(f.value) > MAX_VALUES:
            raise ValueError(f"an '{f.type}' filter takes at most {MAX_VALUES} values")
        return 1
    n = sum(check_size(child, depth + 1) for child in f.filters)
    if n > MAX_COMPARISONS:
        raise ValueError(f"filters hold over {MAX_COMPARISONS} comparisons")
    return n


Attributes = dict[str, str | bool | int | float]


def _comparable(a: Any, b: Any) -> bool:
    """Both numbers or both strings; booleans only ever equal booleans (True is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    number = (int, float)
    both_numbers = isinstance(a, number) and isinstance(b, number)
    return both_numbers or (isinstance(a, str) and isinstance(b, str))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return _comparable(a, b) and a == b


def matches(f: Comparison | Compound, attrs: Attributes) -> bool:
    if isinstance(f, Compound):
        results = (matches(sub, attrs) for sub in f.filters)
        return all(results) if f.type == "and" else any(results)
    if f.key not in attrs:
        return f.type in ("ne", "nin")  # a missing attribute equals nothing
    have: Any = attrs[f.key]
    want: Any = f.value
    if f.type in ("in", "nin"):
        values = want if isinstance(want, list) else [want]
        found = any(_equal(have, v) for v in values)
        return found if f.type == "in" else not found
    if isinstance(want, list):
        return False
    if f.type == "eq":
        return _equal(have, want)
    if f.type == "ne":
        return not _equal(have, want)
    if not _comparable(have, want):
        return False
    return {"gt": have > want, "gte": have >= want, "lt": have < want, "lte": have <= want}[f.type]


def check_attributes(value: Any) -> Attributes:
    """OpenAI's limits: at most 16 keys of up to 64 characters; strings up to 512."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 16:
        raise ValueError("attributes must be an object with at most 16 keys")
    for k, v in value.items():
        if not isinstance(k, str) or not 1 <= len(k) <= 64:
            raise ValueError("attribute keys are strings of 1 to 64 characters")
        if not isinstance(v, str | bool | int | float) or (isinstance(v, str) and len(v) > 512):
            raise ValueError(f"attribute {k!r}: a string (up to 512), number or boolean")
    return value

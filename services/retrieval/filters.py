"""OpenAI's attribute filters (comparison and compound), parsed strictly, evaluated in Milvus.

Filters select files by their attributes. `compile_filter` writes one as a Milvus expression
over the attributes each chunk row carries, encoded (`encode_attributes`) so that no user
string becomes syntax; `matches` evaluates one in Python over a file's attributes: the
reference both follow, the service's own path where Milvus cannot take a filter, and a check
on every result. The owner's scope is applied before a filter is looked at.
"""

from __future__ import annotations

import hashlib
import math
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
        for v in f.value if isinstance(f.value, list) else [f.value]:
            check_number(v, f"filter on {f.key!r}")
        return 1
    n = sum(check_size(child, depth + 1) for child in f.filters)
    if n > MAX_COMPARISONS:
        raise ValueError(f"filters hold over {MAX_COMPARISONS} comparisons")
    return n


Attributes = dict[str, str | bool | int | float]


def check_number(v: Any, what: str) -> None:
    """Numbers as Milvus stores them: finite, integers within 64 bits."""
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{what}: numbers must be finite")
    if isinstance(v, int) and not isinstance(v, bool) and not -(1 << 63) <= v < 1 << 63:
        raise ValueError(f"{what}: integers must fit in 64 bits")


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
        check_number(v, f"attribute {k!r}")
    return value


# --- The same filters inside Milvus --------------------------------------------------------------
#
# Each chunk row holds its file's attributes in a JSON field, encoded so that a filter becomes
# an expression with nothing of the user's in it but numbers, booleans and hex digests. Under
# its key's digest `h`, an attribute has `p<h>` (present) and, by type, `n<h>` (a number,
# integral floats as integers so that 1 == 1.0 as in Python), `b<h>` (a boolean) or, for a
# string, `e<h>` (its digest, for equality) and `s<h>` (the string itself, for ordering). Typed
# keys keep the evaluator's rules: booleans never equal numbers, strings never compare with
# numbers, and a missing attribute equals nothing (Milvus's `!=` and `not in` hold for a
# missing key). A string is only written into an expression for an ordering comparison, and
# only if it holds no quote, backslash or control character (the expression grammar's string
# has no escapes these engines honour); otherwise NotInEngine, and the service evaluates that
# filter itself. Milvus Lite 3 evaluates JSON expressions differently (no `in` on a JSON key,
# SQL's `!=`): there the service evaluates every filter itself (VectorIndex.engine_filters).

INT64 = 1 << 63
_UNSAFE = set('"\\') | {chr(c) for c in range(32)} | {"\x7f"}


class NotInEngine(Exception):
    """A filter this encoding cannot express; evaluated by the service instead."""


def _digest(value: str) -> str:
    return hashlib.blake2b(value.encode(), digest_size=8).hexdigest()


def _number(v: int | float) -> int | float:
    return int(v) if isinstance(v, float) and v.is_integer() and -INT64 <= v < INT64 else v


def encode_attributes(attrs: Attributes) -> dict[str, Any]:
    """A file's attributes as its chunk rows store them in Milvus."""
    out: dict[str, Any] = {}
    for key, v in attrs.items():
        h = _digest(key)
        out[f"p{h}"] = 1
        if isinstance(v, bool):
            out[f"b{h}"] = v
        elif isinstance(v, int | float):
            out[f"n{h}"] = _number(v)
        else:
            out[f"e{h}"], out[f"s{h}"] = _digest(v), v
    return out


Compiled = str | bool  # an expression, or a filter that admits every file / none


def _field(kind: str, key: str) -> str:
    return f'attributes["{kind}{_digest(key)}"]'


def _literal(v: int | float | bool) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else repr(_number(v))


def _join(op: str, parts: list[Compiled]) -> Compiled:
    """`and` / `or` of compiled parts, constants folded."""
    absorbing, neutral = (False, True) if op == "and" else (True, False)
    if any(p is absorbing for p in parts):
        return absorbing
    exprs = [p for p in parts if p is not neutral]
    if not exprs:
        return neutral
    return exprs[0] if len(exprs) == 1 else "(" + f" {op} ".join(map(str, exprs)) + ")"


def _membership(key: str, values: list[Any], negate: bool) -> Compiled:
    by_kind: dict[str, list[str]] = {"e": [], "b": [], "ni": [], "nf": []}
    for v in values:
        if isinstance(v, bool):
            by_kind["b"].append(_literal(v))
        elif isinstance(v, str):
            by_kind["e"].append(f'"{_digest(v)}"')
        else:
            by_kind["ni" if isinstance(_number(v), int) else "nf"].append(_literal(v))
    # Milvus takes one type per list: integers and floats apart.
    op = "not in" if negate else "in"
    parts: list[Compiled] = [
        f"{_field(kind[0], key)} {op} [{', '.join(sorted(set(vs)))}]"
        for kind, vs in by_kind.items()
        if vs
    ]
    return _join("and" if negate else "or", parts)


def compile_filter(f: Comparison | Compound) -> Compiled:
    """The filter as an expression over the rows' encoded attributes, with `matches`'s result
    for every file; NotInEngine where it cannot be written safely."""
    if isinstance(f, Compound):
        return _join(f.type, [compile_filter(sub) for sub in f.filters])
    want: Any = f.value
    if f.type in ("in", "nin"):
        return _membership(f.key, want if isinstance(want, list) else [want], f.type == "nin")
    if isinstance(want, list):  # only `in` and `nin` take lists: nothing matches, or all but...
        return f"{_field('p', f.key)} != 1" if f.type == "ne" else False
    ops = {"eq": "==", "ne": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
    op = ops[f.type]
    if f.type in ("eq", "ne"):
        if isinstance(want, str):
            return f'{_field("e", f.key)} {op} "{_digest(want)}"'
        return f"{_field('b' if isinstance(want, bool) else 'n', f.key)} {op} {_literal(want)}"
    if isinstance(want, bool):
        return False  # booleans are not ordered
    if isinstance(want, str):
        if _UNSAFE & set(want):
            raise NotInEngine(f.key)
        return f'{_field("s", f.key)} {op} "{want}"'
    return f"{_field('n', f.key)} {op} {_literal(want)}"

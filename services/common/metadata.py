"""OpenAI's `metadata`: at most 16 pairs of strings, keys up to 64 and values up to 512 characters.

Checked where an object is made (the gateway, before a stored completion costs the engine
anything) and where it is changed (the lifecycle store), with one message naming the param.
"""

from __future__ import annotations

from typing import Any

from services.common.errors import InvalidRequest

MAX_PAIRS, MAX_KEY, MAX_VALUE = 16, 64, 512


def check_metadata(value: Any, param: str = "metadata") -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param} must be an object of strings", param=param)
    if len(value) > MAX_PAIRS:
        raise InvalidRequest(f"{param} has {len(value)} pairs; at most {MAX_PAIRS}", param=param)
    for k, v in value.items():
        if not isinstance(v, str):
            raise InvalidRequest(f"{param} values must be strings ({k[:64]!r})", param=param)
        if len(k) > MAX_KEY:
            raise InvalidRequest(
                f"{param} keys are at most {MAX_KEY} characters ({k[:64]!r}...)", param=param
            )
        if len(v) > MAX_VALUE:
            raise InvalidRequest(
                f"{param} values are at most {MAX_VALUE} characters (key {k!r})", param=param
            )
    return value

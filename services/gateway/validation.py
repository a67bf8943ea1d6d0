"""Checks of the fields that cost the engine (caps from RELIABILITY.md), on the parsed body.

Only what the gateway must bound or needs for routing is checked here; every other field passes
through untouched and vLLM validates it (its 400s are relayed).
"""

from __future__ import annotations

from typing import Any

import orjson

from services.common.errors import InvalidRequest
from services.common.metadata import check_metadata
from services.gateway.config import GatewaySettings


def _int(payload: dict[str, Any], name: str, low: int, high: int) -> None:
    value = payload.get(name)
    if value is None:
        return
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 5.0 is an integer in JSON Schema, and vLLM accepts it too
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer", param=name, code="invalid_type")
    if not low <= value <= high:
        raise InvalidRequest(
            f"{name} must be between {low} and {high}, got {value}",
            param=name,
            code="invalid_value",
        )


def _check_input(value: Any) -> None:
    """The Responses API's `input`: text, or a list of items (messages and the like)."""
    if isinstance(value, str) and value:
        return
    if isinstance(value, list) and value and all(isinstance(i, dict) for i in value):
        return
    raise InvalidRequest(
        "input must be a non-empty string or a non-empty array of input items",
        param="input",
        code="invalid_type" if value is not None else "missing_required",
    )


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def _check_prompt(prompt: Any, s: GatewaySettings) -> None:
    """What the engine will process, bounded without tokenizing: the number of prompts (each is
    a sequence the engine runs), their characters, their token ids."""
    if isinstance(prompt, str) or _token_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and all(isinstance(p, str) or _token_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise InvalidRequest(
            "prompt must be a string, an array of strings, an array of token ids or an array "
            "of arrays of token ids",
            param="prompt",
            code="invalid_type",
        )
    if len(prompts) > s.max_prompts:
        raise InvalidRequest(
            f"{len(prompts)} prompts in one request; at most {s.max_prompts}",
            param="prompt",
            code="invalid_value",
        )
    chars = sum(len(p) for p in prompts if isinstance(p, str))
    ids = sum(len(p) for p in prompts if isinstance(p, list))
    if chars > s.max_prompt_chars or ids > s.max_prompt_token_ids:
        raise InvalidRequest(
            f"the prompts hold {chars} characters and {ids} token ids; at most "
            f"{s.max_prompt_chars} and {s.max_prompt_token_ids}",
            param="prompt",
            code="invalid_value",
        )


def check_request(path: str, payload: dict[str, Any], s: GatewaySettings) -> tuple[str, bool]:
    """Raise InvalidRequest naming the param, else return (model, stream)."""
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            "model is required and must be a string",
            param="model",
            code="invalid_type" if model is not None else "missing_required",
        )
    stream = payload.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream must be a boolean", param="stream", code="invalid_type")
    store = payload.get("store")
    if store is not None and not isinstance(store, bool):
        raise InvalidRequest("store must be a boolean", param="store", code="invalid_type")
    if "metadata" in payload:
        check_metadata(payload["metadata"])
    if path.endswith("/chat/completions"):
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest(
                "messages must be a non-empty array",
                param="messages",
                code="invalid_type" if messages is not None else "missing_required",
            )
        _int(payload, "max_completion_tokens", 1, s.max_tokens_cap)
        _int(payload, "top_logprobs", 0, s.max_top_logprobs)
    elif path.endswith("/responses"):
        _check_input(payload.get("input"))
        _int(payload, "max_output_tokens", 1, s.max_tokens_cap)
        previous = payload.get("previous_response_id")
        if previous is not None and not (isinstance(previous, str) and 0 < len(previous) <= 200):
            raise InvalidRequest(
                "previous_response_id must be a response id",
                param="previous_response_id",
                code="invalid_type",
            )
    else:
        prompt = payload.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            raise InvalidRequest("prompt is required", param="prompt", code="missing_required")
        _check_prompt(prompt, s)
        _int(payload, "logprobs", 0, s.max_top_logprobs)
    bias = payload.get("logit_bias")
    if bias is not None and (not isinstance(bias, dict) or len(bias) > s.max_logit_bias):
        raise InvalidRequest(
            f"logit_bias must be an object of at most {s.max_logit_bias} tokens",
            param="logit_bias",
            code="invalid_value",
        )
    _int(payload, "max_tokens", 1, s.max_tokens_cap)
    _int(payload, "n", 1, s.max_n)
    _int(payload, "best_of", 1, s.max_n)
    _int(payload, "prompt_logprobs", 0, s.max_top_logprobs)
    fmt = payload.get("response_format")
    if (
        isinstance(fmt, dict)
        and fmt.get("type") == "json_schema"
        and len(orjson.dumps(fmt.get("json_schema"))) > s.max_schema_bytes
    ):
        raise InvalidRequest(
            f"response_format schema over {s.max_schema_bytes} bytes",
            param="response_format",
            code="invalid_value",
        )
    return model, bool(stream)


def sequences(path: str, payload: dict[str, Any]) -> int:
    """The sequences a valid request asks the engine for (what the rate limit counts): `n` (or
    `best_of`, when larger) for each prompt."""
    if path.endswith("/responses"):
        return 1
    n = max(payload.get("n") or 1, payload.get("best_of") or 1)
    if path.endswith("/chat/completions"):
        return int(n)
    prompt = payload["prompt"]
    prompts = 1 if isinstance(prompt, str) or _token_ids(prompt) else len(prompt)
    return int(prompts * n)


# Per route: the field that bounds a request's output, and every field a client may bound it by.
_BOUNDS = {
    "/v1/chat/completions": ("max_tokens", ("max_tokens", "max_completion_tokens")),
    "/v1/completions": ("max_tokens", ("max_tokens",)),
    "/v1/responses": ("max_output_tokens", ("max_output_tokens",)),
}


def output_bound(path: str, payload: dict[str, Any], limit: int) -> int:
    """The most tokens a sequence of a valid request may generate: the client's bound (the
    largest, when it sent two), else `limit` (what `bound_output` sets)."""
    given = [v for f in _BOUNDS[path][1] if isinstance(v := payload.get(f), int)]
    return max(given) if given else limit


def bound_output(path: str, body: bytes, payload: dict[str, Any], limit: int) -> bytes:
    """The body with an output bound of `limit` tokens where the client set none (an engine
    would otherwise generate to the end of its context); spliced in, not encoded again."""
    if path not in _BOUNDS:
        return body
    bound, fields = _BOUNDS[path]
    if any(payload.get(f) is not None for f in fields):
        return body
    if any(f in payload for f in fields):  # given as null: encoded again without the nulls
        kept = {k: v for k, v in orjson.loads(body).items() if k not in fields}
        return orjson.dumps({**kept, bound: limit})
    return insert_fields(body, b'"%s":%d,' % (bound.encode(), limit))


def insert_fields(body: bytes, fields: bytes) -> bytes:
    """`fields` (`"name":value,`) spliced in at the start of a JSON object's body: one copy of
    the body (slicing and concatenating copied a 1 MiB body three times: 1.9 ms against 36 µs,
    bench/gateway_bounds.py)."""
    start = body.index(b"{") + 1
    return b"".join((body[:start], fields, memoryview(body)[start:]))

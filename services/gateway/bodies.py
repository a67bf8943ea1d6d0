"""A request's body, read by the gateway: bounded in bytes (413), counted against the key's
bytes in flight (`limits.BodyBytes`, 429) as it arrives, and parsed as a JSON object (400)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.types import Message, Receive

from services.common.errors import InvalidRequest, PayloadTooLarge
from services.gateway.limits import BodyBytes


class ClientGone(Exception):
    """The client disconnected before we answered."""


async def read_body(
    receive: Receive, headers: dict[bytes, bytes], limit: int, hold: BodyBytes | None = None
) -> bytes:
    """The whole body, at most `limit` bytes; `hold` counts it against the key's bytes in
    flight (the declared length at once, before a byte is read)."""
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        if hold is not None:
            hold(int(declared))
            hold = None  # held whole: a body never exceeds its declared length
    parts: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        if hold is not None and chunk:
            hold(len(chunk))
        parts.append(chunk)
        if not message.get("more_body"):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def parse_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or 400 `invalid_json`."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("request body is not valid JSON", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    return payload

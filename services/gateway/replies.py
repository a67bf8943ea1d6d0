"""What the gateway answers itself: an error in OpenAI's envelope (with the request's ids), and
an upstream's error turned into one."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.types import Send

from services.common.errors import CrucibleError, UpstreamError, error_for_status
from services.gateway.spans import ids

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class EmptyStream(UpstreamError):
    """A stream the engine closed before its first event: nothing was sent to the client."""

    def __init__(self) -> None:
        super().__init__("the inference backend closed the stream before sending")


def upstream_error(status: int, raw: bytes) -> CrucibleError:
    """The upstream's status and message, in our envelope (vLLM has sent two shapes)."""
    message, param, code = f"inference backend answered {status}", None, None
    try:
        data = orjson.loads(raw)
        err = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            message = err["message"][:2000]
            param = err.get("param") if isinstance(err.get("param"), str) else None
            code = err.get("code") if isinstance(err.get("code"), str) else None
    except orjson.JSONDecodeError:
        pass
    exc = error_for_status(status, message)
    exc.param, exc.code = param, code or exc.code
    return exc


async def send_error(send: Send, exc: CrucibleError, rid: str) -> None:
    body = orjson.dumps(exc.body())
    headers = [*JSON_HEADERS, *ids(rid)]
    headers += [(b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in exc.headers.items()]
    try:
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    except RuntimeError:
        pass  # the response had already started; nothing honest left to send


async def stream_error(send: Send, exc: CrucibleError, out: Any) -> None:
    """After the first byte the status is fixed: end the stream with an error event instead
    (and mark the request's outcome failed mid-stream)."""
    out.failed_midstream = True
    event = b"data: " + orjson.dumps(exc.body()) + b"\n\n"
    await send({"type": "http.response.body", "body": event, "more_body": False})

"""What the gateway answers itself: an error in OpenAI's envelope (with the request's ids), and
an upstream's error turned into one."""

from __future__ import annotations

import orjson
from starlette.types import Send

from services.common.errors import CrucibleError, error_for_status
from services.gateway.spans import ids

JSON_HEADERS = [(b"content-type", b"application/json")]


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

"""A JSON answer with an ETag, and 304 to a client that already has it (the gateways poll the
finetune service's internal tables this way)."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response


def conditional_json(request: Request, data: Any) -> Response:
    body = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"etag": etag})
    return Response(body, media_type="application/json", headers={"etag": etag})

"""One exception hierarchy, one OpenAI error envelope, one place mapping them to status codes."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("crucible.errors")


class CrucibleError(Exception):
    """Base of every error a client may see. Its message must never carry secrets or internals."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return envelope(self.message, self.type, self.param, self.code)


class InvalidRequest(CrucibleError):
    status, type = 400, "invalid_request_error"


class AuthenticationFailed(CrucibleError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class PermissionDenied(CrucibleError):
    status, type = 403, "permission_error"


class NotFound(CrucibleError):
    status, type, code = 404, "invalid_request_error", "not_found"


class RequestTimeout(CrucibleError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class Conflict(CrucibleError):
    status, type, code = 409, "invalid_request_error", "conflict"


class PayloadTooLarge(CrucibleError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class UnsupportedMediaType(CrucibleError):
    status, type, code = 415, "invalid_request_error", "unsupported_media_type"


class ValidationFailed(CrucibleError):
    status, type, code = 422, "invalid_request_error", "validation_error"


class RateLimited(CrucibleError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.headers["retry-after"] = str(max(1, round(retry_after)))


class QuotaExceeded(CrucibleError):
    """An owner's stored bytes (files, adapters, stored data) would pass their quota."""

    status, type, code = 429, "insufficient_quota", "insufficient_quota"


class UpstreamError(CrucibleError):
    status, type, code = 502, "upstream_error", "bad_gateway"


class Unavailable(CrucibleError):
    status, type, code = 503, "service_unavailable", "unavailable"


class UpstreamTimeout(CrucibleError):
    status, type, code = 504, "timeout_error", "upstream_timeout"


def envelope(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_STATUS_TYPES = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    405: InvalidRequest,
    408: RequestTimeout,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ValidationFailed,
    429: RateLimited,
    503: Unavailable,
}


def error_for_status(status: int, message: str) -> CrucibleError:
    """An error of the right class for an HTTP status (e.g. relayed from an upstream)."""
    cls = _STATUS_TYPES.get(status)
    if cls is None:
        err: CrucibleError = UpstreamError(message) if status >= 500 else InvalidRequest(message)
    else:
        err = cls(message)
    err.status = status
    return err


# Pydantic names the union member it tried in an error's location ("input.str",
# "input.list[int]"): those are types, not fields the client sent.
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [
        str(p)
        for p in loc
        if p not in ("body", "query", "path", "header")
        and not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p or "-" in p))
    ]
    return ".".join(parts) or None


def _allowed_methods(request: Request) -> set[str]:
    from starlette.routing import Match

    # Ask the routes themselves, method by method: included routers nest, so no flat list.
    return {
        method
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
        if any(
            r.matches({**request.scope, "method": method})[0] == Match.FULL
            for r in request.app.routes
        )
    }


UNSTORABLE: dict[type[Exception], str] = {
    # PostgreSQL refuses what SQLite stores: a NUL character in text, a value longer than its
    # column. Such input can name nothing stored and be stored nowhere.
    DataError: (
        "a value in this request cannot be stored or looked up: text may not contain NUL"
        " characters, and ids, names and other fields have length limits"
    ),
    # A JSON integer past what the database stores (SQLite's 64 bits), in a filter or a field
    # a route does not bound itself.
    OverflowError: "a number in this request is out of range",
    # JSON may escape half a surrogate pair ("\\ud800"): valid JSON, not text any database or
    # encoder takes.
    UnicodeEncodeError: "a value in this request is not valid Unicode text (an unpaired surrogate)",
}


def _unstorable(message: str) -> Any:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        kind = type(getattr(exc, "orig", None) or exc).__name__
        log.info("unstorable value on %s: %s", request.url.path, kind)
        body = envelope(message, "invalid_request_error", None, "invalid_value")
        return JSONResponse(body, status_code=400)

    return handler


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CrucibleError)
    async def _crucible(_: Request, exc: CrucibleError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = _param(tuple(first.get("loc", ())))
        # Only pydantic's message and the field path: never the input value, which may be secret.
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        body = envelope(message, "invalid_request_error", param, "invalid_value")
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = error_for_status(exc.status_code, str(exc.detail))
        headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
        if exc.status_code == 405:
            # Starlette names only the first matching route's methods; list every one.
            headers["allow"] = ", ".join(sorted(_allowed_methods(request)))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=headers)

    # Values the client sent that no database or encoder takes: the client's to fix (400),
    # never a server error.
    for kind, message in UNSTORABLE.items():
        app.add_exception_handler(kind, _unstorable(message))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        body = envelope("internal server error", "server_error", None, "internal_error")
        return JSONResponse(body, status_code=500)

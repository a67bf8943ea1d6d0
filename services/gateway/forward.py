"""Forwarding to Crucible's own services (retrieval, finetune, agent).

The gateway authenticates the key, applies its limits, then forwards the request with the
internal token and the key's owner (`X-Crucible-Owner`); the client's own credentials never
travel further. Only the public path prefixes below are forwarded, and the response (status,
envelope, streamed body) is relayed as the service sent it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

import orjson
from starlette.types import Receive, Scope, Send

from services.common import tracing
from services.common.errors import (
    CrucibleError,
    NotFound,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from services.common.logging import request_id
from services.common.metrics import _incoming_request_id
from services.common.outbox import USAGE_HEADER
from services.common.tenancy import OWNER_HEADER
from services.common.upstream import (
    Pool,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamProtocolError,
)
from services.gateway import roles
from services.gateway.audit import AuditLog, forwarded_action
from services.gateway.bodies import ClientGone
from services.gateway.config import GatewaySettings
from services.gateway.keys import ON_BEHALF_HEADER, ApiKey
from services.gateway.limits import BodyBytes
from services.gateway.proxy import Proxy
from services.gateway.replies import send_error
from services.gateway.spans import RequestTrace, ids

log = logging.getLogger("crucible.gateway")

# Public path prefix → the service that owns it (DESIGN.md, Public API).
SERVICE_ROUTES: dict[str, str] = {
    "/v1/embeddings": "retrieval",
    "/v1/files": "retrieval",
    "/v1/vector_stores": "retrieval",
    "/v1/fine_tuning": "finetune",
    "/v1/evals": "finetune",
    "/v1/model_aliases": "finetune",
    "/v1/organization": "finetune",  # usage and costs
    "/v1/agent": "agent",
    # Stored chat completions (GET, POST /{id}, DELETE): POST to the path itself is the proxy's.
    "/v1/chat/completions": "finetune",
    # Stored responses (GET, DELETE, /input_items): POST /v1/responses is the proxy's.
    "/v1/responses": "finetune",
}
# Services learn which key a request came with: the agent calls the model back as that key.
KEY_HEADER = ON_BEHALF_HEADER.encode()
USED = USAGE_HEADER.encode()
ADMIN_HEADER = b"x-crucible-admin"
UPLOAD_PATH = "/v1/files"
MULTIPART_OVERHEAD = 64 << 10
# Request headers the services read; everything else (the client's key first) stays here.
PASSED = (b"content-type", b"accept", b"idempotency-key")
# Response headers worth relaying; hop-by-hop and server headers stay behind.
RELAYED = {
    b"allow",  # a 405's methods (RFC 9110)
    b"content-type",
    b"content-disposition",
    b"retry-after",
    b"cache-control",
    b"server-timing",
}


def route_of(path: str) -> str | None:
    """The forwarded prefix a path belongs to (also the metric label), or None."""
    for prefix in SERVICE_ROUTES:
        if path == prefix or path.startswith(prefix + "/"):
            return prefix
    return None


@dataclass
class _Outcome:
    status: int = 500
    key_id: str | None = None
    started: bool = False
    tokens: int | None = None  # what the service said the request used
    key: ApiKey | None = None
    traceparent: bytes = b""  # what the service gets: the gateway's span as its parent


class ServiceForwarder:
    def __init__(self, settings: GatewaySettings, proxy: Proxy, audit: AuditLog) -> None:
        self.s = settings
        self.proxy = proxy
        self.audit = audit
        urls = {
            "retrieval": settings.retrieval_url,
            "finetune": settings.finetune_url,
            "agent": settings.agent_url,
        }
        self.pools = {name: Pool(url) for name, url in urls.items()}
        token = settings.internal_token.get_secret_value()
        self._auth = b"Bearer " + token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send, route: str) -> None:
        rid = _incoming_request_id(scope) or uuid.uuid4().hex
        ctx = request_id.set(rid)
        start = time.perf_counter()
        traced = RequestTrace(self.proxy.spans, f"{scope['method']} {route}", scope["headers"])
        out = _Outcome(traceparent=traced.traceparent)
        try:
            await self._handle(scope, receive, send, route, rid, out)
        except CrucibleError as exc:
            out.status = exc.status
            await send_error(send, exc, rid)
        except ClientGone:
            out.status = 499
        finally:
            elapsed = time.perf_counter() - start
            self.proxy.metrics.observe(route, "-", out.status, elapsed, None, 0, 0, False)
            log.info(
                "request",
                extra={
                    "route": route,
                    "method": scope["method"],
                    "status": out.status,
                    "key_id": out.key_id,
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )
            traced.end(out.status, out.key, **{"url.path": scope["path"]})
            request_id.reset(ctx)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, route: str, rid: str, out: _Outcome
    ) -> None:
        headers = dict(scope["headers"])
        key = await self.proxy.authenticate(headers, roles.needed(scope["method"], scope["path"]))
        out.key_id, out.key = key.id, key
        upload = route == UPLOAD_PATH and scope["method"] == "POST"
        limit = self.s.max_upload_bytes + MULTIPART_OVERHEAD if upload else self.s.max_body_bytes
        wait = self.s.upload_timeout_s if upload else self.s.body_timeout_s
        self.proxy.admit(key)
        held = BodyBytes(self.proxy.concurrency, key.id)
        try:
            body = await self.proxy.body(receive, headers, limit, wait, held)
            if route == "/v1/embeddings" and key.models is not None:
                _check_model(body, key.models)
            await self.proxy.reserve(key)
            # Embeddings count against budgets: at most a token per byte sent.
            budgets = await self.proxy.keys.budgets(key) if route == "/v1/embeddings" else ()
            reserved = (
                await self.proxy.budgets.reserve(budgets, len(body), 0, _model(body))
                if budgets
                else None
            )
            try:
                await self._forward(scope, send, body, SERVICE_ROUTES[route], key, rid, out)
            finally:
                if reserved is not None:
                    spent = (out.tokens, 0) if out.tokens is not None else None
                    await self.proxy.budgets.settle(
                        reserved, spent if out.status == 200 else (0, 0)
                    )
            if out.status < 300 and (change := forwarded_action(scope["method"], scope["path"])):
                await self._audit(key, *change, body)
        finally:
            held.release()
            self.proxy.concurrency.release(key.id)

    async def _forward(
        self,
        scope: Scope,
        send: Send,
        body: bytes,
        service: str,
        key: ApiKey,
        rid: str,
        out: _Outcome,
    ) -> None:
        path = scope["raw_path"] or scope["path"].encode()
        if scope["query_string"]:
            path += b"?" + scope["query_string"]
        incoming = dict(scope["headers"])
        headers = [
            (b"authorization", self._auth),
            (OWNER_HEADER.encode(), key.owner.encode()),
            (KEY_HEADER, key.id.encode()),
            (b"x-request-id", rid.encode()),
            (tracing.TRACEPARENT, out.traceparent),
        ]
        if key.is_admin:  # the services may let an admin do more (force a gated promotion)
            headers.append((ADMIN_HEADER, b"1"))
        headers += [(k, incoming[k]) for k in PASSED if k in incoming]
        try:
            async with asyncio.timeout(self.s.request_timeout_s):
                resp = await self.pools[service].request(
                    scope["method"].encode(),
                    path,
                    body,
                    headers,
                    connect_timeout=self.s.connect_timeout_s,
                )
                try:
                    relayed = [(k, v) for k, v in resp.headers if k in RELAYED]
                    relayed += ids(rid)
                    chunks = resp.iter_chunks(self.s.stream_idle_timeout_s)
                    await send(
                        {"type": "http.response.start", "status": resp.status, "headers": relayed}
                    )
                    out.status, out.started = resp.status, True
                    async for chunk in chunks:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    used = next((v for k, v in resp.headers if k == USED), None)
                    if used is not None and resp.status == 200:
                        out.tokens = self._record(key, route_of(scope["path"]) or "", used)
                finally:
                    resp.release()
        except (UpstreamConnectError, UpstreamBusy) as exc:
            kind = "busy" if isinstance(exc, UpstreamBusy) else "connect"
            self.proxy.metrics.upstream_errors.labels(kind).inc()
            raise Unavailable(f"the {service} service is unavailable; try again shortly") from None
        except (UpstreamProtocolError, TimeoutError) as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else "protocol"
            self.proxy.metrics.upstream_errors.labels(kind).inc()
            if out.started:
                # Mid-body the status is sent: leave the response unfinished, so the client
                # sees a broken transfer rather than a complete-looking truncated body.
                out.status = 502
                return
            if kind == "timeout":
                raise UpstreamTimeout(f"the {service} service did not answer in time") from None
            raise UpstreamError(f"the {service} service broke the connection") from None

    def _record(self, key: ApiKey, route: str, used: bytes) -> int | None:
        """The usage a service reported for a request it served (embeddings' tokens, and the
        seconds its model took); returns its tokens (None: not said)."""
        try:
            u = orjson.loads(used)
            model, tokens = str(u["model"]), int(u["input_tokens"])
            seconds = float(u.get("seconds") or 0.0)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("malformed usage header", extra={"route": route})
            return None
        self.proxy.usage.record(key, route.rsplit("/", 1)[-1], model, tokens, engine_s=seconds)
        return tokens

    async def _audit(self, key: ApiKey, action: str, target: str, body: bytes) -> None:
        """Record a change the service made (never its body: a created alias's name only)."""
        if not target:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                target = str(orjson.loads(body).get("name") or "")
        try:
            await asyncio.to_thread(self.audit.record, (key.id, key.owner), action, target)
        except Exception:  # the change is made; a missing record is logged, never a 500
            log.exception("audit record failed", extra={"action": action})

    async def aclose(self) -> None:
        for pool in self.pools.values():
            await pool.aclose()


def _model(body: bytes) -> str:
    """The model an embeddings body names ("" when it names none: the service says why)."""
    try:
        model = orjson.loads(body).get("model")
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    return model if isinstance(model, str) else ""


def _check_model(body: bytes, allowed: frozenset[str]) -> None:
    """A key limited to some models may embed only with those (unparseable: the service says)."""
    model = _model(body)
    if model and model not in allowed:
        raise NotFound(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )

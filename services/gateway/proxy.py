"""The forwarding hot path for chat and completions, as plain ASGI (no framework per request).

Order of work: body (bounded) → key → cheap checks of the cost-bearing fields → routing →
limits → upstream with failover before the first byte → relay. One deadline covers it all.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson
from starlette.types import Receive, Scope, Send

from services.common import tracing
from services.common.errors import (
    AuthenticationFailed,
    CrucibleError,
    NotFound,
    RateLimited,
    RequestTimeout,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
    error_for_status,
)
from services.common.logging import request_id
from services.common.metrics import _incoming_request_id
from services.common.outbox import Outbox
from services.common.spanexport import SpanPipe
from services.common.tenancy import OWNER_HEADER
from services.common.upstream import (
    Pool,
    Response,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamProtocolError,
)
from services.gateway import replies, roles
from services.gateway.aliases import Alias, AliasRouter
from services.gateway.bodies import ClientGone, parse_object, read_body
from services.gateway.budgets import Budgets, Prices
from services.gateway.config import GatewaySettings
from services.gateway.direct import direct_client
from services.gateway.keys import ON_BEHALF_HEADER, ApiKey, KeyStore
from services.gateway.limits import BodyBytes, Concurrency, RateLimiter, RedisUnavailable
from services.gateway.metrics import GatewayMetrics
from services.gateway.owners import ModelOwners
from services.gateway.quotas import StoredQuotas
from services.gateway.routing import Backend, Router, choose
from services.gateway.spans import RequestTrace, ids
from services.gateway.usage import UsageRecorder, UsageSniffer, ask_for_usage, count
from services.gateway.validation import bound_output, check_request, output_bound, sequences

ON_BEHALF = ON_BEHALF_HEADER.encode()
PROJECT = b"openai-project"  # the official SDK's `project=` (OPENAI_PROJECT_ID)
OWNER = OWNER_HEADER.encode()
CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
STORED = (CHAT, RESPONSES)  # the routes whose exchanges may be stored
log = logging.getLogger("crucible.gateway")


@dataclass
class Outcome:
    status: int = 500
    model: str = "unknown"
    route: str = ""
    key: ApiKey | None = None
    ttft: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    engine_s: float = 0.0  # its share of the engine's busy time (routing.Backend)
    failed_midstream: bool = False
    strip_usage: bool = False  # the gateway asked for the usage event; the client did not
    capture: bytes | None = None  # the request body, when the exchange is to be stored
    previous_response_id: str | None = None  # a response continued from a stored one
    own_input_from: int = 0  # where its own input starts after the conversation before it
    alias: Alias | None = None  # the alias the request named (`model` is then its target)
    served: tuple[tuple[bytes, bytes], ...] = ()  # response headers naming what served it
    forwarded: bool = False  # it reached an engine (its outcome is the target's)
    traceparent: bytes = b""  # what the engine gets: the gateway's span as its parent


def _charged(out: Outcome) -> tuple[int, int] | None:
    """What a budget is charged for a request: the tokens the engine reported (input, output);
    nothing when no answer came from an engine; its worst case (None) when one came without
    usage (a stream cut)."""
    if out.prompt_tokens or out.completion_tokens:
        return out.prompt_tokens, out.completion_tokens
    return None if out.forwarded and out.status == 200 else (0, 0)


class Proxy:
    def __init__(
        self,
        settings: GatewaySettings,
        router: Router,
        keys: KeyStore,
        limiter: RateLimiter,
        metrics: GatewayMetrics,
        owners: ModelOwners,
        outbox: Outbox,
        aliases: AliasRouter,
        quotas: StoredQuotas,
        usage: Outbox,
    ) -> None:
        self.s = settings
        self.quotas = quotas
        self.outbox = outbox
        self.usage = UsageRecorder(usage, metrics)
        self.aliases = aliases
        # The lifecycle store (the finetune service): stored responses a request continues.
        self.lifecycle = Pool(settings.finetune_url)
        self.internal_auth = b"Bearer " + settings.internal_token.get_secret_value().encode()
        self.owners = owners
        self.router = router
        self.keys = keys
        self.limiter = limiter
        self.budgets = Budgets(limiter.redis, metrics, Prices(settings.budget_prices))
        self.metrics = metrics
        self.concurrency = Concurrency(settings.max_concurrency, settings.max_key_bytes_in_flight)
        metrics.watch(self.concurrency)
        self.inference_headers = settings.inference_headers()
        # This process's recorded spans, exported by a child process (none without an endpoint).
        self.spans = SpanPipe("gateway", settings.otlp_endpoint) if settings.otlp_endpoint else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid = _incoming_request_id(scope) or uuid.uuid4().hex
        token = request_id.set(rid)
        start = time.perf_counter()
        route: str = scope["path"]
        traced = RequestTrace(self.spans, f"{scope['method']} {route}", scope["headers"])
        out = Outcome(route=route, traceparent=traced.traceparent)
        try:
            await self._handle(scope, receive, send, rid, out, start)
        except CrucibleError as exc:
            out.status = exc.status
            await replies.send_error(send, exc, rid)
        except ClientGone:
            out.status = 499
        finally:
            elapsed = time.perf_counter() - start
            if out.alias is not None and out.forwarded:
                status = 502 if out.failed_midstream else out.status
                self.aliases.outcome(out.alias, out.model, status, out.ttft or elapsed)
            if out.key is not None and out.forwarded and out.status in (200, 499):
                self.usage.record(
                    out.key,
                    "completions",
                    out.model,
                    out.prompt_tokens,
                    out.completion_tokens,
                    out.cached_tokens,
                    out.engine_s,
                )
            self.metrics.observe(
                route,
                out.model,
                out.status,
                elapsed,
                out.ttft,
                out.prompt_tokens,
                out.completion_tokens,
                out.failed_midstream,
            )
            log.info(
                "request",
                extra={
                    "route": route,
                    "model": out.model,
                    "status": out.status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "key_id": out.key.id if out.key else None,
                    "owner": out.key.owner if out.key else None,
                    **({"stream_failed": True} if out.failed_midstream else {}),
                },
            )
            traced.end(out.status, out.key, model=out.model)
            request_id.reset(token)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, rid: str, out: Outcome, start: float
    ) -> None:
        if scope["method"] != "POST":
            exc = error_for_status(405, f"method {scope['method']} not allowed")
            exc.headers["allow"] = "GET, POST" if scope["path"] == CHAT else "POST"
            raise exc
        headers = dict(scope["headers"])
        key = await self.authenticate(headers, roles.WRITE)
        out.key = key
        self.admit(key)
        held = BodyBytes(self.concurrency, key.id)
        try:
            await self._admitted(scope, receive, send, headers, key, held, rid, out, start)
        finally:
            held.release()
            self.concurrency.release(key.id)

    def admit(self, key: ApiKey) -> None:
        """Take one of the key's concurrency slots (and one of the process's), or 429 at once:
        before the body is read, so slow bodies count against the key too."""
        hit = self.concurrency.try_acquire(key.id, key.max_concurrency)
        if hit is not None:
            self.metrics.rejections.labels(f"concurrency_{hit}").inc()
            raise RateLimited(f"too many concurrent requests ({hit} limit)", retry_after=1)

    async def body(
        self,
        receive: Receive,
        headers: dict[bytes, bytes],
        limit: int,
        wait: float,
        held: BodyBytes,
    ) -> bytes:
        """The body within `wait` seconds (else 408), held against the key's bytes in flight
        (else 429)."""
        try:
            async with asyncio.timeout(wait):
                return await read_body(receive, headers, limit, held)
        except TimeoutError:
            raise RequestTimeout(f"request body not received within {wait:g}s") from None
        except RateLimited:
            self.metrics.rejections.labels("bytes_in_flight").inc()
            raise

    async def _admitted(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
        key: ApiKey,
        held: BodyBytes,
        rid: str,
        out: Outcome,
        start: float,
    ) -> None:
        body = await self.body(receive, headers, self.s.max_body_bytes, self.s.body_timeout_s, held)
        payload = parse_object(body)
        path = scope["path"]
        model, stream = check_request(path, payload, self.s)
        out.model = model
        if self.aliases.table.by_owner and (found := self.aliases.find(key.owner, model)):
            body, model = self.aliases.resolve(found, payload, key, out)
        if path == RESPONSES:
            if payload.get("previous_response_id"):
                body = await self.continued(key, payload, out)
        elif stream and (asked := ask_for_usage(body, payload)) is not None:
            body, out.strip_usage = asked, True
        store = payload.get("store")
        if (key.store if store is None else store) and path in STORED:
            if key.owner in self.quotas.over:
                self.metrics.rejections.labels("stored_quota").inc()
                raise self.quotas.refusal(key.owner)
            out.capture = body
            if rid == _incoming_request_id(scope):
                # vLLM names the completion after the request id: a client's own id may repeat,
                # a stored completion's id must not.
                rid = f"{rid}-{uuid.uuid4().hex[:16]}"
        if not (out.alias or await self.owners.may_use(key, model)) or not (
            backends := await self._backends(model)
        ):
            out.model = "unknown"
            raise NotFound(
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        context = (backends[0].models.get(model) or {}).get("max_model_len")
        bound = self.s.max_tokens_cap
        if isinstance(context, int) and not isinstance(context, bool) and 0 < context < bound:
            bound = context
        body = bound_output(path, body, payload, bound)
        n = sequences(path, payload)
        await self.reserve(key, n)
        budgets = await self.keys.budgets(key)
        if not budgets:
            await self._forward(scope, receive, send, body, backends, stream, rid, out, start)
            return
        worst_out = output_bound(path, payload, bound) * n
        reserved = await self.budgets.reserve(budgets, len(body), worst_out, model)
        try:
            await self._forward(scope, receive, send, body, backends, stream, rid, out, start)
        finally:
            if reserved is not None:
                await self.budgets.settle(reserved, _charged(out))

    async def authenticate(self, headers: dict[bytes, bytes], permission: str) -> ApiKey:
        """The request's key, in the project it acts in, holding `permission` (else 401/403)."""
        auth = headers.get(b"authorization", b"")
        if not auth.lower().startswith(b"bearer "):
            self.metrics.rejections.labels("auth").inc()
            raise AuthenticationFailed("Missing API key: send `Authorization: Bearer <key>`.")
        secret = auth[7:].strip().decode("latin-1")
        on_behalf = headers.get(ON_BEHALF)
        # The project: the SDK's `OpenAI-Project`; a service acting for a key names the one it
        # was called in (an admin's agent run in another project calls back in that project).
        project = headers.get(PROJECT) or (headers.get(OWNER) if on_behalf else None)
        key = await self.keys.aresolve(
            secret,
            on_behalf.decode("latin-1") if on_behalf else None,
            project.decode("latin-1") if project else None,
        )
        if key is None:
            self.metrics.rejections.labels("auth").inc()
            raise AuthenticationFailed("Incorrect API key provided.")
        if not key.may(permission):
            self.metrics.rejections.labels("role").inc()
            roles.check(key.role, permission)
        return key

    async def continued(self, key: ApiKey, payload: dict[str, Any], out: Outcome) -> bytes:
        """A request that continues a stored response, made whole for any engine: the
        conversation so far (from the lifecycle store) before its own input, and no
        `previous_response_id` (each vLLM keeps responses only in its own process)."""
        previous = payload.pop("previous_response_id")
        path = f"/internal/responses/{quote(previous, safe='')}/context".encode()
        headers = [
            (b"authorization", self.internal_auth),
            (OWNER_HEADER.encode(), key.owner.encode()),
        ]
        try:
            async with asyncio.timeout(self.s.connect_timeout_s + 5):
                resp = await self.lifecycle.request(
                    b"GET", path, b"", headers, connect_timeout=self.s.connect_timeout_s
                )
                try:
                    raw = await resp.read()
                finally:
                    resp.release()
        except (UpstreamConnectError, UpstreamProtocolError, UpstreamBusy, TimeoutError):
            raise Unavailable("stored responses are unavailable; try again shortly") from None
        if resp.status == 404:
            raise NotFound(
                f"Previous response with id '{previous[:200]}' not found.",
                param="previous_response_id",
            )
        if resp.status != 200:
            raise Unavailable("stored responses are unavailable; try again shortly")
        context = orjson.loads(raw)["data"]
        own = payload["input"]
        own = [{"type": "message", "role": "user", "content": own}] if isinstance(own, str) else own
        payload["input"] = [*context, *own]
        out.previous_response_id, out.own_input_from = previous, len(context)
        return orjson.dumps(payload)

    async def _backends(self, model: str) -> list[Backend]:
        backends = self.router.backends_for(model)
        if not backends:
            await self.router.refresh_soon()  # a model (an adapter) may have just appeared
            backends = self.router.backends_for(model)
        return backends

    async def reserve(self, key: ApiKey, cost: int = 1) -> None:
        """Take `cost` of the key's requests per minute (a request's sequences), or 429."""
        if 0 < key.rpm < cost:
            self.metrics.rejections.labels("rate_limit").inc()
            raise RateLimited(
                f"this request asks for {cost} sequences; the key allows {key.rpm} per minute",
                retry_after=60,
            )
        try:
            wait = await self.limiter.reserve(key.id, key.rpm, cost)
        except RedisUnavailable:
            raise Unavailable("rate limiter unavailable; try again shortly") from None
        if wait:
            self.metrics.rejections.labels("rate_limit").inc()
            raise RateLimited(
                f"rate limit of {key.rpm} requests per minute reached", retry_after=wait
            )

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
        backends: list[Backend],
        stream: bool,
        rid: str,
        out: Outcome,
        start: float,
    ) -> None:
        out.forwarded = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.s.request_timeout_s
        task = asyncio.current_task()
        assert task is not None
        state = {"done": False, "disconnected": False}

        async def watch_disconnect() -> None:
            message = await receive()
            if message["type"] == "http.disconnect" and not state["done"]:
                state["disconnected"] = True
                task.cancel()

        watcher = asyncio.create_task(watch_disconnect())
        try:
            async with asyncio.timeout_at(deadline):
                tried: list[Backend] = []
                while True:
                    resp = await self._open(scope["path"].encode(), body, backends, rid, out, tried)
                    try:
                        await self._relay(resp, send, stream, rid, out, start)
                        break
                    except replies.EmptyStream:
                        # The engine took the request and closed before its first event (it
                        # died): nothing reached the client yet, so another engine takes it.
                        tried[-1].mark_down()
                    finally:
                        resp.release()
        except asyncio.CancelledError:
            if not state["disconnected"]:
                raise
            out.status = 499  # client closed the request; upstream was cancelled by closing
            self.metrics.upstream_errors.labels("client_disconnected").inc()
        except ClientGone:  # seen by the direct relay before the watcher's cancel arrived
            out.status = 499
            self.metrics.upstream_errors.labels("client_disconnected").inc()
        except TimeoutError:
            self.metrics.upstream_errors.labels("timeout").inc()
            if out.status == 200:  # mid-stream: the status is already sent
                await replies.stream_error(
                    send, UpstreamTimeout("upstream timed out mid-stream"), out
                )
            else:
                raise UpstreamTimeout(
                    f"upstream did not answer within {self.s.request_timeout_s:g}s"
                ) from None
        finally:
            state["done"] = True
            watcher.cancel()

    async def _open(
        self,
        path: bytes,
        body: bytes,
        backends: list[Backend],
        rid: str,
        out: Outcome,
        tried: list[Backend],
    ) -> Response:
        """Send to the best backend not in `tried`; on a connect failure, mark it down and try
        the next. The backend that answers is added to `tried`."""
        headers = [
            (b"content-type", b"application/json"),
            (b"x-request-id", rid.encode()),
            (tracing.TRACEPARENT, out.traceparent),
            *self.inference_headers,
        ]
        busy = probed = False
        while (backend := choose(backends, tried)) is not None or not probed:
            if backend is None:
                # All left are marked down; one a request marked since the last probe (every 5 s)
                # may be back: probe now, once. (A fleet that is down makes no new marks.)
                probed = True
                since = self.router.last_refresh
                if any(b.down_since > since for b in backends if b not in tried):
                    await self.router.refresh()
                continue
            mark = backend.request_started()
            try:
                resp = await backend.pool.request(
                    b"POST", path, body, headers, connect_timeout=self.s.connect_timeout_s
                )
            except UpstreamBusy:
                # Up but saturated: another backend may take it; this one is not marked down.
                backend.request_done()
                self.metrics.upstream_errors.labels("busy").inc()
                tried.append(backend)
                busy = True
                continue
            except (UpstreamConnectError, UpstreamProtocolError) as exc:
                # Nothing reached the client yet: mark the backend down and try the next one.
                # (A protocol error means it took the request and broke: it may be dying.)
                backend.request_done()
                kind = "connect" if isinstance(exc, UpstreamConnectError) else "protocol"
                self.metrics.upstream_errors.labels(kind).inc()
                backend.mark_down()
                tried.append(backend)
                continue
            except BaseException:
                backend.request_done()
                raise

            def released(backend: Backend = backend, mark: float = mark) -> None:
                backend.request_done()
                out.engine_s = backend.shared_s - mark  # its share of the engine's time

            resp.on_release = released
            tried.append(backend)
            return resp
        if busy:
            full = Unavailable("every inference backend for this model is busy; try again shortly")
            full.headers["retry-after"] = "1"
            raise full
        raise Unavailable("no inference backend is reachable for this model; try again shortly")

    async def _relay(
        self, resp: Response, send: Send, stream: bool, rid: str, out: Outcome, start: float
    ) -> None:
        if resp.status != 200:
            raw = await resp.read()
            self.metrics.upstream_errors.labels(f"status_{resp.status // 100}xx").inc()
            raise replies.upstream_error(resp.status, raw)
        ctype = next((v for k, v in resp.headers if k == b"content-type"), b"")
        if stream and ctype.startswith(b"text/event-stream"):
            await self._relay_stream(resp, send, rid, out, start)
            return
        raw = await resp.read()
        try:
            usage = orjson.loads(raw).get("usage") or {}
        except (orjson.JSONDecodeError, AttributeError):
            self.metrics.upstream_errors.labels("bad_body").inc()
            raise UpstreamError("the inference backend sent a malformed response") from None
        count(usage if isinstance(usage, dict) else {}, out)
        out.status = 200
        if out.capture is not None:
            self.keep(out, rid, raw, stream=False)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*replies.JSON_HEADERS, *ids(rid), *out.served],
            }
        )
        await send({"type": "http.response.body", "body": raw, "more_body": False})

    async def _relay_stream(
        self, resp: Response, send: Send, rid: str, out: Outcome, start: float
    ) -> None:
        chunks = resp.iter_chunks(self.s.stream_idle_timeout_s)
        try:
            # Peek: until the first byte is sent, a failure is still an honest status code.
            first = await anext(chunks)
        except (StopAsyncIteration, UpstreamProtocolError):
            self.metrics.upstream_errors.labels("protocol").inc()
            raise replies.EmptyStream() from None
        out.ttft = time.perf_counter() - start
        out.status = 200
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*replies.SSE_HEADERS, *ids(rid), *out.served],
            }
        )
        usage = UsageSniffer(out, strip=out.strip_usage, keep=out.capture is not None)
        if out.route == RESPONSES:
            usage.marker = b'"output_tokens"'  # in the final response.completed event
        await send({"type": "http.response.body", "body": usage.feed(first), "more_body": True})
        client = direct_client(send) if self.s.stream_relay == "direct" else None
        self.metrics.streams_by_relay["asgi" if client is None else "direct"].inc()
        try:
            if client is None:
                async for chunk in chunks:
                    if chunk := usage.feed(chunk):
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                await chunks.aclose()
                await resp.relay(
                    client.sink(usage.feed), client.drain_or_gone, self.s.stream_idle_timeout_s
                )
        except UpstreamProtocolError:
            self.metrics.upstream_errors.labels("stream_broken").inc()
            broke = UpstreamError("the inference backend broke the stream")
            await replies.stream_error(send, broke, out)
            return
        # The engine's answer is whole: kept before the final send, which a client that closes
        # on `[DONE]` may cut short (the exchange must not be lost with it).
        if usage.kept is not None:
            self.keep(out, rid, b"".join(usage.kept), stream=True)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def keep(self, out: Outcome, rid: str, response: bytes, *, stream: bool) -> None:
        """Hand a finished exchange to the capture outbox (no I/O here)."""
        key = out.key
        assert key is not None and out.capture is not None
        meta = {
            "kind": "response" if out.route == RESPONSES else "chat.completion",
            "previous_response_id": out.previous_response_id,
            "own_input_from": out.own_input_from,
            "owner": key.owner,
            "key_id": key.id,
            "retention_days": key.retention_days,
            "created": time.time(),
            "stream": stream,
            "strip_usage": out.strip_usage,
            "request_id": rid,
            "trace_id": out.traceparent[3:35].decode(),
        }
        self.outbox.put(meta, out.capture, response)

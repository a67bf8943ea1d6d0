"""The gateway: the one front door (OpenAI-compatible API, keys, limits, routing, streaming).

The two hot routes (chat and completions) go straight from a thin ASGI front to the proxy; the
public prefixes of Crucible's own services (`forward.SERVICE_ROUTES`) to the service forwarder;
every other route is an ordinary FastAPI route. Only these allow-lists are ever forwarded:
vLLM's admin routes (LoRA loading, sleep, /invocations, ...) are unreachable through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import quote

import httpx
from fastapi import Depends, FastAPI, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.types import Receive, Scope, Send

from services.common.app import build_app
from services.common.errors import InvalidRequest, NotFound, Unavailable
from services.common.logging import configure_logging
from services.common.outbox import ALIAS_OUTCOMES, CAPTURES, USAGE, Outbox
from services.common.pagination import PageParams
from services.common.tenancy import OWNER_HEADER, OWNER_RE
from services.gateway import roles
from services.gateway.aliases import AliasRouter, AliasTable
from services.gateway.audit import Actor, AuditLog
from services.gateway.budgets import budgets_of
from services.gateway.config import GatewaySettings
from services.gateway.forward import ServiceForwarder, route_of
from services.gateway.keys import (
    ON_BEHALF_HEADER,
    ApiKey,
    KeyCreateRequest,
    KeyStore,
    KeyUpdateRequest,
    usd,
    usd_micros,
)
from services.gateway.limits import RateLimiter
from services.gateway.metrics import GatewayMetrics
from services.gateway.openapi import PublicDocument
from services.gateway.owners import ModelOwners
from services.gateway.projects import ProjectCreate, Projects, ProjectUpdate
from services.gateway.proxy import Proxy
from services.gateway.quotas import StoredQuotas
from services.gateway.redisio import Redis, RedisReplyError
from services.gateway.routing import Router

log = logging.getLogger("crucible.gateway")
FORWARDED = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})


class Gateway:
    """The ASGI app uvicorn runs: hot routes to the proxy, the rest to FastAPI."""

    def __init__(self, api: FastAPI) -> None:
        self.api = api
        self.proxy: Proxy | None = None  # set by the lifespan
        self.forwarder: ServiceForwarder | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.proxy is not None and self.forwarder is not None:
            path = scope["path"]
            # POST makes a completion (the proxy); GET lists stored chat completions (the
            # lifecycle store behind the forwarder); the proxy answers any other method 405.
            if path in FORWARDED:
                if scope["method"] == "GET" and path == "/v1/chat/completions":
                    await self.forwarder(scope, receive, send, path)
                else:
                    await self.proxy(scope, receive, send)
                return
            if (route := route_of(path)) is not None:
                await self.forwarder(scope, receive, send, route)
                return
        await self.api(scope, receive, send)


def create_app(settings: GatewaySettings | None = None) -> Gateway:
    s = settings or GatewaySettings()
    gateway: Gateway

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys = KeyStore(
            s.db_url(),
            default_rpm=s.default_rpm,
            default_max_concurrency=s.default_max_concurrency,
            cache_ttl=s.key_cache_ttl_s,
            internal_token=s.internal_token.get_secret_value(),
        )
        metrics = GatewayMetrics(app.state.registry)
        router = Router(
            s.inference_urls,
            refresh_interval=s.routing_refresh_s,
            on_probe=lambda b: metrics.backend_up.labels(b.url).set(int(b.healthy)),
            headers=s.inference_headers(),
        )
        limiter = RateLimiter(s.redis_url, on_error=s.rate_limit_on_redis_error)
        await router.start()
        app.state.keys, app.state.router, app.state.limiter = keys, router, limiter
        app.state.audit = audit = AuditLog(keys.sessions)
        app.state.projects = Projects(keys)
        owners = ModelOwners(s.finetune_url, s.internal_token)
        app.state.owners = owners
        outbox_redis = Redis(s.redis_url, timeout=2.0)
        outbox = Outbox(
            outbox_redis,
            CAPTURES,
            app.state.registry,
            buffer=s.capture_buffer,
            max_len=s.capture_stream_max,
        )
        outbox.start()
        outcomes = Outbox(outbox_redis, ALIAS_OUTCOMES, app.state.registry, max_len=100_000)
        outcomes.start()
        usage = Outbox(outbox_redis, USAGE, app.state.registry, max_len=1_000_000)
        usage.start()
        aliases = AliasTable(s.finetune_url, s.internal_token, refresh_s=s.alias_refresh_s)
        await aliases.start()
        app.state.aliases = aliases
        alias_router = AliasRouter(aliases, router, metrics, outcomes)
        quotas = StoredQuotas(s.finetune_url, s.internal_token, refresh_s=s.quota_refresh_s)
        await quotas.start()
        gateway.proxy = Proxy(
            s, router, keys, limiter, metrics, owners, outbox, alias_router, quotas, usage
        )
        gateway.forwarder = ServiceForwarder(s, gateway.proxy, audit)

        async def note_key_use() -> None:
            while True:
                await asyncio.sleep(s.key_last_used_every_s)
                try:
                    await keys.aflush_used()
                except Exception:  # the database away: this round's uses are not recorded
                    log.warning("key last use not recorded", exc_info=True)

        key_use = asyncio.create_task(note_key_use())
        try:
            yield
        finally:
            key_use.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await key_use
            with contextlib.suppress(Exception):
                await keys.aflush_used()
            await outbox.aclose(timeout=5.0)  # what is buffered, before the process goes
            await outcomes.aclose(timeout=1.0)
            await usage.aclose(timeout=2.0)
            await aliases.aclose()
            await quotas.aclose()
            await outbox_redis.aclose()
            await gateway.forwarder.aclose()
            await gateway.proxy.lifecycle.aclose()
            if gateway.proxy.spans is not None:
                await asyncio.to_thread(gateway.proxy.spans.close)
            await owners.aclose()
            gateway.proxy, gateway.forwarder = None, None
            await router.stop()
            await limiter.aclose()
            keys.engine.dispose()

    async def redis_ready() -> None:
        await api.state.limiter.ping()

    async def backend_ready() -> None:
        if not any(b.healthy for b in api.state.router.backends):
            raise ConnectionError("no inference backend is up")

    api = build_app(
        "gateway",
        settings=s,
        lifespan=lifespan,
        ready_checks=[("inference", backend_ready), ("redis", redis_ready)],
        title="Crucible gateway",
        version="0.1.0",
        # Served by `_routes` instead: the document joins the services' own (openapi.py).
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    api.include_router(_routes())
    api.state.document = PublicDocument(api, s)
    gateway = Gateway(api)
    api.state.gateway = gateway
    return gateway


# --- the cold routes ---------------------------------------------------------------------------


def _allowed(permission: str) -> Any:
    """A dependency: the request's key (in the project it acts in), holding `permission`."""

    async def key(request: Request) -> ApiKey:
        proxy: Proxy | None = request.app.state.gateway.proxy
        if proxy is None:
            raise Unavailable("the gateway is starting")
        headers = {k.lower(): v for k, v in request.scope["headers"]}
        return await proxy.authenticate(headers, permission)

    return Depends(key)


ReadDep = Annotated[ApiKey, _allowed(roles.READ)]
WriteDep = Annotated[ApiKey, _allowed(roles.WRITE)]
AdminDep = Annotated[ApiKey, _allowed(roles.ADMIN)]


def _routes() -> Any:
    from fastapi import APIRouter

    r = APIRouter()

    @r.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(await request.app.state.document.get())

    @r.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Crucible API")

    @r.get("/v1/models")
    async def list_models(request: Request, key: ReadDep) -> dict[str, Any]:
        owners = request.app.state.owners
        await owners.refresh(min_age=owners.ttl)
        cards = [c for c in request.app.state.router.models() if owners.visible(key, c["id"])]
        served = {c["id"] for c in cards}
        cards += [
            a.card
            for a in request.app.state.aliases.of_owner(key.owner)
            if key.may_use(a.name) and a.name not in served
        ]
        return {"object": "list", "data": cards}

    @r.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request, key: ReadDep) -> dict[str, Any]:
        for card in request.app.state.router.models():
            if card["id"] == model_id and await request.app.state.owners.may_use(key, model_id):
                return dict(card)
        found = request.app.state.aliases.find(key.owner, model_id)
        if found is not None and key.may_use(found[0].name):
            return dict(found[0].card)
        raise NotFound(
            f"The model `{model_id}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )

    @r.delete("/v1/models/{model_id:path}")
    async def delete_model(model_id: str, request: Request, key: WriteDep) -> JSONResponse:
        """OpenAI's "delete a fine-tuned model": the finetune service (which owns adapters)
        unloads it from every server and deletes its files; this gateway forgets it before
        answering, so it is gone from `/v1/models` at once."""
        r = await _finetune(request, "DELETE", f"/v1/models/{quote(model_id, safe=':')}", key)
        if r.status_code == 200:
            state = request.app.state
            await asyncio.gather(state.router.refresh(), state.owners.refresh())
            audit: AuditLog = state.audit
            await asyncio.to_thread(audit.record, _actor(key), "model.delete", model_id)
        return JSONResponse(r.json(), status_code=r.status_code)

    @r.post("/admin/keys", status_code=201, responses={409: {"description": "Archived project"}})
    async def create_key(
        body: KeyCreateRequest, request: Request, admin: AdminDep
    ) -> dict[str, Any]:
        """A key in a project (`project_id`), with a role; the secret is in this answer only."""
        _priced(request, body)
        keys: KeyStore = request.app.state.keys
        made = functools.partial(keys.create, **body.arguments(), actor=_actor(admin))
        secret, info = await asyncio.to_thread(made)
        return {**info, "key": secret}

    @r.get("/admin/keys")
    async def list_keys(
        request: Request,
        _: AdminDep,
        project_id: Annotated[str | None, Query(max_length=128)] = None,
    ) -> dict[str, Any]:
        """Every key (revoked ones too, with when each was last used), or a project's."""
        listed = await asyncio.to_thread(request.app.state.keys.list, project_id)
        return {"object": "list", "data": listed}

    @r.get("/admin/keys/{key_id}")
    async def get_key(key_id: str, request: Request, _: AdminDep) -> dict[str, Any]:
        """A key, with what its budgets have used or reserved this period."""
        found = await asyncio.to_thread(request.app.state.keys.get, key_id)
        if found is None:
            raise NotFound(f"no key {key_id[:64]!r}", param="key_id")
        return await _spent(request, "key", found)

    @r.post("/admin/keys/{key_id}")
    async def update_key(
        key_id: str, body: KeyUpdateRequest, request: Request, admin: AdminDep
    ) -> dict[str, Any]:
        """Change a key's limits, models, storing, retention or expiry without reissuing it:
        this gateway process applies it at once, the others within `key_cache_ttl_s`."""
        _priced(request, body)
        keys: KeyStore = request.app.state.keys
        changes = body.model_dump(exclude_unset=True)
        updated = await asyncio.to_thread(keys.update, key_id, changes, _actor(admin))
        if updated is None:
            raise NotFound(f"no active key {key_id[:64]!r}", param="key_id")
        return updated

    @r.post("/admin/projects", status_code=201)
    async def create_project(
        body: ProjectCreate, request: Request, admin: AdminDep
    ) -> dict[str, Any]:
        _priced(request, body)
        projects: Projects = request.app.state.projects
        return await asyncio.to_thread(projects.create, body, _actor(admin))

    @r.get("/admin/projects")
    async def list_projects(
        request: Request, _: AdminDep, include_archived: bool = False
    ) -> dict[str, Any]:
        projects: Projects = request.app.state.projects
        listed = await asyncio.to_thread(projects.list, include_archived)
        return {"object": "list", "data": listed}

    @r.get("/admin/projects/{project_id}")
    async def get_project(project_id: str, request: Request, _: AdminDep) -> dict[str, Any]:
        """A project, with what its budgets have used or reserved this period."""
        projects: Projects = request.app.state.projects
        return await _spent(request, "project", await asyncio.to_thread(projects.get, project_id))

    @r.post("/admin/projects/{project_id}")
    async def update_project(
        project_id: str, body: ProjectUpdate, request: Request, admin: AdminDep
    ) -> dict[str, Any]:
        """Rename a project or change its budgets (null: none)."""
        _priced(request, body)
        projects: Projects = request.app.state.projects
        return await asyncio.to_thread(projects.update, project_id, body, _actor(admin))

    @r.post("/admin/projects/{project_id}/archive", responses={409: {"description": "Own"}})
    async def archive_project(project_id: str, request: Request, admin: AdminDep) -> Any:
        """Revokes the project's keys (at once here, on other gateway processes within
        `key_cache_ttl_s`); its objects stay, for an admin to export."""
        projects: Projects = request.app.state.projects
        return await asyncio.to_thread(projects.archive, project_id, _actor(admin))

    @r.get("/admin/projects/{project_id}/chat_completions")
    async def export_completions(project_id: str, request: Request, admin: AdminDep) -> Any:
        """Every stored completion of a project, with its feedback (the lifecycle store's)."""
        return await _lifecycle(request, "GET", project_id, admin)

    @r.delete("/admin/projects/{project_id}/chat_completions")
    async def purge_completions(project_id: str, request: Request, admin: AdminDep) -> Any:
        return await _lifecycle(request, "DELETE", project_id, admin)

    @r.delete("/admin/keys/{key_id}")
    async def revoke_key(key_id: str, request: Request, admin: AdminDep) -> dict[str, Any]:
        keys: KeyStore = request.app.state.keys
        if not await asyncio.to_thread(keys.revoke, key_id, _actor(admin)):
            raise NotFound(f"no active key {key_id[:64]!r}", param="key_id")
        return {"id": key_id, "object": "api_key", "deleted": True}

    @r.get("/admin/audit")
    async def audit_log(
        request: Request,
        _: AdminDep,
        page: PageParams,
        action: Annotated[str | None, Query(max_length=64)] = None,
        target: Annotated[str | None, Query(max_length=256)] = None,
    ) -> dict[str, Any]:
        """Who changed what and when (keys, aliases, models, exports), newest first; `action`
        and `target` (a key id, an alias's name, a model, an owner) narrow it."""
        log_: AuditLog = request.app.state.audit
        return await asyncio.to_thread(log_.events, page, action, target)

    return r


async def _spent(request: Request, scope: str, found: dict[str, Any]) -> dict[str, Any]:
    """`found` with `budget_used` (tokens) and `budget_used_usd`: null without that budget, or
    while Redis cannot say."""
    out = {**found, "budget_used": None, "budget_used_usd": None}
    budgets = budgets_of(
        scope,
        found["id"],
        found["budget_tokens"],
        usd_micros(found["budget_usd"]),
        found["budget_period"],
    )
    for budget in budgets:
        with contextlib.suppress(OSError, TimeoutError, RedisReplyError):
            used = await request.app.state.gateway.proxy.budgets.used(budget)
            if budget.unit == "usd":
                out["budget_used_usd"] = usd(used)
            else:
                out["budget_used"] = used
    return out


def _priced(request: Request, body: KeyUpdateRequest | ProjectUpdate) -> None:
    """A dollar budget needs the gateway's price list (400 naming the setting without one)."""
    if body.budget_usd is not None and not request.app.state.gateway.proxy.budgets.prices:
        raise InvalidRequest(
            "a budget in dollars prices tokens by the gateway's price list, and it has none: "
            "set CRUCIBLE_GATEWAY_BUDGET_PRICES (USD per million tokens), or budget tokens",
            param="budget_usd",
        )


def _actor(key: ApiKey) -> Actor:
    return key.id, key.owner


async def _finetune(
    request: Request, method: str, path: str, key: ApiKey | None = None
) -> httpx.Response:
    """A call to the finetune service with the internal token, as `key` when given (its owner
    and id, as the forwarder sends them)."""
    s: GatewaySettings = request.app.state.settings
    headers = {"authorization": f"Bearer {s.internal_token.get_secret_value()}"}
    if key is not None:
        headers |= {OWNER_HEADER: key.owner, ON_BEHALF_HEADER: key.id}
    async with httpx.AsyncClient(timeout=300) as http:
        try:
            return await http.request(method, f"{s.finetune_url}{path}", headers=headers)
        except httpx.HTTPError:
            raise Unavailable("the finetune service is unavailable; try again shortly") from None


async def _lifecycle(request: Request, method: str, owner: str, admin: ApiKey) -> Any:
    if not OWNER_RE.fullmatch(owner):
        raise NotFound(f"no project {owner[:128]!r}", param="project_id")
    r = await _finetune(request, method, f"/internal/captures/{owner}")
    if r.status_code < 300:
        action = "data.export" if method == "GET" else "data.purge"
        audit: AuditLog = request.app.state.audit
        await asyncio.to_thread(audit.record, _actor(admin), action, owner)
    return JSONResponse(r.json(), status_code=r.status_code)


def main() -> None:
    import uvicorn

    s = GatewaySettings()
    configure_logging("gateway", s.log_level)
    uvicorn.run(
        create_app(s),
        host=s.host,
        port=s.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        # The gateway is the edge: nothing in front of it rewrites client addresses.
        proxy_headers=False,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()

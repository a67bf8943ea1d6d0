"""/v1/model_aliases: stable names over weighted targets, changed only by new revisions.

POST   /v1/model_aliases                      create {name, routes, sticky, gate, guard}
GET    /v1/model_aliases                      the owner's aliases
GET    /v1/model_aliases/{name}
POST   /v1/model_aliases/{name}               update (a new revision; the gate applies)
DELETE /v1/model_aliases/{name}
POST   /v1/model_aliases/{name}/promote       {model, weight?, reason?, force?}
POST   /v1/model_aliases/{name}/rollback      {revision?, reason?}
GET    /v1/model_aliases/{name}/revisions
GET    /internal/aliases                      every alias's routing, for the gateways (ETag)
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator

from services.common.errors import (
    AuthenticationFailed,
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from services.common.etag import conditional_json
from services.common.pagination import PageParams
from services.common.tenancy import Owner, internal_only
from services.finetune.adapters import served_models
from services.finetune.aliases import NAME_RE, PIN, AliasStore, alias_object, promoted
from services.finetune.aliasgate import check_gate
from services.finetune.remote import ADMIN_HEADER, KEY_ID_HEADER, model_available

Weight = Annotated[float, Field(ge=0, le=1_000_000, allow_inf_nan=False)]
Share = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Reason = Annotated[StrictStr, Field(max_length=1000)] | None


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    weight: Weight


class Gate(BaseModel):
    """Promotion needs a completed run of `eval_id` on the candidate that passes these bars."""

    model_config = ConfigDict(extra="forbid")
    eval_id: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    min_pass_rate: Share | None = None
    max_regression: Share | None = None  # not worse than the incumbent by more than this

    @model_validator(mode="after")
    def _a_bar(self) -> Gate:
        if self.min_pass_rate is None and self.max_regression is None:
            raise ValueError("a gate needs min_pass_rate, max_regression or both")
        return self


class Guard(BaseModel):
    """Roll back by itself when a target the latest revision raised crosses a bar."""

    model_config = ConfigDict(extra="forbid")
    window_s: Annotated[float, Field(ge=5, le=86_400)] = 300
    min_requests: Annotated[int, Field(ge=1, le=1_000_000)] = 20
    max_error_ratio: Share | None = None
    max_p95_ms: Annotated[float, Field(gt=0, le=3_600_000)] | None = None
    max_negative_feedback_ratio: Share | None = None
    feedback_metric: Annotated[StrictStr, Field(min_length=1, max_length=64)] = "rating"
    negative_values: Annotated[
        list[Annotated[StrictStr, Field(max_length=512)]], Field(min_length=1, max_length=20)
    ] = ["bad", "false", "thumbs_down", "negative"]

    @model_validator(mode="after")
    def _a_bar(self) -> Guard:
        bars = (self.max_error_ratio, self.max_p95_ms, self.max_negative_feedback_ratio)
        if all(b is None for b in bars):
            raise ValueError(
                "a guard needs max_error_ratio, max_p95_ms or max_negative_feedback_ratio"
            )
        return self


Routes = Annotated[list[Route], Field(min_length=1, max_length=8)]
Sticky = Literal["user", "key", "none"]


class AliasCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    routes: Routes
    sticky: Sticky = "user"
    gate: Gate | None = None
    guard: Guard | None = None
    reason: Reason = None


class AliasUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    routes: Routes | None = None
    sticky: Sticky | None = None
    gate: Gate | None = None
    guard: Guard | None = None
    reason: Reason = None


class Promote(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    weight: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = 100
    reason: Reason = None
    force: StrictBool = False


class Rollback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    revision: Annotated[int, Field(ge=1)] | None = None
    reason: Reason = None


def _key_id(request: Request) -> str:
    key_id = request.headers.get(KEY_ID_HEADER, "")
    if not key_id:
        raise AuthenticationFailed("aliases are changed through the gateway, as a key")
    return key_id


def _check_routes(
    request: Request, owner: str, routes: list[dict[str, Any]], known: frozenset[str] = frozenset()
) -> None:
    """Targets once each, none an alias, some weight; each new one usable by the caller's key
    (one already routed is not asked again: an adapter since retired must not block a change)."""
    s, store = request.app.state.settings, request.app.state.aliases
    seen = set()
    for i, r in enumerate(routes):
        model, param = r["model"], f"routes[{i}].model"
        if model in seen:
            raise InvalidRequest(f"{model} is routed twice", param=param)
        seen.add(model)
        if PIN in model or store.exists(owner, model):
            raise InvalidRequest(f"{model} is an alias; an alias routes to models", param=param)
        if model not in known:
            model_available(s, _key_id(request), model, param)
    if not sum(r["weight"] for r in routes) > 0:
        raise InvalidRequest("at least one route needs a weight above 0", param="routes")


def _check_name(request: Request, name: str) -> None:
    if not NAME_RE.match(name):
        raise InvalidRequest(
            "an alias name is 1-64 letters, digits, '.', '_' or '-' (no ':', '/' or '@', "
            "which model ids use), starting with a letter or digit",
            param="name",
        )
    s = request.app.state.settings
    for url in s.inference_urls:
        try:
            served = served_models(url, s.inference_headers())
        except httpx.HTTPError:
            continue
        if name in served:
            raise Conflict(f"'{name}' is a model id; an alias may not shadow it.", param="name")


def _config(body: AliasCreate | AliasUpdate, current: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(current or {})
    fields = body.model_fields_set if current else set(AliasCreate.model_fields)
    for name in ("routes", "sticky", "gate", "guard"):
        if name in fields:
            value = getattr(body, name)
            out[name] = (
                [r.model_dump() for r in value]
                if name == "routes"
                else value.model_dump()
                if isinstance(value, BaseModel)
                else value
            )
    return out


def _check_gate_eval(request: Request, owner: str, config: dict[str, Any]) -> None:
    gate = config.get("gate")
    if gate:
        try:
            request.app.state.evals.get_eval(gate["eval_id"], owner)
        except NotFound:
            raise InvalidRequest(f"no eval {gate['eval_id']!r}", param="gate.eval_id") from None


def router() -> APIRouter:
    r = APIRouter()

    def store(request: Request) -> AliasStore:
        aliases: AliasStore = request.app.state.aliases
        return aliases

    def change(
        request: Request,
        owner: str,
        name: str,
        action: str,
        reason: str | None,
        make: Any,
        force: bool = False,
    ) -> dict[str, Any]:
        """A gated change: `make(current config)` is the new config."""
        if force and request.headers.get(ADMIN_HEADER) != "1":
            raise PermissionDenied("only an admin key may force past the gate", param="force")
        row, current = store(request).get(owner, name)
        config = make(current.config)
        known = frozenset(r["model"] for r in current.config["routes"])
        _check_routes(request, owner, config["routes"], known)
        _check_gate_eval(request, owner, config)
        evidence = None
        if not force:
            evidence = check_gate(request.app.state.evals, owner, name, current.config, config)
        row, rev = store(request).change(
            row, current, config, _key_id(request), action, reason, forced=force, evidence=evidence
        )
        return alias_object(row, rev)

    @r.post("/v1/model_aliases")
    def create(body: AliasCreate, request: Request, owner: Owner) -> dict[str, Any]:
        _check_name(request, body.name)
        if store(request).exists(owner, body.name):
            raise Conflict(f"A model alias named '{body.name}' already exists.", param="name")
        config = _config(body, None)
        _check_routes(request, owner, config["routes"])
        _check_gate_eval(request, owner, config)
        return store(request).create(owner, body.name, config, _key_id(request), body.reason)

    @r.get("/v1/model_aliases")
    def list_aliases(request: Request, owner: Owner) -> dict[str, Any]:
        data = store(request).of_owner(owner)
        return {"object": "list", "data": data, "has_more": False}

    @r.get("/v1/model_aliases/{name}")
    def retrieve(name: str, request: Request, owner: Owner) -> dict[str, Any]:
        return alias_object(*store(request).get(owner, name))

    @r.post("/v1/model_aliases/{name}")
    def update(name: str, body: AliasUpdate, request: Request, owner: Owner) -> dict[str, Any]:
        return change(request, owner, name, "update", body.reason, lambda c: _config(body, c))

    @r.delete("/v1/model_aliases/{name}")
    def delete(name: str, request: Request, owner: Owner) -> dict[str, Any]:
        store(request).delete(owner, name)
        return {"object": "model_alias.deleted", "name": name, "deleted": True}

    @r.post("/v1/model_aliases/{name}/promote")
    def promote(name: str, body: Promote, request: Request, owner: Owner) -> dict[str, Any]:
        def make(current: dict[str, Any]) -> dict[str, Any]:
            return promoted(current, body.model, body.weight)

        return change(request, owner, name, "promote", body.reason, make, force=body.force)

    @r.post("/v1/model_aliases/{name}/rollback")
    def rollback(name: str, body: Rollback, request: Request, owner: Owner) -> dict[str, Any]:
        aliases = store(request)
        row, current = aliases.get(owner, name)
        target = aliases.rollback_target(row, current, body.revision)
        row, rev = aliases.change(
            row,
            current,
            target.config,
            _key_id(request),
            "rollback",
            body.reason,
            restored=target.number,
        )
        return alias_object(row, rev)

    @r.get("/v1/model_aliases/{name}/revisions")
    def revisions(name: str, request: Request, owner: Owner, page: PageParams) -> dict[str, Any]:
        return store(request).revisions(owner, name, page)

    @r.get("/internal/aliases", dependencies=[Depends(internal_only)])
    async def table(request: Request) -> Response:
        data = await asyncio.to_thread(store(request).table)
        return conditional_json(request, {"object": "list", "data": data})

    return r

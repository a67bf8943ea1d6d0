"""OpenAI's Usage and Costs API over the usage records (usage.py): the query parameters as its
schema has them, checked (400 naming the parameter), and the routes; an admin key sees every
project, any other key its own."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from services.common.errors import InvalidRequest
from services.common.tenancy import Owner
from services.finetune.config import FinetuneSettings
from services.finetune.remote import ADMIN_HEADER
from services.finetune.usage import GROUPS, LATEST, LIMITS, PAGE_RE, WIDTHS, UsageStore


def _int(request: Request, name: str, default: int | None = None) -> int | None:
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise InvalidRequest(f"`{name}` must be an integer", param=name) from None
    if not 0 <= number <= LATEST:
        raise InvalidRequest(f"`{name}` must be 0 to {LATEST} (seconds)", param=name)
    return number


def _list(request: Request, name: str) -> list[str]:
    """An array parameter: `name=a&name=b`, `name[]=a`, or `name=a,b`."""
    values = request.query_params.getlist(name) + request.query_params.getlist(name + "[]")
    return [v for value in values for v in value.split(",") if v]


def _query(request: Request, kind: str, owner: str) -> dict[str, Any]:
    """`UsageStore.buckets`' arguments (or `costs`', less `kind` and `width`) from OpenAI's
    query parameters, checked as its schema has them (400 naming the parameter)."""
    start = _int(request, "start_time")
    if start is None:
        raise InvalidRequest("`start_time` is required (Unix seconds)", param="start_time")
    end = _int(request, "end_time", int(time.time()) + 1)
    assert end is not None
    width_name = request.query_params.get("bucket_width", "1d")
    if width_name not in LIMITS[kind]:
        allowed = ", ".join(LIMITS[kind])
        raise InvalidRequest(f"`bucket_width` is one of {allowed}", param="bucket_width")
    default, most = LIMITS[kind][width_name]
    limit = _int(request, "limit", default)
    if limit is None or not 1 <= limit <= most:
        raise InvalidRequest(f"`limit` is 1 to {most} for bucket_width {width_name}", param="limit")
    if (page := request.query_params.get("page")) is not None:
        matched = PAGE_RE.fullmatch(page)
        if matched is None or not start <= int(matched[1]) < end:
            raise InvalidRequest("`page` is not a cursor this query gave", param="page")
        start = int(matched[1])
    if not 0 <= start < end:
        raise InvalidRequest("`start_time` must be before `end_time`", param="start_time")
    group_by = _list(request, "group_by")
    if unknown := [g for g in group_by if g not in GROUPS[kind]]:
        raise InvalidRequest(f"cannot group by {unknown[0][:64]!r}", param="group_by")
    filters = {"project_id": _list(request, "project_ids")}
    if kind not in ("vector_stores", "costs"):  # storage and costs: by project only
        filters |= {"api_key_id": _list(request, "api_key_ids"), "model": _list(request, "models")}
    filters = {k: v for k, v in filters.items() if v}
    # Nothing here is a batch job or has a user: asking for only those finds nothing.
    if request.query_params.get("batch") == "true" or _list(request, "user_ids"):
        filters["project_id"] = []
    if request.headers.get(ADMIN_HEADER) != "1":  # another project's usage is not this key's
        asked = filters.get("project_id", [owner])
        filters["project_id"] = [owner] if owner in asked else []
    return {
        "kind": kind,
        "start": start,
        "end": end,
        "width": WIDTHS[width_name],
        "limit": limit,
        "group_by": group_by,
        "filters": filters,
    }


def _parameters(kind: str) -> dict[str, Any]:
    """The query parameters as OpenAI's schema has them (parsed by `_query`, which also takes
    arrays as `name[]=` the way the official SDK sends them)."""

    def array(name: str, items: dict[str, Any]) -> dict[str, Any]:
        schema = {"type": "array", "items": items}
        return {"name": name, "in": "query", "schema": schema, "style": "form", "explode": True}

    seconds = {"type": "integer", "minimum": 0, "maximum": LATEST}
    most = max(most for _, most in LIMITS[kind].values())
    filters = [array("project_ids", {"type": "string"})]
    if kind not in ("vector_stores", "costs"):
        filters += [array("api_key_ids", {"type": "string"}), array("models", {"type": "string"})]
    return {
        "parameters": [
            {"name": "start_time", "in": "query", "required": True, "schema": seconds},
            {"name": "end_time", "in": "query", "schema": seconds},
            {"name": "bucket_width", "in": "query", "schema": {"enum": list(LIMITS[kind])}},
            *filters,
            array("group_by", {"enum": list(GROUPS[kind])}),
            {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": most},
            },
            {"name": "page", "in": "query", "schema": {"type": "string"}},
        ]
    }


def router() -> APIRouter:
    r = APIRouter()

    @r.get("/v1/organization/usage/completions", openapi_extra=_parameters("completions"))
    def usage_completions(request: Request, owner: Owner) -> dict[str, Any]:
        """Tokens and requests of chat completions, completions and responses (the agent's and
        eval runs' model calls among them), in time buckets; an admin key sees every project
        (`project_ids` narrows), another key its own project's."""
        store: UsageStore = request.app.state.usage
        return store.buckets(**_query(request, "completions", owner))

    @r.get("/v1/organization/usage/embeddings", openapi_extra=_parameters("embeddings"))
    def usage_embeddings(request: Request, owner: Owner) -> dict[str, Any]:
        """Tokens and requests of `/v1/embeddings`, in time buckets, seen as the completions'."""
        store: UsageStore = request.app.state.usage
        return store.buckets(**_query(request, "embeddings", owner))

    @r.get("/v1/organization/usage/vector_stores", openapi_extra=_parameters("vector_stores"))
    def usage_vector_stores(request: Request, owner: Owner) -> dict[str, Any]:
        """The bytes the vector stores held, in time buckets (snapshots taken every
        `usage_snapshot_every_s`), seen as the completions'."""
        q = _query(request, "vector_stores", owner)
        store: UsageStore = request.app.state.usage
        return store.storage(
            q["start"], q["end"], q["width"], q["limit"], q["group_by"], q["filters"]
        )

    @r.get("/v1/organization/usage/agent_runs", openapi_extra=_parameters("agent_runs"))
    def usage_agent_runs(request: Request, owner: Owner) -> dict[str, Any]:
        """Crucible's own: agent runs that ended, in time buckets (`num_runs`, `steps`,
        `tool_calls`, `tool_seconds`, and the tokens of their model calls, which are also among
        the completions), seen as the completions'."""
        store: UsageStore = request.app.state.usage
        return store.buckets(**_query(request, "agent_runs", owner))

    @r.get("/v1/organization/usage/eval_runs", openapi_extra=_parameters("eval_runs"))
    def usage_eval_runs(request: Request, owner: Owner) -> dict[str, Any]:
        """Crucible's own: eval runs that ended, in time buckets (`num_runs`, and the model
        calls and tokens of their samples and graders, also among the completions)."""
        store: UsageStore = request.app.state.usage
        return store.buckets(**_query(request, "eval_runs", owner))

    @r.get("/v1/organization/costs", openapi_extra=_parameters("costs"))
    def costs(request: Request, owner: Owner) -> dict[str, Any]:
        """What the lab's engines cost, per day: each request's share of an engine's busy time
        priced by the cost model (settings `cost_*`), grouped by project and/or line item
        (`<model>, <kind>`); with `hosted_equivalent`, what a hosted API would have charged."""
        q = _query(request, "costs", owner)
        s: FinetuneSettings = request.app.state.settings
        store: UsageStore = request.app.state.usage
        return store.costs(
            q["start"],
            q["end"],
            q["limit"],
            q["group_by"],
            q["filters"],
            s.engine_usd_per_second(),
            s.cost_hosted_prices,
        )

    return r

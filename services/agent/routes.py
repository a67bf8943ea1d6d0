"""/v1/agent/runs: create (optionally streamed as SSE), retrieve with steps, list, cancel."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from services.agent import prompt
from services.agent.clients import KEY_HEADER
from services.agent.runner import Runner
from services.agent.runs import FINAL, RunRow, RunStore, new_run_id, run_object
from services.agent.tools import TOOLS
from services.common import tracing
from services.common.errors import (
    AuthenticationFailed,
    InvalidRequest,
    NotFound,
    RateLimited,
    Unavailable,
)
from services.common.pagination import PageParams
from services.common.tenancy import Owner, internal_only

ToolName = Literal[
    "search_documents", "molecule_info", "similarity", "substructure_match", "calculator"
]
assert set(ToolName.__args__) == set(TOOLS)  # type: ignore[attr-defined]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: Annotated[str, Field(min_length=1, max_length=100_000)]


class Budgets(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_steps: Annotated[int, Field(ge=1)] | None = None
    max_tokens: Annotated[int, Field(ge=64)] | None = None
    max_seconds: Annotated[float, Field(gt=0)] | None = None


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr
    messages: Annotated[list[Message], Field(min_length=1, max_length=100)]
    instructions: Annotated[str, Field(max_length=10_000)] | None = None
    tools: Annotated[list[ToolName], Field(max_length=len(TOOLS))] = []
    vector_store_ids: Annotated[
        list[Annotated[StrictStr, Field(min_length=1, max_length=128)]], Field(max_length=10)
    ] = []
    mode: Literal["auto", "structured", "native"] = "auto"
    tool_choice: Literal["auto", "required"] = "auto"
    budgets: Budgets = Field(default_factory=Budgets)
    stream: StrictBool = False  # 0 or "no" must not pass for false
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None


def router() -> APIRouter:
    r = APIRouter()

    @r.post("/v1/agent/runs", response_model=None)
    async def create(body: RunCreate, request: Request, owner: Owner) -> Any:
        state = request.app.state
        runner: Runner = state.runner
        key_id = request.headers.get(KEY_HEADER, "")
        if not key_id:
            raise AuthenticationFailed("runs are created through the gateway with an API key")
        if (limit := runner.busy(owner)) is not None:
            raise RateLimited(f"too many runs in progress ({limit} limit)", retry_after=5)
        row = await _new_run(body, owner, key_id, state)
        await asyncio.to_thread(state.store.create, row)
        queue = runner.start(row, listen=body.stream)
        if queue is None:
            return run_object(row, [])
        return StreamingResponse(
            _sse(row, queue, runner), media_type="text/event-stream", headers=_NO_BUFFER
        )

    @r.get("/v1/agent/runs")
    def list_runs(request: Request, owner: Owner, page: PageParams) -> dict[str, Any]:
        return request.app.state.store.list_runs(owner, page)

    @r.get("/v1/agent/runs/{run_id}")
    async def retrieve(run_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        return await _with_steps(request, run_id, owner)

    @r.post("/v1/agent/runs/{run_id}/cancel")
    async def cancel(run_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        store: RunStore = request.app.state.store
        row = await asyncio.to_thread(store.get, run_id, owner)
        if row.status in FINAL:
            raise InvalidRequest(f"Cannot cancel run with status '{row.status}'.", param="run_id")
        await asyncio.to_thread(store.request_cancel, run_id, owner)
        await request.app.state.runner.cancel(run_id)
        return await _with_steps(request, run_id, owner)

    @r.get("/internal/ended_runs", dependencies=[Depends(internal_only)])
    async def ended_runs(
        request: Request,
        since: Annotated[float, Query(ge=0)] = 0.0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 500,
    ) -> dict[str, Any]:
        """The usage of runs that ended at or after `since` (epoch seconds), oldest first."""
        store: RunStore = request.app.state.store
        return {"object": "list", "data": await asyncio.to_thread(store.ended_since, since, limit)}

    return r


async def _with_steps(request: Request, run_id: str, owner: str) -> dict[str, Any]:
    store: RunStore = request.app.state.store
    unwritten = request.app.state.runner.unwritten(run_id)  # taken before reading SQL
    row = await asyncio.to_thread(store.get, run_id, owner)
    steps = await asyncio.to_thread(store.steps, run_id)
    seen = {s["index"] for s in steps}
    steps += [s for s in unwritten if s["index"] not in seen]
    return run_object(row, steps)


_NO_BUFFER = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def _new_run(body: RunCreate, owner: str, key_id: str, state: Any) -> RunRow:
    s = state.settings
    b = body.budgets
    budgets = {
        "max_steps": b.max_steps or s.default_max_steps,
        "max_tokens": b.max_tokens or s.default_max_tokens,
        "max_seconds": b.max_seconds or s.default_max_seconds,
    }
    caps = {
        "max_steps": s.max_steps_cap,
        "max_tokens": s.max_tokens_cap,
        "max_seconds": s.max_seconds_cap,
    }
    for name, cap in caps.items():
        if budgets[name] > cap:
            raise InvalidRequest(f"budgets.{name} is at most {cap:g}", param=f"budgets.{name}")
    tools = list(dict.fromkeys(body.tools))
    if body.tool_choice == "required" and not tools:
        raise InvalidRequest("tool_choice 'required' needs at least one tool", param="tool_choice")
    if "search_documents" in tools and not body.vector_store_ids:
        raise InvalidRequest(
            "search_documents needs vector_store_ids to search", param="vector_store_ids"
        )
    await _check_stores(state, owner, body.vector_store_ids)
    await _check_model(state, owner, key_id, body.model)
    mode = body.mode
    if mode == "auto":
        mode = "native" if body.model in s.native_tool_models else "structured"
    nonce = prompt.new_nonce()
    return RunRow(
        id=new_run_id(),
        owner=owner,
        key_id=key_id,
        model=body.model,
        mode=mode,
        instructions=prompt.system_prompt(
            nonce, [TOOLS[t] for t in tools], mode, body.instructions
        ),
        nonce=nonce,
        messages=[m.model_dump() for m in body.messages],
        tools=tools,
        tool_choice=body.tool_choice,
        vector_store_ids=list(dict.fromkeys(body.vector_store_ids)),
        budgets=budgets,
        metadata_=body.metadata,
        status="queued",
        usage={},
        created_at=int(time.time()),
        trace_id=tracing.current_id(),
    )


async def _check_stores(state: Any, owner: str, stores: list[str]) -> None:
    for store in dict.fromkeys(stores):
        try:
            exists = await state.retrieval.store_exists(owner, store)
        except httpx.HTTPError:
            raise Unavailable("the retrieval service is unavailable; try again shortly") from None
        if not exists:
            raise NotFound(f"No vector store found with id '{store}'.", param="vector_store_ids")


async def _check_model(state: Any, owner: str, key_id: str, model: str) -> None:
    """The model exists and the run's key may use it (asked of the gateway, as that key)."""
    try:
        models = await state.model.models(key_id, owner)
    except httpx.HTTPError:
        raise Unavailable("the gateway is unavailable; try again shortly") from None
    if model not in models:
        raise NotFound(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )


async def _sse(row: RunRow, queue: asyncio.Queue[Any], runner: Runner) -> AsyncIterator[bytes]:
    """The run's events as they happen; a client that leaves cancels the run."""
    yield _event("run.created", run_object(row, []))
    finished = False
    try:
        while (item := await queue.get()) is not None:
            name, data = item
            finished = name.removeprefix("run.") in FINAL
            yield _event(name, data)
        yield b"event: done\ndata: [DONE]\n\n"
    finally:
        if not finished:
            runner.cancel_now(row.id)


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

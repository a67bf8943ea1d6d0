"""/v1/evals: OpenAI's Evals API (evals, runs, output items); runs execute on the eval worker."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from services.common import jsonl, tracing
from services.common.errors import AuthenticationFailed, InvalidRequest, NotFound
from services.common.metadata import check_metadata
from services.common.pagination import AscPageParams
from services.common.tenancy import Owner
from services.finetune.captures import Filter
from services.finetune.evals import EvalRow, EvalStore, RunRow, eval_object, new_id
from services.finetune.evalspec import (
    MAX_ITEMS,
    check_agent,
    check_criteria,
    check_items,
    check_references,
    config_object,
    item_schema_of,
)
from services.finetune.files import file_text
from services.finetune.remote import KEY_ID_HEADER, model_available, store_available
from services.finetune.responses import response_item, responses_match

RunStatus = Literal["queued", "in_progress", "completed", "canceled", "failed"]


class EvalCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[StrictStr, Field(max_length=256)] | None = None
    metadata: dict[str, Any] | None = None
    data_source_config: dict[str, Any]
    testing_criteria: list[Any]


class EvalUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[StrictStr, Field(max_length=256)] | None = None
    metadata: dict[str, Any] | None = None


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[StrictStr, Field(max_length=256)] | None = None
    metadata: dict[str, Any] | None = None
    data_source: dict[str, Any]


def _key_id(request: Request) -> str:
    key_id = request.headers.get(KEY_ID_HEADER, "")
    if not key_id:
        raise AuthenticationFailed("evaluations are run through the gateway, as a key")
    return key_id


def _jsonl_items(text: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for n, line in jsonl.lines(text):
        if len(items) >= MAX_ITEMS:
            raise InvalidRequest(f"the file has over {MAX_ITEMS} items", param="data_source")
        try:
            value = json.loads(line)
        except ValueError:
            raise InvalidRequest(f"line {n} is not JSON", param="data_source.source") from None
        if not isinstance(value, dict):
            raise InvalidRequest(f"line {n} is not an object", param="data_source.source")
        items.append(value if "item" in value else {"item": value})
    return items


def resolve_items(state: Any, owner: str, row: EvalRow, ds: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's items, checked against the eval's item schema (errors name the line)."""
    source = ds.get("source")
    config = row.data_source_config
    if source is None and config["type"] in ("logs", "stored_completions"):
        source = {"type": "stored_completions", "metadata": config.get("metadata")}
    if not isinstance(source, dict):
        raise InvalidRequest("data_source.source is required", param="data_source.source")
    kind, where = source.get("type"), "line"
    if kind == "file_content":
        content = source.get("content")
        if not isinstance(content, list) or not all(
            isinstance(c, dict) and isinstance(c.get("item"), dict) for c in content
        ):
            raise InvalidRequest(
                "data_source.source.content must be a list of {item, sample?}",
                param="data_source.source.content",
            )
        items, where = content, "item"
    elif kind == "file_id":
        s = state.settings
        try:
            text = file_text(s.retrieval_url, s.internal_token, owner, str(source.get("id")))
        except (httpx.HTTPStatusError, NotFound):
            raise NotFound(f"No such File object: {source.get('id')}", param="file_id") from None
        items = _jsonl_items(text)
    elif kind == "stored_completions":
        check_metadata(source.get("metadata"), "data_source.source.metadata")
        _bounds(source)
        limit = min(int(source.get("limit") or MAX_ITEMS), MAX_ITEMS)
        f = Filter(
            model=source.get("model"),
            metadata=tuple((source.get("metadata") or {}).items()),
            created_after=source.get("created_after"),
            created_before=source.get("created_before"),
        )
        rows = state.captures.rows(owner, f, limit)[:limit]
        items = [{"item": _stored_item(r)} for r, _ in rows]
    elif kind == "responses":
        items = [{"item": response_item(r)} for r in _stored_responses(state, owner, source)]
    else:
        raise InvalidRequest(
            f"data_source.source.type {kind!r}: one of file_content, file_id, "
            "stored_completions, responses",
            param="data_source.source.type",
        )
    stored = kind in ("stored_completions", "responses")
    check_items(items, {} if stored else item_schema_of(config), where)
    return items


def _bounds(source: dict[str, Any]) -> None:
    for name in ("created_after", "created_before", "limit"):
        value = source.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**40
        ):
            raise InvalidRequest(
                f"data_source.source.{name} must be a non-negative integer",
                param=f"data_source.source.{name}",
            )


def _stored_responses(state: Any, owner: str, source: dict[str, Any]) -> list[Any]:
    """OpenAI's `responses` source: the owner's stored responses that match every filter given
    (model, metadata, a time range, text in the instructions, sampling params, users, tools)."""
    check_metadata(source.get("metadata"), "data_source.source.metadata")
    _bounds(source)
    for name in ("users", "tools"):
        value = source.get(name)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise InvalidRequest(
                f"data_source.source.{name} must be a list of strings",
                param=f"data_source.source.{name}",
            )
    limit = min(int(source.get("limit") or MAX_ITEMS), MAX_ITEMS)
    rows = state.responses.rows(
        owner, source.get("model"), source.get("created_after"), source.get("created_before")
    )
    return [r for r in rows if responses_match(r.request, r.metadata_, source)][:limit]


def _stored_item(row: Any) -> dict[str, Any]:
    choice = (row.response.get("choices") or [{}])[0]
    return {
        "input": row.request.get("messages") or [],
        "output_text": (choice.get("message") or {}).get("content"),
        "completion_id": row.id,
        "model": row.model,
        "metadata": row.metadata_ or {},
    }


def new_run(state: Any, owner: str, key_id: str, eval_id: str, body: RunCreate) -> RunRow:
    check_metadata(body.metadata)
    evals: EvalStore = state.evals
    row = evals.get_eval(eval_id, owner)
    ds = body.data_source
    kind = ds.get("type")
    if kind not in ("jsonl", "completions", "responses"):
        raise InvalidRequest(
            f"data_source.type {kind!r}: jsonl, completions or responses",
            param="data_source.type",
        )
    if ds.get("agent") is not None:
        for store_id in check_agent(ds).get("vector_store_ids", []):
            param = "data_source.agent.vector_store_ids"
            store_available(state.settings, owner, store_id, param)
    if kind != "jsonl":
        if ds.get("model") is not None:
            if not isinstance(ds["model"], str):
                raise InvalidRequest(
                    "data_source.model must be a string", param="data_source.model"
                )
            model_available(state.settings, key_id, ds["model"], "data_source.model")
        check_references(
            ds.get("input_messages"), item_schema_of(row.data_source_config), "data_source"
        )
    for i, c in enumerate(row.testing_criteria):
        if c["type"] in ("label_model", "score_model"):
            model_available(state.settings, key_id, c["model"], f"testing_criteria[{i}].model")
    items = resolve_items(state, owner, row, ds)
    return RunRow(
        id=new_id("evalrun_"),
        eval_id=eval_id,
        owner=owner,
        key_id=key_id,
        name=body.name or f"run-{time.strftime('%Y%m%d-%H%M%S')}",
        model=ds.get("model"),
        status="queued",
        created_at=time.time(),
        data_source=ds,
        items=items,
        metadata_=body.metadata,
        usage={},
        attempts=0,
        cancel_requested=False,
        traceparent=(tracing.current_header() or b"").decode() or None,
    )


def _new_eval(state: Any, owner: str, key_id: str, body: EvalCreate) -> EvalRow:
    check_metadata(body.metadata)
    config = config_object(body.data_source_config)
    criteria = check_criteria(body.testing_criteria, item_schema_of(config))
    for i, c in enumerate(criteria):
        if c["type"] in ("label_model", "score_model"):
            model_available(state.settings, key_id, c["model"], f"testing_criteria[{i}].model")
        if c["type"] == "retrieval":
            param = f"testing_criteria[{i}].vector_store_id"
            store_available(state.settings, owner, c["vector_store_id"], param)
    return EvalRow(
        id=new_id("eval_"),
        owner=owner,
        name=body.name or "eval",
        created_at=time.time(),
        data_source_config=config,
        testing_criteria=criteria,
        metadata_=body.metadata,
    )


def router() -> APIRouter:
    r = APIRouter()

    def store(request: Request) -> EvalStore:
        evals: EvalStore = request.app.state.evals
        return evals

    @r.post("/v1/evals")
    async def create(body: EvalCreate, request: Request, owner: Owner) -> dict[str, Any]:
        row = await asyncio.to_thread(_new_eval, request.app.state, owner, _key_id(request), body)
        return store(request).add_eval(row)

    @r.get("/v1/evals")
    def list_evals(request: Request, owner: Owner, page: AscPageParams) -> dict[str, Any]:
        return store(request).list_evals(owner, page)

    @r.get("/v1/evals/{eval_id}")
    def retrieve(eval_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        return eval_object(store(request).get_eval(eval_id, owner))

    @r.post("/v1/evals/{eval_id}")
    def update(eval_id: str, body: EvalUpdate, request: Request, owner: Owner) -> dict[str, Any]:
        check_metadata(body.metadata)
        return store(request).update_eval(eval_id, owner, body.model_dump(exclude_unset=True))

    @r.delete("/v1/evals/{eval_id}")
    def delete(eval_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        store(request).delete_eval(eval_id, owner)
        return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}

    @r.post("/v1/evals/{eval_id}/runs")
    async def create_run(
        eval_id: str, body: RunCreate, request: Request, owner: Owner
    ) -> dict[str, Any]:
        state = request.app.state
        row = await asyncio.to_thread(new_run, state, owner, _key_id(request), eval_id, body)
        return await asyncio.to_thread(store(request).add_run, row)

    @r.get("/v1/evals/{eval_id}/runs")
    def list_runs(
        eval_id: str,
        request: Request,
        owner: Owner,
        page: AscPageParams,
        status: RunStatus | None = None,
    ) -> dict[str, Any]:
        return store(request).list_runs(eval_id, owner, page, status)

    @r.get("/v1/evals/{eval_id}/runs/{run_id}")
    def get_run(eval_id: str, run_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        return store(request).run(run_id, owner, eval_id)

    # The schema's POST .../runs/{run_id} and the SDK's POST .../runs/{run_id}/cancel.
    @r.post("/v1/evals/{eval_id}/runs/{run_id}/cancel")
    @r.post("/v1/evals/{eval_id}/runs/{run_id}")
    def cancel_run(eval_id: str, run_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        return store(request).cancel(run_id, owner, eval_id)

    @r.delete("/v1/evals/{eval_id}/runs/{run_id}")
    def delete_run(eval_id: str, run_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        store(request).delete_run(run_id, owner, eval_id)
        return {"object": "eval.run.deleted", "deleted": True, "run_id": run_id}

    @r.get("/v1/evals/{eval_id}/runs/{run_id}/output_items")
    def output_items(
        eval_id: str,
        run_id: str,
        request: Request,
        owner: Owner,
        page: AscPageParams,
        status: Literal["pass", "fail", "error"] | None = None,
    ) -> dict[str, Any]:
        return store(request).outputs(run_id, owner, eval_id, page, status)

    @r.get("/v1/evals/{eval_id}/runs/{run_id}/output_items/{item_id}")
    def output_item(
        eval_id: str, run_id: str, item_id: str, request: Request, owner: Owner
    ) -> dict[str, Any]:
        return store(request).output(item_id, run_id, owner, eval_id)

    return r

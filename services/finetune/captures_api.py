"""OpenAI's stored chat completions API, Crucible's feedback on them, and datasets made from them.

GET    /v1/chat/completions                      list (model, metadata[k]=, feedback[m]=)
GET    /v1/chat/completions/{id}                 retrieve (with its feedback)
POST   /v1/chat/completions/{id}                 update metadata
DELETE /v1/chat/completions/{id}
GET    /v1/chat/completions/{id}/messages        the request's messages
POST   /v1/chat/completions/{id}/feedback        {metric, value, comment?, correction?}
POST   /v1/fine_tuning/datasets                  a filter -> training (+ validation) file
GET    /v1/fine_tuning/datasets[/{id}]
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from services.common.errors import AuthenticationFailed
from services.common.etag import conditional_json
from services.common.metadata import check_metadata
from services.common.pagination import AscPageParams, PageParams
from services.common.tenancy import Owner, internal_only
from services.finetune.captures import METRIC_RE, CaptureStore, query_filter
from services.finetune.datasets import DatasetCreate, make_dataset
from services.finetune.remote import KEY_ID_HEADER


class Correction(BaseModel):
    """The assistant message the researcher wanted instead."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["assistant"] = "assistant"
    content: Annotated[StrictStr, Field(max_length=65536)] | None = None
    tool_calls: Annotated[list[dict[str, Any]], Field(max_length=64)] | None = None


class FeedbackCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: Annotated[StrictStr, Field(pattern=METRIC_RE.pattern)]
    value: StrictBool | StrictInt | StrictFloat | Annotated[StrictStr, Field(max_length=512)]
    comment: Annotated[StrictStr, Field(max_length=4096)] | None = None
    correction: Correction | None = None


class MetadataUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metadata: dict[str, Any] | None


def router() -> APIRouter:
    r = APIRouter()

    def store(request: Request) -> CaptureStore:
        captures: CaptureStore = request.app.state.captures
        return captures

    @r.get("/v1/chat/completions")
    def list_completions(
        request: Request, owner: Owner, page: AscPageParams, model: str | None = None
    ) -> dict[str, Any]:
        return store(request).list_completions(
            owner, query_filter(request.query_params, model), page
        )

    @r.get("/v1/chat/completions/{completion_id}")
    def retrieve(completion_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        return store(request).retrieve(completion_id, owner)

    @r.post("/v1/chat/completions/{completion_id}")
    def update(
        completion_id: str, body: MetadataUpdate, request: Request, owner: Owner
    ) -> dict[str, Any]:
        metadata = check_metadata(body.metadata) or {}
        return store(request).update(completion_id, owner, metadata)

    @r.delete("/v1/chat/completions/{completion_id}")
    def delete(completion_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        store(request).delete(completion_id, owner)
        return {"object": "chat.completion.deleted", "id": completion_id, "deleted": True}

    @r.get("/v1/chat/completions/{completion_id}/messages")
    def messages(
        completion_id: str, request: Request, owner: Owner, page: AscPageParams
    ) -> dict[str, Any]:
        return store(request).messages(completion_id, owner, page)

    @r.post("/v1/chat/completions/{completion_id}/feedback")
    def feedback(
        completion_id: str, body: FeedbackCreate, request: Request, owner: Owner
    ) -> dict[str, Any]:
        key_id = request.headers.get(KEY_ID_HEADER, "")
        if not key_id:
            raise AuthenticationFailed("feedback is given through the gateway, as a key")
        return store(request).give_feedback(
            completion_id, owner, key_id, body.model_dump(exclude_none=True)
        )

    @r.post("/v1/fine_tuning/datasets")
    async def create_dataset(body: DatasetCreate, request: Request, owner: Owner) -> dict[str, Any]:
        return await asyncio.to_thread(make_dataset, request.app.state, owner, body)

    @r.get("/v1/fine_tuning/datasets")
    def list_datasets(request: Request, owner: Owner, page: PageParams) -> dict[str, Any]:
        return request.app.state.datasets.list_datasets(owner, page)

    @r.get("/v1/fine_tuning/datasets/{dataset_id}")
    def get_dataset(dataset_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        return request.app.state.datasets.retrieve(dataset_id, owner)

    @r.get("/internal/quotas", dependencies=[Depends(internal_only)])
    async def quotas(request: Request) -> Response:
        """For the gateways: the owners whose stored completions and responses reached their
        quota (summed at most every `stored_quota_every_s`; the gateways poll this)."""
        state, s = request.app.state, request.app.state.settings
        cached = getattr(state, "stored_over", None)
        if cached is None or time.monotonic() - cached[0] >= s.stored_quota_every_s:
            over = await asyncio.to_thread(store(request).owners_over, s.owner_stored_bytes)
            cached = state.stored_over = (time.monotonic(), over)
        return conditional_json(
            request, {"stored_bytes_quota": s.owner_stored_bytes, "over": cached[1]}
        )

    # Admin (the gateway's /admin/projects/{project_id}/chat_completions, with an admin key).
    @r.get("/internal/captures/{owner}", dependencies=[Depends(internal_only)])
    def export(owner: str, request: Request) -> dict[str, Any]:
        data = store(request).export(owner)
        return {"object": "list", "data": data}

    @r.delete("/internal/captures/{owner}", dependencies=[Depends(internal_only)])
    def purge(owner: str, request: Request) -> dict[str, Any]:
        return {"object": "purge", "owner": owner, "deleted": store(request).purge(owner)}

    return r

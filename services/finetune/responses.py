"""Stored responses (OpenAI's Responses API): kept from the capture outbox like chat completions,
served from here whichever vLLM answered (vLLM keeps responses per process, and not by default).

    GET    /v1/responses/{id}                 the response as the client received it
    DELETE /v1/responses/{id}
    GET    /v1/responses/{id}/input_items     this response's own input items
    GET    /internal/responses/{id}/context   for the gateway: the conversation so far, to
                                              answer a `previous_response_id` on any engine
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from sqlalchemy import JSON, Float, Integer, String, select
from sqlalchemy.orm import Mapped, mapped_column

from services.common.errors import NotFound
from services.common.pagination import PageParams, PageQuery, page_of
from services.common.tenancy import Owner
from services.finetune.jobs import Base

SETTLE_S = 2.0  # a follow-up often comes at once, while its predecessor is in the outbox
MAX_ROWS = 100_000  # what an eval's responses source reads at most, before its own filters
FINAL_EVENTS = (b"response.completed", b"response.incomplete", b"response.failed")


class ResponseRow(Base):
    __tablename__ = "stored_responses"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    key_id: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(256), index=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    # The input as the engine got it (a previous response's conversation first), and where
    # this response's own input starts in it.
    input: Mapped[list[Any]] = mapped_column(JSON)
    own_input_from: Mapped[int] = mapped_column(Integer, default=0)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    previous_response_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    # The request and response bytes the gateway captured (the owner's stored-data quota).
    stored_bytes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


def as_items(value: Any) -> list[Any]:
    """A request's `input` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value) if isinstance(value, list) else []


def final_response(raw: bytes) -> dict[str, Any] | None:
    """The response a stream ended with (its last `response.completed` event carries it whole)."""
    found = None
    for event in raw.split(b"\n\n"):
        if not any(name in event for name in FINAL_EVENTS):
            continue
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                body = orjson.loads(line[5:].strip())
                if isinstance(body, dict) and isinstance(body.get("response"), dict):
                    found = body["response"]
    return found


def to_row(meta: dict[str, Any], request: dict[str, Any], raw: bytes) -> ResponseRow | None:
    response = final_response(raw) if meta.get("stream") else orjson.loads(raw)
    if not isinstance(response, dict) or not isinstance(response.get("id"), str):
        return None
    created = float(meta.get("created") or time.time())
    retention = meta.get("retention_days")
    previous = meta.get("previous_response_id")
    response["previous_response_id"] = previous
    response["store"] = True
    return ResponseRow(
        id=response["id"][:200],
        owner=meta["owner"],
        key_id=meta["key_id"],
        model=str(response.get("model") or request.get("model"))[:256],
        created_at=created,
        input=as_items(request.get("input")),
        own_input_from=int(meta.get("own_input_from") or 0),
        request=request,
        response=response,
        previous_response_id=previous,
        metadata_=request.get("metadata") or None,
        expires_at=created + retention * 86400 if retention else None,
    )


def output_as_input(response: dict[str, Any]) -> list[Any]:
    """A response's output as input items for the next turn (messages as assistant text)."""
    items: list[Any] = []
    for out in response.get("output") or []:
        if not isinstance(out, dict):
            continue
        if out.get("type") == "message":
            text = "".join(
                c.get("text", "") for c in out.get("content") or [] if isinstance(c, dict)
            )
            items.append({"type": "message", "role": "assistant", "content": text})
        elif out.get("type") in ("function_call", "function_call_output"):
            items.append({k: v for k, v in out.items() if k != "status"})
    return items


def response_item(row: ResponseRow) -> dict[str, Any]:
    """A stored response as an eval item (the fields a `logs` eval's items have)."""
    from services.finetune.samplers import response_text

    messages = []
    for item in row.input[row.own_input_from :]:
        if isinstance(item, dict) and item.get("role"):
            content = item.get("content")
            if isinstance(content, list):
                content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
            messages.append({"role": item["role"], "content": content})
    return {
        "input": messages,
        "output_text": response_text(row.response),
        "response_id": row.id,
        "model": row.model,
        "instructions": row.request.get("instructions"),
        "metadata": row.metadata_ or {},
    }


def responses_match(request: dict[str, Any], metadata: Any, f: dict[str, Any]) -> bool:
    """The filters of OpenAI's EvalResponsesSource beyond model and time, over one request."""
    if any((metadata or {}).get(k) != v for k, v in (f.get("metadata") or {}).items()):
        return False
    search = f.get("instructions_search")
    if search and search.lower() not in str(request.get("instructions") or "").lower():
        return False
    for name in ("temperature", "top_p"):
        if f.get(name) is not None and request.get(name) != f[name]:
            return False
    effort = f.get("reasoning_effort")
    if effort is not None and (request.get("reasoning") or {}).get("effort") != effort:
        return False
    if f.get("users") is not None and request.get("user") not in f["users"]:
        return False
    if f.get("tools") is not None:
        names = {
            t.get("name") or t.get("type")
            for t in request.get("tools") or []
            if isinstance(t, dict)
        }
        if not set(f["tools"]) <= names:
            return False
    return True


class ResponseStore:
    def __init__(self, sessions: Any) -> None:
        self.session = sessions

    def get(self, response_id: str, owner: str, settle: bool = False) -> ResponseRow:
        deadline = time.monotonic() + (SETTLE_S if settle else 0)
        while True:
            with self.session() as s:
                row = s.get(ResponseRow, response_id)
            if row is not None and row.owner == owner:
                return row
            if row is not None or time.monotonic() >= deadline:
                raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
            time.sleep(0.05)

    def rows(
        self, owner: str, model: str | None, after: int | None, before: int | None
    ) -> list[ResponseRow]:
        """The owner's stored responses, oldest first (`after` and `before` inclusive)."""
        stmt = select(ResponseRow).where(ResponseRow.owner == owner)
        if model is not None:
            stmt = stmt.where(ResponseRow.model == model)
        if after is not None:
            stmt = stmt.where(ResponseRow.created_at >= after)
        if before is not None:
            stmt = stmt.where(ResponseRow.created_at <= before)
        with self.session() as s:
            return list(s.scalars(stmt.order_by(ResponseRow.created_at).limit(MAX_ROWS)))

    def delete(self, response_id: str, owner: str) -> None:
        self.get(response_id, owner)
        with self.session.begin() as s:
            row = s.get(ResponseRow, response_id)
            if row is not None:
                s.delete(row)

    def input_items(self, response_id: str, owner: str, q: PageQuery) -> dict[str, Any]:
        row = self.get(response_id, owner)
        items = []
        for i, item in enumerate(row.input[row.own_input_from :]):
            item = dict(item) if isinstance(item, dict) else {"type": "message", "content": item}
            item.setdefault("id", f"msg_{row.id}_{i}")
            if isinstance(item.get("content"), str):
                item["content"] = [{"type": "input_text", "text": item["content"]}]
            items.append(item)
        return page_of(items, q)

    def context(self, response_id: str, owner: str) -> list[Any]:
        """The whole conversation up to and including this response, as input items."""
        row = self.get(response_id, owner, settle=True)
        return [*row.input, *output_as_input(row.response)]


def router() -> APIRouter:
    r = APIRouter()

    def store(request: Request) -> ResponseStore:
        responses: ResponseStore = request.app.state.responses
        return responses

    @r.get("/v1/responses/{response_id}")
    def retrieve(response_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        return store(request).get(response_id, owner).response

    @r.delete("/v1/responses/{response_id}")
    def delete(response_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        store(request).delete(response_id, owner)
        return {"id": response_id, "object": "response", "deleted": True}

    @r.get("/v1/responses/{response_id}/input_items")
    def input_items(
        response_id: str, request: Request, owner: Owner, page: PageParams
    ) -> dict[str, Any]:
        return store(request).input_items(response_id, owner, page)

    @r.get("/internal/responses/{response_id}/context")
    def context(response_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        return {"object": "list", "data": store(request).context(response_id, owner)}

    return r

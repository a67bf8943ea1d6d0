"""/v1/vector_stores: stores, their files, and search."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

from services.common.errors import InvalidRequest
from services.common.pagination import PageParams, listing
from services.common.tenancy import Owner, internal_only
from services.retrieval.catalog import Catalog, Member, StoreRow, store_file_object
from services.retrieval.chunking import ChunkingError, Strategy, resolve
from services.retrieval.embedder import USER
from services.retrieval.filters import (
    Comparison,
    Compiled,
    Compound,
    Filter,
    NotInEngine,
    check_attributes,
    check_size,
    compile_filter,
    encode_attributes,
    matches,
)
from services.retrieval.vectors import Hit, VectorIndex

Metadata = Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)]


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anchor: Literal["last_active_at"]
    days: int = Field(ge=1, le=365)


class StoreCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr | None = Field(default=None, max_length=256)
    description: StrictStr | None = Field(default=None, max_length=512)
    file_ids: list[StrictStr] = Field(default_factory=list, max_length=500)
    chunking_strategy: Strategy | None = Field(default=None, discriminator="type")
    metadata: Metadata | None = None
    expires_after: ExpiresAfter | None = None


class StoreUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr | None = Field(default=None, max_length=256)
    metadata: Metadata | None = None
    expires_after: ExpiresAfter | None = None


class StoreFileCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file_id: StrictStr
    attributes: dict[str, Any] | None = None
    chunking_strategy: Strategy | None = Field(default=None, discriminator="type")

    _attrs = field_validator("attributes")(check_attributes)


class StoreFileUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attributes: dict[str, Any] | None

    _attrs = field_validator("attributes")(check_attributes)


class RankingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ranker: Literal["none", "auto", "default-2024-11-15"] = "auto"
    score_threshold: float = Field(default=0.0, ge=0, le=1)


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=8)]
    max_num_results: int = Field(default=10, ge=1, le=50)
    filters: Filter | None = None
    ranking_options: RankingOptions = Field(default_factory=RankingOptions)
    rewrite_query: StrictBool = False

    @field_validator("filters")
    @classmethod
    def _bounded(cls, value: Comparison | Compound | None) -> Comparison | Compound | None:
        if value is not None:
            check_size(value)
        return value


def store_object(row: StoreRow, counts: dict[str, int]) -> dict[str, Any]:
    files = {k: counts[k] for k in ("in_progress", "completed", "failed", "cancelled")}
    expires_at = None
    if row.expires_after:
        expires_at = row.last_active_at + 86400 * row.expires_after["days"]
    return {
        "id": row.id,
        "object": "vector_store",
        "created_at": row.created_at,
        "name": row.name,
        "usage_bytes": counts["usage_bytes"],
        "file_counts": {**files, "total": sum(files.values())},
        "status": "in_progress" if files["in_progress"] else "completed",
        "expires_after": row.expires_after,
        "expires_at": expires_at,
        "last_active_at": row.last_active_at,
        "metadata": row.meta or {},
    }


def router() -> APIRouter:
    r = APIRouter()

    @r.get("/internal/vector_store_bytes", dependencies=[Depends(internal_only)])
    def stored_bytes(request: Request) -> dict[str, Any]:
        """Per owner, the bytes their vector stores hold (the finetune service's snapshots of
        storage, for `/v1/organization/usage/vector_stores`)."""
        return {"object": "list", "owners": request.app.state.catalog.bytes_by_owner()}

    def described(catalog: Catalog, row: StoreRow) -> dict[str, Any]:
        return store_object(row, catalog.counts([row.id])[row.id])

    def add_file(
        request: Request,
        owner: str,
        store_id: str,
        file_id: str,
        strategy: Strategy | None,
        attributes: dict[str, Any],
    ) -> dict[str, Any]:
        state = request.app.state
        catalog: Catalog = state.catalog
        catalog.file(owner, file_id)  # 404 for an unknown or foreign file
        try:
            chunking = resolve(strategy, state.embed_queue.embedder.window)
        except ChunkingError as exc:
            raise InvalidRequest(str(exc), param="chunking_strategy") from None
        counts = catalog.counts([store_id])[store_id]
        held = sum(counts[k] for k in ("in_progress", "completed", "failed", "cancelled"))
        if held >= state.settings.max_files_per_store:
            raise InvalidRequest(
                f"a vector store holds at most {state.settings.max_files_per_store} files",
                param="file_id",
            )
        row, new = catalog.add_store_file(owner, store_id, file_id, chunking, attributes)
        if new:
            state.ingestor.submit(store_id, file_id)
        return store_file_object(row)

    @r.post("/v1/vector_stores")
    async def create(body: StoreCreate, request: Request, owner: Owner) -> dict[str, Any]:
        catalog: Catalog = request.app.state.catalog
        for file_id in body.file_ids:
            catalog.file(owner, file_id)  # all of them exist, or nothing is created
        if body.chunking_strategy is not None:
            try:
                resolve(body.chunking_strategy, request.app.state.embed_queue.embedder.window)
            except ChunkingError as exc:
                raise InvalidRequest(str(exc), param="chunking_strategy") from None
        expires = body.expires_after.model_dump() if body.expires_after else None
        row = catalog.add_store(owner, body.name, body.metadata or {}, expires)
        for file_id in dict.fromkeys(body.file_ids):
            add_file(request, owner, row.id, file_id, body.chunking_strategy, {})
        return described(catalog, row)

    @r.get("/v1/vector_stores")
    def list_stores(request: Request, owner: Owner, page: PageParams) -> dict[str, Any]:
        catalog: Catalog = request.app.state.catalog
        rows, more = catalog.list_stores(owner, page)
        counts = catalog.counts([r.id for r in rows])
        return listing([store_object(r, counts[r.id]) for r in rows], more)

    @r.get("/v1/vector_stores/{store_id}")
    def retrieve(store_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        catalog: Catalog = request.app.state.catalog
        return described(catalog, catalog.store(owner, store_id))

    @r.post("/v1/vector_stores/{store_id}")
    def update(store_id: str, body: StoreUpdate, request: Request, owner: Owner) -> dict[str, Any]:
        catalog: Catalog = request.app.state.catalog
        changes = body.model_dump(exclude_unset=True)
        return described(catalog, catalog.update_store(owner, store_id, changes))

    @r.delete("/v1/vector_stores/{store_id}")
    async def delete(store_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        state = request.app.state
        state.catalog.store(owner, store_id)
        await state.ingestor.cancel(store_id)
        await asyncio.to_thread(state.index.delete, owner, [store_id])
        state.catalog.delete_store(owner, store_id)
        return {"id": store_id, "object": "vector_store.deleted", "deleted": True}

    @r.post("/v1/vector_stores/{store_id}/files")
    async def create_file(
        store_id: str, body: StoreFileCreate, request: Request, owner: Owner
    ) -> dict[str, Any]:
        catalog: Catalog = request.app.state.catalog
        catalog.store(owner, store_id)
        return add_file(
            request, owner, store_id, body.file_id, body.chunking_strategy, body.attributes or {}
        )

    @r.get("/v1/vector_stores/{store_id}/files")
    def list_files(
        store_id: str,
        request: Request,
        owner: Owner,
        page: PageParams,
        filter: Literal["in_progress", "completed", "failed", "cancelled"] | None = None,
    ) -> dict[str, Any]:
        catalog: Catalog = request.app.state.catalog
        catalog.store(owner, store_id)
        return catalog.list_store_files(owner, store_id, filter, page)

    @r.get("/v1/vector_stores/{store_id}/files/{file_id}")
    def retrieve_file(
        store_id: str, file_id: str, request: Request, owner: Owner
    ) -> dict[str, Any]:
        return store_file_object(request.app.state.catalog.store_file(owner, store_id, file_id))

    @r.post("/v1/vector_stores/{store_id}/files/{file_id}")
    async def update_file(
        store_id: str, file_id: str, body: StoreFileUpdate, request: Request, owner: Owner
    ) -> dict[str, Any]:
        """The catalog first, then the file's rows in Milvus (a file still being ingested
        checks the catalog again once its rows are written). Milvus unreachable is a 503: the
        same update again finishes the job."""
        state, attributes = request.app.state, body.attributes or {}
        row = await asyncio.to_thread(
            state.catalog.set_attributes, owner, store_id, file_id, attributes
        )
        await asyncio.to_thread(
            state.index.set_attributes, owner, store_id, file_id, encode_attributes(attributes)
        )
        return store_file_object(row)

    @r.delete("/v1/vector_stores/{store_id}/files/{file_id}")
    async def delete_file(
        store_id: str, file_id: str, request: Request, owner: Owner
    ) -> dict[str, Any]:
        state = request.app.state
        state.catalog.store_file(owner, store_id, file_id)
        await state.ingestor.cancel(store_id, file_id)
        await asyncio.to_thread(state.index.delete, owner, [store_id], [file_id])
        state.catalog.remove_store_file(owner, store_id, file_id)
        return {"id": file_id, "object": "vector_store.file.deleted", "deleted": True}

    @r.post("/v1/vector_stores/{store_id}/search")
    async def search(
        store_id: str, body: SearchRequest, request: Request, response: Response, owner: Owner
    ) -> dict[str, Any]:
        return await _search(request, response, owner, store_id, body)

    return r


async def _search(
    request: Request, response: Response, owner: str, store_id: str, body: SearchRequest
) -> dict[str, Any]:
    state = request.app.state
    start = time.perf_counter()
    ready = in_milvus = 0.0  # until the query vectors were ready; in Milvus's calls
    if body.rewrite_query:
        raise InvalidRequest("rewrite_query is not supported", param="rewrite_query")
    queries = [body.query] if isinstance(body.query, str) else body.query
    state.embed_queue.embedder.counted(queries, "query", isinstance(body.query, list))
    # The query embedding (the larger part of a search's own time) overlaps the catalog lookup.
    embedding = state.embed_queue.start(queries, priority=USER, queries=True)

    def scoped() -> tuple[dict[str, Any], Scope | None]:
        """The store's completed files, and where its search looks (None: nowhere)."""
        return _scope_of(state.catalog.members(owner, store_id), body.filters, state.index)

    try:
        files, scope = await asyncio.to_thread(scoped)
    except BaseException:
        _drop(embedding)
        raise
    hybrid = state.settings.search_mode == "hybrid" and body.ranking_options.ranker != "none"
    mode = "hybrid" if hybrid and state.index.hybrid else "dense"
    hits: dict[str, Hit] = {}
    if scope is not None:
        vectors = await embedding
        ready = time.perf_counter() - start
        for text, vector in zip(queries, vectors, strict=True):
            found, seconds = await asyncio.to_thread(
                _timed,
                partial(
                    state.index.search,
                    vector,
                    text,
                    owner,
                    [store_id],
                    scope.files,
                    body.max_num_results,
                    hybrid,
                    exclude=scope.exclude,
                    where=scope.where,
                ),
            )
            in_milvus += seconds
            for hit in found:  # several queries: each chunk once, at its best score
                if hit.chunk_id not in hits or hits[hit.chunk_id].score < hit.score:
                    hits[hit.chunk_id] = hit
    else:
        _drop(embedding)
    threshold = body.ranking_options.score_threshold
    # Each result checked against its file's attributes in the catalog as well: a row whose
    # attributes an interrupted update left behind is never a result the filter excludes.
    ranked = [
        h
        for h in hits.values()
        if h.file_id in files
        and max(h.score, 0.0) >= threshold
        and (body.filters is None or matches(body.filters, files[h.file_id].attributes()))
    ]
    if len(queries) > 1:
        ranked.sort(key=lambda h: -h.score)
    data = [
        {
            "file_id": h.file_id,
            "filename": files[h.file_id].filename,
            "score": round(min(max(h.score, 0.0), 1.0), 6),
            "attributes": files[h.file_id].attributes(),
            "content": [{"type": "text", "text": h.text}],
        }
        for h in ranked[: body.max_num_results]
    ]
    total = time.perf_counter() - start
    state.metrics.search_seconds.labels(mode).observe(total)
    state.metrics.search_vector_db_seconds.labels(mode).observe(in_milvus)
    # Where this search's time went (the gateway relays it): what Milvus took, and the rest is
    # the service's own (the query embedding first).
    response.headers["server-timing"] = (
        f"embed;dur={ready * 1000:.2f}, milvus;dur={in_milvus * 1000:.2f}, "
        f"total;dur={total * 1000:.2f}"
    )
    return {
        "object": "vector_store.search_results.page",
        "search_query": queries,
        "data": data,
        "has_more": False,
        "next_page": None,
    }


@dataclass(frozen=True)
class Scope:
    """Where a search looks within a store: only `files` (if given), none of `exclude`, rows
    whose attributes satisfy `where` (if given)."""

    files: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    where: str | None = None


def _scope_of(
    members: list[Member], filters: Comparison | Compound | None, index: VectorIndex
) -> tuple[dict[str, Member], Scope | None]:
    """The completed files of a store by id, and the scope of a search over them (None when
    nothing can match). A filter runs in Milvus where it can (the expression grows with the
    filter, not with the store); otherwise the service evaluates it over every file's
    attributes and the scope lists the files admitted."""
    files = {m.file_id: m for m in members if m.status == "completed"}
    unfinished = [m.file_id for m in members if m.status != "completed"]
    where: Compiled | None = None
    if filters is not None and index.engine_filters:
        with contextlib.suppress(NotInEngine):
            where = compile_filter(filters)
    if filters is not None and where is None:
        admitted = [fid for fid, m in files.items() if matches(filters, m.attributes())]
        return files, Scope(files=admitted) if admitted else None
    if where is False or not files:
        return files, None
    expr = where if isinstance(where, str) else None
    # Only completed files' chunks count, never a half-ingested file's: named by the shorter
    # list (usually none are ingesting, and the store itself is the scope).
    if len(unfinished) <= len(files):
        return files, Scope(exclude=unfinished, where=expr)
    return files, Scope(files=list(files), where=expr)


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def _drop(task: asyncio.Future[Any]) -> None:
    """A query embedding no longer needed: cancelled if waiting (the embedder then skips it),
    its error (an over-long query, a full queue) retrieved if it already ended in one."""
    if not task.cancel() and not task.cancelled():
        task.exception()

"""`search_documents`: the run's vector stores searched through the retrieval service, as the
run's owner. Every passage returned becomes a numbered source (S1, S2, ...) the answer can cite."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from services.agent.tools.base import ToolContext, ToolError

MAX_RESULTS = 5
MAX_PASSAGE_CHARS = 1200


class SearchArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: Annotated[str, Field(min_length=1, max_length=500, description="what to look for")]


async def search_documents(args: SearchArgs, ctx: ToolContext) -> dict[str, Any]:
    if not ctx.vector_store_ids:
        raise ToolError("this run has no vector stores to search")
    timeout = ctx.deadline - time.monotonic()
    if timeout <= 0:
        raise ToolError("no time left in the run's budget")
    retrieval = ctx.services.retrieval
    try:
        async with asyncio.timeout(timeout):
            answers = await asyncio.gather(
                *(_search(retrieval, ctx.owner, vs, args.query) for vs in ctx.vector_store_ids)
            )
    except TimeoutError:
        raise ToolError("the document search took too long") from None
    hits = sorted((h for hits in answers for h in hits), key=lambda h: -h["score"])[:MAX_RESULTS]
    results = []
    for hit in hits:
        key = (hit["file_id"], hit["text"])
        sid = next((s for s, v in ctx.sources.items() if (v["file_id"], v["text"]) == key), None)
        if sid is None:
            sid = f"S{len(ctx.sources) + 1}"
            ctx.sources[sid] = hit
        results.append({"source": sid, **hit})
    return {"query": args.query, "results": results}


async def _search(retrieval: Any, owner: str, store: str, query: str) -> list[dict[str, Any]]:
    try:
        resp = await retrieval.search(owner, store, query, MAX_RESULTS)
    except httpx.HTTPError:
        raise ToolError("the retrieval service is unavailable") from None
    out = []
    for item in resp:
        text = "\n".join(c.get("text", "") for c in item.get("content", []))
        out.append(
            {
                "vector_store_id": store,
                "file_id": item["file_id"],
                "filename": item.get("filename"),
                "score": round(float(item["score"]), 4),
                "text": text[:MAX_PASSAGE_CHARS],
            }
        )
    return out

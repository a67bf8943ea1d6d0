"""POST /v1/embeddings: OpenAI's request and response, float or base64, with usage."""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from services.common.errors import InvalidRequest, NotFound
from services.common.outbox import USAGE_HEADER
from services.common.tenancy import current_owner
from services.retrieval.embedder import USER, EmbedQueue
from services.retrieval.metrics import RetrievalMetrics


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option must not be ignored

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: StrictStr
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: StrictStr | None = None


def router() -> APIRouter:
    r = APIRouter(dependencies=[Depends(current_owner)])

    @r.post("/v1/embeddings")
    async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
        state = request.app.state
        queue: EmbedQueue = state.embed_queue
        metrics: RetrievalMetrics = state.metrics
        model_id: str = state.settings.embedding_model_id
        if body.model != model_id:
            raise NotFound(
                f"The model `{body.model}` does not exist; embeddings are served by `{model_id}`.",
                param="model",
                code="model_not_found",
            )
        if body.dimensions is not None and body.dimensions != queue.embedder.dim:
            raise InvalidRequest(
                f"{model_id} has {queue.embedder.dim} dimensions only", param="dimensions"
            )
        texts = _texts(body.input, state.settings.max_inputs_per_request)
        tokens = queue.embedder.counted(texts, "input", isinstance(body.input, list))
        start = time.perf_counter()
        vectors = await queue.embed(texts, priority=USER)
        seconds = time.perf_counter() - start
        metrics.embed_seconds.labels("request").observe(seconds)
        metrics.embedded_tokens.labels("request").inc(sum(tokens))
        used = {"model": model_id, "input_tokens": sum(tokens), "seconds": round(seconds, 6)}
        return Response(
            _encode(vectors, body.encoding_format, model_id, sum(tokens)),
            media_type="application/json",
            headers={USAGE_HEADER: orjson.dumps(used).decode()},
        )

    return r


def _texts(value: Any, limit: int) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not value:
        raise InvalidRequest("input must not be empty", param="input")
    if not all(isinstance(v, str) for v in value):
        raise InvalidRequest(
            "token arrays are not supported by this model: send text", param="input"
        )
    if len(value) > limit:
        raise InvalidRequest(f"at most {limit} inputs per request, got {len(value)}", param="input")
    for i, text in enumerate(value):
        if not text:
            raise InvalidRequest(f"input[{i}] is empty", param="input")
    return list(value)


def _encode(vectors: np.ndarray, fmt: str, model: str, tokens: int) -> bytes:
    if fmt == "base64":
        # What the openai SDK decodes by default: little-endian float32, base64.
        data: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        data = list(vectors)
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)
            ],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )

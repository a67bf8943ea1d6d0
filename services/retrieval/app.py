"""The retrieval service: embeddings, files and vector stores on Milvus (DESIGN.md)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.common.app import build_app, serve
from services.retrieval import embeddings, files, stores
from services.retrieval.catalog import Catalog
from services.retrieval.config import RetrievalSettings
from services.retrieval.embedder import Embedder, EmbedQueue
from services.retrieval.ingest import Ingestor
from services.retrieval.metrics import RetrievalMetrics
from services.retrieval.vectors import VectorIndex

log = logging.getLogger("crucible.retrieval")
# Milvus Lite runs in-process: its gRPC server logs calls it does not implement (pymilvus falls
# back on its own), and faiss logs which CPU build it loaded. Neither is ours to act on.
for _noisy, _level in (
    ("grpc._server", logging.CRITICAL),
    ("pymilvus", logging.ERROR),
    ("faiss.loader", logging.WARNING),
):
    logging.getLogger(_noisy).setLevel(_level)

MULTIPART_OVERHEAD = 64 << 10


def create_app(settings: RetrievalSettings | None = None) -> FastAPI:
    s = settings or RetrievalSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        catalog = Catalog(s.db_url())
        embedder = await asyncio.to_thread(
            Embedder,
            s.embedding_model_dir,
            s.embedding_backend,
            s.embedding_batch_size,
            s.var_dir / "models" / f"{s.embedding_model_id}-onnx-int8",
        )
        queue = EmbedQueue(embedder, s.max_pending_embeddings)
        token = s.milvus_token.get_secret_value() if s.milvus_token else None
        index = VectorIndex(s.milvus(), token, s.collection, embedder.dim, s.dense_index)
        await asyncio.to_thread(index.ensure)
        metrics = RetrievalMetrics(app.state.registry)
        ingestor = Ingestor(catalog, index, queue, s.files_dir(), s.ingest_concurrency, metrics)
        metrics.watch(lambda: ingestor.active, catalog.totals)
        app.state.catalog, app.state.index, app.state.ingestor = catalog, index, ingestor
        app.state.embed_queue, app.state.metrics = queue, metrics
        swept = files.sweep(catalog, s.files_dir())
        resumed = ingestor.resume()
        log.info("ready", extra={"hybrid": index.hybrid, "resumed": resumed, "swept": swept})
        try:
            yield
        finally:
            await ingestor.close()
            queue.close()
            await asyncio.to_thread(index.close)
            catalog.engine.dispose()

    async def milvus_ready() -> None:
        await asyncio.to_thread(api.state.index.client.has_collection, s.collection)

    def limit_for(path: str) -> int:
        return s.max_upload_bytes + MULTIPART_OVERHEAD if path == "/v1/files" else s.max_body_bytes

    api = build_app(
        "retrieval",
        settings=s,
        lifespan=lifespan,
        ready_checks=[("milvus", milvus_ready)],
        body_limit=limit_for,
        title="Crucible retrieval",
        version="0.1.0",
    )
    for module in (embeddings, files, stores):
        api.include_router(module.router())
    return api


def main() -> None:
    s = RetrievalSettings()
    serve("retrieval", create_app(s), s)


if __name__ == "__main__":
    main()

"""The retrieval service: embeddings, files and vector stores on Milvus (DESIGN.md)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from pymilvus import MilvusException

from services.common.app import build_app, serve
from services.retrieval import embeddings, files, stores
from services.retrieval.catalog import Catalog
from services.retrieval.config import RetrievalSettings
from services.retrieval.embedder import Embedder, EmbedQueue
from services.retrieval.ingest import Ingestor
from services.retrieval.metrics import RetrievalMetrics
from services.retrieval.vectors import Hnsw, VectorIndex

log = logging.getLogger("crucible.retrieval")
# Milvus Lite, where it runs in-process (MILVUS_URI a file path): its gRPC server logs calls it
# does not implement (pymilvus falls back on its own), and faiss logs which CPU build it
# loaded. Neither is ours to act on.
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
            s.var_dir / "models" / f"{s.embedding_model_id}-onnx-fp32"
            if s.small_calls_onnx
            else None,
            s.var_dir / "models" / f"{s.embedding_model_id}-onnx-int8-blocks"
            if s.search_queries_int8
            else None,
        )
        queue = EmbedQueue(embedder, s.max_pending_embeddings)
        index = await open_index(s, embedder.dim, catalog)
        metrics = RetrievalMetrics(app.state.registry)
        ingestor = Ingestor(
            catalog,
            index,
            queue,
            s.files_dir(),
            s.ingest_concurrency,
            metrics,
            s.ingest_outage_seconds,
            s.parse_timeout_s,
            s.parse_memory_mb,
        )
        metrics.watch(lambda: ingestor.active, catalog.totals)
        metrics.small_calls_onnx.set_function(lambda: float(embedder.small_calls_on_onnx))
        metrics.queries_int8.set_function(lambda: float(embedder.queries_on_int8))
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
        await asyncio.to_thread(api.state.index.ping)

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


async def open_index(s: RetrievalSettings, dim: int, catalog: Catalog) -> VectorIndex:
    """Connect to Milvus and load the collection, waiting for a server still starting (the
    native stack starts everything at once; compose restarts Milvus on its own)."""
    token = s.milvus_token.get_secret_value() if s.milvus_token else None
    deadline = time.monotonic() + s.milvus_wait_seconds
    while True:
        try:
            index = await asyncio.to_thread(
                VectorIndex,
                s.milvus(),
                token,
                s.collection,
                dim,
                s.dense_index,
                s.milvus_timeout_seconds,
                hnsw=Hnsw(s.hnsw_m, s.hnsw_ef_construction, s.hnsw_ef),
            )
        except MilvusException as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("waiting for Milvus", extra={"error": str(exc)[:200]})
            await asyncio.sleep(1)
            continue
        if await asyncio.to_thread(index.ensure):
            # A Milvus without the collection (a first start, another engine, a lost volume):
            # the catalog is the ledger, so every file it holds as ingested is ingested again.
            again = await asyncio.to_thread(catalog.ingest_again)
            if again:
                log.warning(
                    "the collection was missing: files ingested again", extra={"files": again}
                )
        return index


def main() -> None:
    s = RetrievalSettings()
    serve("retrieval", create_app(s), s)


if __name__ == "__main__":
    main()

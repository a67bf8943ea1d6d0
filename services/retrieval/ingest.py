"""Background ingestion: parse, chunk, embed, upsert, reconcile; bounded; resumable.

A file's chunks have deterministic ids, so running ingestion again upserts the same rows. Files
still `in_progress` at startup (a crash) are ingested again, and then their rows in Milvus are
reconciled with what they should hold: strays are deleted and the count checked before the file
is marked completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import Unavailable
from services.retrieval.catalog import Catalog
from services.retrieval.chunking import Chunk, chunk_id, chunk_text
from services.retrieval.embedder import INGEST, EmbedQueue
from services.retrieval.filters import encode_attributes
from services.retrieval.metrics import RetrievalMetrics
from services.retrieval.parsing import ParseError, parse_file
from services.retrieval.vectors import VectorIndex

log = logging.getLogger("crucible.retrieval.ingest")

UPSERT_BATCH = 64
FLUSH_EVERY = 4000  # unsealed rows; more make counts and searches slow on Milvus Lite
MAX_CHUNK_BYTES = 65535  # Milvus's VARCHAR limit for the chunk text
RETRY_FIRST, RETRY_MAX = 1.0, 30.0  # seconds between tries while Milvus is unreachable
MAX_TRIES = 3  # ingestions of one file begun across restarts before it fails


class IngestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Ingestor:
    catalog: Catalog
    index: VectorIndex
    embedder: EmbedQueue
    files_dir: Path
    concurrency: int
    metrics: RetrievalMetrics
    # How long a file waits for an unreachable Milvus (still `in_progress`) before it fails.
    outage_seconds: float = 300.0
    parse_timeout_s: float = 60.0
    parse_memory_mb: int = 1024

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.concurrency)
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}

    def resume(self) -> int:
        pending = self.catalog.pending()
        for store_id, file_id in pending:
            self.submit(store_id, file_id, resumed=True)
        return len(pending)

    def submit(self, store_id: str, file_id: str, resumed: bool = False) -> None:
        key = (store_id, file_id)
        if key in self._tasks:
            return  # already queued or running
        task = asyncio.create_task(self._run(store_id, file_id, resumed))
        self._tasks[key] = task
        task.add_done_callback(lambda _: self._tasks.pop(key, None))

    async def cancel(self, store_id: str, file_id: str | None = None) -> None:
        """Stop ingestion of one file (or every file of a store) before its rows are removed."""
        keys = [k for k in self._tasks if k[0] == store_id and file_id in (None, k[1])]
        tasks = [self._tasks[k] for k in keys]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def close(self) -> None:
        for store_id in {k[0] for k in list(self._tasks)}:
            await self.cancel(store_id)

    @property
    def active(self) -> int:
        return len(self._tasks)

    async def _run(self, store_id: str, file_id: str, resumed: bool) -> None:
        async with self._slots:
            start = time.perf_counter()
            try:
                tries = await asyncio.to_thread(self.catalog.begin, store_id, file_id)
                if tries is None:
                    return  # removed meanwhile
                if tries > MAX_TRIES:
                    raise IngestError(
                        "invalid_file",
                        f"ingestion was interrupted {MAX_TRIES} times (the service stopped while"
                        " ingesting this file); it is not tried again",
                    )
                count, used = await self._ingest_through_outages(store_id, file_id, resumed)
            except IngestError as exc:
                await self._discard(store_id, file_id)
                self.catalog.finish(
                    store_id, file_id, error={"code": exc.code, "message": exc.message}
                )
                self.metrics.ingested.labels("failed").inc()
                log.warning("ingestion failed", extra={"file_id": file_id, "code": exc.code})
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ingestion failed", extra={"file_id": file_id})
                await self._discard(store_id, file_id)
                self.catalog.finish(
                    store_id,
                    file_id,
                    error={
                        "code": "server_error",
                        "message": "ingestion failed; add the file again",
                    },
                )
                self.metrics.ingested.labels("failed").inc()
                return
            self.catalog.finish(store_id, file_id, chunk_count=count, usage_bytes=used)
            self.metrics.ingested.labels("completed").inc()
            self.metrics.ingest_seconds.observe(time.perf_counter() - start)
        if len(self._tasks) <= 1:  # the last one: seal the rest, so searches stay fast
            with contextlib.suppress(Unavailable):  # Milvus gone: the next flush seals them
                await asyncio.to_thread(self.index.flush)

    async def _ingest_through_outages(
        self, store_id: str, file_id: str, resumed: bool
    ) -> tuple[int, int]:
        """Ingest; when Milvus is unreachable, wait for it and try again, the file still
        `in_progress`. Each try after the first reconciles the rows the last one left."""
        deadline = time.monotonic() + self.outage_seconds
        while True:
            try:
                return await self._ingest(store_id, file_id, resumed)
            except Unavailable:
                log.warning(
                    "vector database unavailable; ingestion waits", extra={"file_id": file_id}
                )
                self.metrics.ingest_retries.inc()
                await self._wait_for_milvus(deadline)
                resumed = True

    async def _wait_for_milvus(self, deadline: float) -> None:
        """Back off (1 s, doubling to 30 s) until Milvus answers a cheap call, so a file is not
        embedded again for every try; IngestError once the deadline would pass."""
        delay = RETRY_FIRST
        while time.monotonic() + delay <= deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            try:
                await asyncio.to_thread(self.index.ping)
                return
            except Unavailable:
                continue
        raise IngestError(
            "server_error", "the vector database was unavailable for too long; add the file again"
        )

    async def _discard(self, store_id: str, file_id: str) -> None:
        """A failed file keeps no partial chunks (best effort: a retry reconciles anyway)."""
        row = self.catalog.store_file_row(store_id, file_id)
        if row is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.index.delete, row.owner, [store_id], [file_id])

    async def _ingest(self, store_id: str, file_id: str, resumed: bool) -> tuple[int, int]:
        row = self.catalog.store_file_row(store_id, file_id)
        if row is None:
            return 0, 0  # removed meanwhile
        meta = self.catalog.file_row(file_id)
        if meta is None:
            raise IngestError("invalid_file", "the file was deleted")
        phase = self.metrics.ingest_phase_seconds
        t = time.perf_counter()
        chunks = await asyncio.to_thread(self._chunks, meta.filename, file_id, row.chunking)
        t = _lap(phase, "parse", t)
        owner, attributes = row.owner, row.attributes or {}
        encoded = encode_attributes(attributes)
        expected = {chunk_id(store_id, file_id, c) for c in chunks}
        for i in range(0, len(chunks), UPSERT_BATCH):
            batch = chunks[i : i + UPSERT_BATCH]
            vectors = await self.embedder.embed([c.text for c in batch], priority=INGEST)
            t = _lap(phase, "embed", t)
            rows = [
                self._row(owner, store_id, file_id, c, v) | {"attributes": encoded}
                for c, v in zip(batch, vectors, strict=True)
            ]
            await asyncio.to_thread(self.index.upsert, rows)
            t = _lap(phase, "upsert", t)
            self.metrics.chunks_ingested.inc(len(rows))
            self.metrics.embedded_tokens.labels("ingest").inc(sum(c.tokens + 2 for c in batch))
        await asyncio.to_thread(self.index.flush, FLUSH_EVERY)
        if resumed:
            # After a crash the file's rows must be reconciled with what it should hold. Ids
            # are deterministic, so a matching count means the same set; otherwise strays of
            # the interrupted run are found and deleted, and the count checked again. A first,
            # uninterrupted run can hold no rows but the ones it just upserted (acknowledged);
            # counting them as well was a large share of ingestion time at 100k chunks on
            # Milvus Lite (BENCHMARKS.md).
            await self._reconcile(owner, store_id, file_id, expected)
        # Attributes changed while the file was ingested: the update rewrote the rows there were
        # then; the ones written since carry the old attributes.
        now = self.catalog.store_file_row(store_id, file_id)
        if now is not None and (now.attributes or {}) != attributes:
            await asyncio.to_thread(
                self.index.set_attributes,
                owner,
                store_id,
                file_id,
                encode_attributes(now.attributes or {}),
            )
        _lap(phase, "reconcile", t)
        return len(chunks), sum(len(c.text.encode()) for c in chunks)

    def _chunks(self, filename: str, file_id: str, chunking: dict[str, Any]) -> list[Chunk]:
        path = self.files_dir / file_id
        try:
            text = parse_file(filename, path, self.parse_timeout_s, self.parse_memory_mb)
        except FileNotFoundError:
            raise IngestError("invalid_file", "the file's content is missing") from None
        except ParseError as exc:
            raise IngestError("invalid_file", str(exc)) from None
        except Exception as exc:
            raise IngestError("invalid_file", f"could not read the file: {exc}"[:300]) from None
        if not text.strip():
            raise IngestError("invalid_file", "the file has no text to index")
        chunks = chunk_text(self.embedder.embedder.tokenizer, text, chunking)
        if any(len(c.text.encode()) > MAX_CHUNK_BYTES for c in chunks):
            raise IngestError(
                "invalid_file",
                "the file has a run of text too long to index "
                "(over 64 KiB without a space or punctuation)",
            )
        return chunks

    async def _reconcile(self, owner: str, store_id: str, file_id: str, expected: set[str]) -> None:
        held = await asyncio.to_thread(self.index.count, owner, [store_id], [file_id])
        if held != len(expected):
            stray = await asyncio.to_thread(self.index.chunk_ids, owner, store_id, file_id)
            if stray - expected:
                await asyncio.to_thread(self.index.delete_ids, stray - expected)
                await asyncio.to_thread(self.index.flush)
            held = await asyncio.to_thread(self.index.count, owner, [store_id], [file_id])
        if held != len(expected):
            raise IngestError(
                "server_error", f"stored {held} chunks where {len(expected)} were expected"
            )

    @staticmethod
    def _row(owner: str, store_id: str, file_id: str, chunk: Chunk, vector: Any) -> dict[str, Any]:
        return {
            "id": chunk_id(store_id, file_id, chunk),
            "owner": owner,
            "vector_store_id": store_id,
            "file_id": file_id,
            "position": chunk.position,
            "text": chunk.text,
            "dense": vector.tolist(),
        }


def _lap(counter: Any, phase: str, since: float) -> float:
    now = time.perf_counter()
    counter.labels(phase).inc(now - since)
    return now

"""Retrieval settings (env prefix CRUCIBLE_RETRIEVAL_). Defaults are the dev defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.common.config import ServiceSettings


class RetrievalSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRUCIBLE_RETRIEVAL_", extra="ignore")

    port: int = 8001
    database_url: str | None = None  # default: SQLite under var/
    # An http(s):// URL is a Milvus server: Milvus standalone in compose, Milvus Lite's own
    # process in the native stack (services/milvuslite.py). A file path runs Milvus Lite inside
    # this service (simplest; its engine then shares this process's interpreter lock).
    milvus_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("CRUCIBLE_RETRIEVAL_MILVUS_URI", "MILVUS_URI")
    )
    milvus_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("CRUCIBLE_RETRIEVAL_MILVUS_TOKEN", "MILVUS_TOKEN"),
    )
    milvus_wait_seconds: float = 60.0  # at startup, for a Milvus server still starting
    milvus_timeout_seconds: float = 30.0  # per call, retries included; then 503
    collection: str = "crucible_chunks"
    # The dense index, chosen when the collection is created. FLAT (exact) measured fastest on
    # Milvus Lite at 100k chunks (BENCHMARKS.md); HNSW suits a Milvus server at larger scale.
    dense_index: Literal["FLAT", "HNSW"] = "FLAT"
    # HNSW's graph degree and build width (at creation) and its search width (each search; at
    # least the candidates a search asks for): docs/deploy.md, "Milvus at 500k-5M chunks".
    hnsw_m: int = Field(default=16, ge=4, le=64)
    hnsw_ef_construction: int = Field(default=200, ge=8, le=1024)
    hnsw_ef: int = Field(default=128, ge=1, le=4096)
    # "hybrid" fuses dense vectors and BM25 by reciprocal rank; "dense" uses vectors alone.
    search_mode: Literal["hybrid", "dense"] = "hybrid"

    # Embedding model: a sentence-transformers directory; default: the packaged all-MiniLM-L6-v2.
    embedding_model_dir: Path | None = None
    embedding_model_id: str = "all-MiniLM-L6-v2"
    # torch fp32: one exact vector per text. onnx-int8 embeds batches ~1.7x faster on CPUs with
    # VNNI (no faster without), within cosine ~0.99 and batch-dependent (BENCHMARKS.md).
    embedding_backend: Literal["torch", "onnx-int8"] = "torch"
    # Small calls (at most 4 texts) on an fp32 ONNX export of the same model: ~3x faster for one
    # text, identical vectors; exported under var/models at the first start, torch until then.
    small_calls_onnx: bool = True
    # Search queries on an 8-bit export of that model (blocks of 32): ~1.3x faster again,
    # within cosine 0.999 of fp32; made beside it at the first start. Needs small_calls_onnx.
    search_queries_int8: bool = True
    embedding_batch_size: int = 32
    max_inputs_per_request: int = 2048
    # Requests waiting for the embedder beyond this are answered 429 at once, never queued.
    max_pending_embeddings: int = 64

    # Uploads: whole files, streamed to disk; the gateway caps its own forwarding at the same size.
    max_body_bytes: int = 8 << 20
    max_upload_bytes: int = 64 << 20
    max_files_per_store: int = 10_000
    # Bytes of files one owner may hold; an upload past it is 429 insufficient_quota.
    owner_quota_bytes: int = 20 << 30
    # Files ingested at once; the rest wait their turn in the background.
    ingest_concurrency: int = 2
    # While Milvus is unreachable a file waits, `in_progress`, retrying with backoff; then fails.
    ingest_outage_seconds: float = 300.0
    # PDF and HTML are parsed in a worker process stopped at these caps (the file then fails).
    parse_timeout_s: float = 60.0
    parse_memory_mb: int = 1024

    def db_url(self) -> str:
        return self.database_url or self.sqlite_url("retrieval")

    def milvus(self) -> str:
        return self.milvus_uri or str(self.var_dir / "milvus.db")

    def files_dir(self) -> Path:
        return self.var_dir / "files"

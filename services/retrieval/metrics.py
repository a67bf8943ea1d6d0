"""Retrieval's own metrics (names `crucible_retrieval_*`; labels bounded, never ids)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS


class RetrievalMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        p = "crucible_retrieval_"

        def per_mode(name: str, doc: str) -> Histogram:
            h = Histogram(p + name, doc, ["mode"], buckets=LATENCY_BUCKETS, registry=registry)
            for mode in ("dense", "hybrid"):  # present from the start: rate() sees the first
                h.labels(mode)
            return h

        self.search_seconds = per_mode(
            "search_duration_seconds", "Vector store search, query embedding included"
        )
        self.search_vector_db_seconds = per_mode(
            "search_vector_db_duration_seconds",
            "The part of a vector store search spent in the vector database's calls",
        )
        self.embed_seconds = Histogram(
            p + "embedding_duration_seconds",
            "Time to embed one batch",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.embedded_tokens = Counter(
            p + "embedded_tokens_total", "Word pieces embedded", ["source"], registry=registry
        )
        self.ingested = Counter(
            p + "ingested_files_total",
            "Vector store files finished ingesting",
            ["outcome"],
            registry=registry,
        )
        self.chunks_ingested = Counter(
            p + "ingested_chunks_total", "Chunks embedded and upserted", registry=registry
        )
        self.ingest_seconds = Histogram(
            p + "ingestion_duration_seconds",
            "Time to ingest one file",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=registry,
        )
        self.ingest_retries = Counter(
            p + "ingestion_retries_total",
            "Ingestion tries that met an unreachable vector database",
            registry=registry,
        )
        self.ingest_phase_seconds = Counter(
            p + "ingestion_phase_seconds_total",
            "Where ingestion time goes: parse (and chunk), embed, upsert, reconcile",
            ["phase"],
            registry=registry,
        )
        self.ingesting = Gauge(
            p + "ingesting_files", "Files queued or being ingested", registry=registry
        )
        self.small_calls_onnx = Gauge(
            p + "embedding_small_calls_onnx",
            "1 once small embedding calls run on the fp32 ONNX model, 0 while on torch",
            registry=registry,
        )
        self.queries_int8 = Gauge(
            p + "embedding_queries_int8",
            "1 once search queries run on the 8-bit ONNX model, 0 while on fp32",
            registry=registry,
        )
        self.stores = Gauge(p + "vector_stores", "Vector stores", registry=registry)
        self.chunks = Gauge(p + "chunks", "Chunks held by completed files", registry=registry)

    def watch(self, active: Callable[[], int], totals: Callable[[], tuple[int, int]]) -> None:
        """Gauges read at scrape time from the ingestor and the catalog."""
        self.ingesting.set_function(lambda: float(active()))
        self.stores.set_function(lambda: float(totals()[0]))
        self.chunks.set_function(lambda: float(totals()[1]))

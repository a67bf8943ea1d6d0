"""Chunks and their vectors in Milvus (Milvus Lite for a file path, a server for a URL).

Filter expressions are built only from ids this service generated or validated (`_literal`
refuses anything else) and attribute filters compiled from digests and numbers
(filters.compile_filter), with the owner always in the expression. Reads that follow a write
use Strong consistency.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import numpy as np
from pymilvus import (
    AnnSearchRequest,
    DataType,
    Function,
    FunctionType,
    MilvusClient,
    MilvusException,
    RRFRanker,
)
from pymilvus.client.types import Status

from services.common.errors import Unavailable

log = logging.getLogger("crucible.retrieval.vectors")

_SAFE = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")
RRF_K = 60  # the usual reciprocal-rank constant
# Candidates fetched from each side of a hybrid search per requested result.
HYBRID_DEPTH = 4
NOT_LOADED = 101  # Milvus's "collection not loaded"
# A server down or not answering in time.
UNREACHABLE = (
    Status.CONNECT_FAILED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)


def _literal(value: str) -> str:
    if not _SAFE.fullmatch(value):
        raise ValueError("refusing to put an unvalidated string into a filter expression")
    return f'"{value}"'


def _scope(
    owner: str,
    stores: Sequence[str],
    files: Sequence[str] | None = None,
    *,
    exclude: Sequence[str] = (),
    where: str | None = None,
) -> str:
    """The owner's rows of `stores`; of `files` only, if given, and none of `exclude`'s;
    `where`: an attribute filter from filters.compile_filter (built from digests and numbers)."""
    expr = f"owner == {_literal(owner)} and vector_store_id in [{', '.join(map(_literal, stores))}]"
    if files is not None:
        expr += f" and file_id in [{', '.join(map(_literal, files))}]"
    if exclude:
        expr += f" and file_id not in [{', '.join(map(_literal, exclude))}]"
    if where:
        expr += f" and {where}"
    return expr


@dataclass(frozen=True)
class Hnsw:
    """HNSW's parameters: graph degree and build width at creation, search width per search."""

    m: int = 16
    ef_construction: int = 200
    ef: int = 128


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    vector_store_id: str
    file_id: str
    position: int
    text: str
    score: float  # cosine similarity of the query and the chunk, in [-1, 1]


class VectorIndex:
    def __init__(
        self,
        uri: str,
        token: str | None,
        collection: str,
        dim: int,
        dense_index: Literal["FLAT", "HNSW"] = "FLAT",
        timeout: float = 30.0,
        metric: Literal["IP", "COSINE"] = "IP",
        hnsw: Hnsw = Hnsw(),
    ) -> None:
        # Every call is bounded: pymilvus otherwise retries a dead server for minutes.
        self.client = MilvusClient(uri, token=token or "", timeout=timeout)
        self.timeout = timeout
        self.collection = collection
        self.dim = dim
        self.dense_index = dense_index
        self.hnsw = hnsw
        self.metric = metric
        self.hybrid = False
        # Whether attribute filters run in Milvus (the C++ engine: the native default and Milvus
        # standalone); Milvus Lite 3 evaluates JSON expressions by other rules.
        self.engine_filters = False
        self.unflushed = 0
        # One caller at a time: Milvus Lite (in this process or its own) is not safe otherwise.
        self._lock = threading.Lock()

    def ensure(self) -> bool:
        """Create (if needed) and load the collection; learn whether BM25 is available. True
        when the collection was created here (a new or emptied Milvus)."""
        with self._lock:
            created = not self.client.has_collection(self.collection)
            if not created and not self._has_field("attributes"):
                # Made before chunks carried their file's attributes: rebuilt from the files.
                log.warning("the collection predates attribute filters in Milvus; rebuilding it")
                self.client.drop_collection(self.collection)
                created = True
            if created:
                self._create()
            self.hybrid = self._has_field("sparse")
            self.client.load_collection(self.collection)
            self.engine_filters = self._server_version() != "milvus_lite"
        return created

    def _has_field(self, name: str) -> bool:
        fields = self.client.describe_collection(self.collection)["fields"]
        return any(f["name"] == name for f in fields)

    def _server_version(self) -> str:
        """What the server said when the client connected: `milvus_lite` for Milvus Lite 3
        (in process or as a server), `v2.x` for standalone, nothing from milvus-lite 2.5.1."""
        info = self.client.get_server_version(detail=True, timeout=self.timeout)
        return str(info.get("version", "")) if isinstance(info, dict) else str(info)

    def _create(self) -> None:
        try:
            self._create_with(bm25=True)
        except Exception as exc:  # a Milvus build without full-text search: dense alone
            log.warning("BM25 unavailable in this Milvus (%s); dense search only", exc)
            if self.client.has_collection(self.collection):
                self.client.drop_collection(self.collection)
            self._create_with(bm25=False)

    def _create_with(self, *, bm25: bool) -> None:
        schema = self.client.create_schema(auto_id=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=32)
        schema.add_field("owner", DataType.VARCHAR, max_length=128)
        schema.add_field("vector_store_id", DataType.VARCHAR, max_length=40)
        schema.add_field("file_id", DataType.VARCHAR, max_length=40)
        schema.add_field("position", DataType.INT64)
        schema.add_field("text", DataType.VARCHAR, max_length=65535, enable_analyzer=bm25)
        schema.add_field("attributes", DataType.JSON)  # filters.encode_attributes
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=self.dim)
        index = self.client.prepare_index_params()
        params: dict[str, Any] = {}
        if self.dense_index == "HNSW":
            params = {"M": self.hnsw.m, "efConstruction": self.hnsw.ef_construction}
        # Inner product by default: every vector stored is unit length (the embedder normalizes),
        # so it is the cosine, without Milvus Lite's FLAT search normalizing every stored vector
        # again on each query (BENCHMARKS.md). Collections made earlier keep COSINE.
        index.add_index(
            "dense", index_type=self.dense_index, metric_type=self.metric, params=params
        )
        if bm25:
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(
                Function(
                    name="bm25",
                    function_type=FunctionType.BM25,
                    input_field_names=["text"],
                    output_field_names=["sparse"],
                )
            )
            index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        self.client.create_collection(
            self.collection, schema=schema, index_params=index, consistency_level="Strong"
        )

    def _call(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One Milvus call. A server down or timing out (retries included) is Unavailable, a
        503 to the user; a collection that a restarted server holds released is loaded again
        and the call made once more."""
        try:
            try:
                return call(*args, **kwargs)
            except MilvusException as exc:
                if exc.code != NOT_LOADED:
                    raise
                log.warning("collection released (Milvus restarted?); loading it again")
                self.client.load_collection(self.collection, timeout=self.timeout)
                return call(*args, **kwargs)
        except MilvusException as exc:
            if exc.code in UNREACHABLE or "Retry timeout" in exc.message:
                raise Unavailable("the vector database is unavailable; retry shortly") from exc
            raise

    def ping(self, timeout: float = 2.0) -> None:
        """A cheap call: returns if Milvus answers, raises Unavailable if it does not.

        It waits at most `timeout` for the lock: a call still holding it means Milvus is busy
        answering that call (which raises Unavailable itself if Milvus is gone). Waiting behind
        a long flush or count made `/ready` time out under ordinary load."""
        if not self._lock.acquire(timeout=timeout):
            return
        try:
            self._call(self.client.has_collection, self.collection, timeout=timeout)
        finally:
            self._lock.release()

    def upsert(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            self._call(self.client.upsert, self.collection, rows, timeout=self.timeout)
            self.unflushed += len(rows)

    def flush(self, at_least: int = 1) -> None:
        """Seal what was written once `at_least` rows wait. Milvus Lite scans unsealed rows
        slowly (a count or search over 20k of them took 0.6 s; after a flush, 35 ms), and a
        flush costs CPU: ingestion flushes in batches and when it goes idle."""
        with self._lock:
            if self.unflushed >= at_least:
                self._call(self.client.flush, self.collection, timeout=self.timeout)
                self.unflushed = 0

    def chunk_ids(self, owner: str, store: str, file: str) -> set[str]:
        with self._lock:
            it = self._call(
                self.client.query_iterator,
                self.collection,
                batch_size=1000,
                filter=_scope(owner, [store], [file]),
                output_fields=["id"],
                timeout=self.timeout,
            )
            ids: set[str] = set()
            try:
                while batch := it.next():
                    ids.update(r["id"] for r in batch)
            finally:
                it.close()
        return ids

    def set_attributes(self, owner: str, store: str, file: str, attributes: dict[str, Any]) -> int:
        """Give every chunk row of a file these (encoded) attributes; how many rows. Rows are
        read and written back in batches (an upsert replaces a whole row)."""
        ids = sorted(self.chunk_ids(owner, store, file))
        fields = ["id", "owner", "vector_store_id", "file_id", "position", "text", "dense"]
        for i in range(0, len(ids), 500):
            with self._lock:
                rows = self._call(
                    self.client.get,
                    self.collection,
                    ids=ids[i : i + 500],
                    output_fields=fields,
                    timeout=self.timeout,
                )
                new = [{f: r[f] for f in fields} | {"attributes": attributes} for r in rows]
                self._call(self.client.upsert, self.collection, new, timeout=self.timeout)
                self.unflushed += len(new)
        return len(ids)

    def delete_ids(self, ids: Iterable[str]) -> None:
        batch = [i for i in ids if _SAFE.fullmatch(i)]
        if batch:
            with self._lock:
                self._call(self.client.delete, self.collection, ids=batch, timeout=self.timeout)

    def delete(self, owner: str, stores: Sequence[str], files: Sequence[str] | None = None) -> None:
        with self._lock:
            self._call(
                self.client.delete,
                self.collection,
                filter=_scope(owner, stores, files),
                timeout=self.timeout,
            )

    def count(self, owner: str, stores: Sequence[str], files: Sequence[str] | None = None) -> int:
        with self._lock:
            res = self._call(
                self.client.query,
                self.collection,
                filter=_scope(owner, stores, files),
                output_fields=["count(*)"],
                consistency_level="Strong",
                timeout=self.timeout,
            )
        return int(res[0]["count(*)"])

    def search(
        self,
        vector: np.ndarray,
        text: str,
        owner: str,
        stores: Sequence[str],
        files: Sequence[str] | None,
        limit: int,
        hybrid: bool,
        *,
        exclude: Sequence[str] = (),
        where: str | None = None,
    ) -> list[Hit]:
        expr = _scope(owner, stores, files, exclude=exclude, where=where)
        fields = ["vector_store_id", "file_id", "position", "text", "dense"]
        with self._lock:
            if hybrid and self.hybrid and text.strip():
                depth = limit * HYBRID_DEPTH
                requests = [
                    AnnSearchRequest(
                        data=[vector.tolist()],
                        anns_field="dense",
                        param=self._dense_params(depth),
                        limit=depth,
                        expr=expr,
                    ),
                    AnnSearchRequest(
                        data=[text], anns_field="sparse", param={}, limit=depth, expr=expr
                    ),
                ]
                res = self._call(
                    self.client.hybrid_search,
                    self.collection,
                    requests,
                    RRFRanker(RRF_K),
                    limit=limit,
                    output_fields=fields,
                    timeout=self.timeout,
                )
            else:
                res = self._call(
                    self.client.search,
                    self.collection,
                    data=[vector.tolist()],
                    anns_field="dense",
                    search_params={"params": self._dense_params(limit)},
                    limit=limit,
                    filter=expr,
                    output_fields=fields,
                    timeout=self.timeout,
                )
        hits = []
        for r in res[0]:
            e = r["entity"]
            # The cosine of query and chunk is the score users threshold on, in both modes
            # (an RRF value is a rank statistic, not a similarity).
            score = float(np.dot(vector, np.asarray(e["dense"], dtype=np.float32)))
            hits.append(
                Hit(
                    r["id"],
                    e["vector_store_id"],
                    e["file_id"],
                    int(e["position"]),
                    e["text"],
                    score,
                )
            )
        return hits

    def _dense_params(self, candidates: int) -> dict[str, Any]:
        """HNSW searches `ef` wide, and never narrower than the candidates asked for."""
        return {"ef": max(self.hnsw.ef, candidates)} if self.dense_index == "HNSW" else {}

    def close(self) -> None:
        with self._lock:
            self.client.close()

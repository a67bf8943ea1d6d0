"""The native stack's trace sink: an OTLP/HTTP receiver (`POST /v1/traces`, protobuf, gzip or
not, decoded with the OpenTelemetry protocol package) that keeps spans in SQLite under var/,
and the reader behind `crucible trace <trace-id>`. Compose runs Jaeger instead (docker-compose.yml).

    python -m services.traces        # listens on CRUCIBLE_TRACES_PORT (4318, OTLP's)

Spans are kept by (trace id, span id): an exporter's retry of a batch adds nothing. Spans older
than `retention_s` are pruned as new ones arrive. This process records no spans of its own.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import zlib
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from pydantic_settings import SettingsConfigDict

from services.common.app import build_app, serve
from services.common.config import ServiceSettings
from services.common.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

MAX_BODY = 16 << 20  # an exporter's batch (512 spans) is far smaller
PROTOBUF = "application/x-protobuf"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    parent_span_id TEXT NOT NULL,
    service TEXT NOT NULL,
    name TEXT NOT NULL,
    kind INTEGER NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    status INTEGER NOT NULL,
    attributes TEXT NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX IF NOT EXISTS spans_by_start ON spans (start_ns);
"""


class TraceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRUCIBLE_TRACES_", extra="ignore")

    port: int = 4318
    retention_s: float = 7 * 86_400.0

    def db_path(self) -> Path:
        return self.var_dir / "traces.db"


def _value(v: Any) -> Any:
    """An OTLP AnyValue as plain JSON."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


class SpanStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        self.lock = threading.Lock()

    def add(self, request: ExportTraceServiceRequest) -> int:
        """Keep the spans of one export; returns how many were new."""
        rows = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            service = str(resource.get("service.name") or "unknown")
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    attributes = {a.key: _value(a.value) for a in s.attributes}
                    rows.append(
                        (
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            service,
                            s.name,
                            s.kind,
                            s.start_time_unix_nano,
                            s.end_time_unix_nano,
                            s.status.code,
                            json.dumps(attributes, default=str),
                        )
                    )
        with self.lock:
            before = self.db.total_changes
            self.db.executemany(
                "INSERT OR IGNORE INTO spans VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
            )
            return self.db.total_changes - before

    def prune(self, older_than_s: float) -> None:
        cutoff = int((time.time() - older_than_s) * 1e9)
        with self.lock:
            self.db.execute("DELETE FROM spans WHERE start_ns < ?", (cutoff,))

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        """A trace's spans, earliest first."""
        with self.lock:
            rows = self.db.execute(
                "SELECT span_id, parent_span_id, service, name, kind, start_ns, end_ns, status,"
                " attributes FROM spans WHERE trace_id = ? ORDER BY start_ns, span_id",
                (trace_id.lower(),),
            ).fetchall()
        names = ("span_id", "parent_span_id", "service", "name", "kind", "start_ns", "end_ns")
        return [
            dict(zip(names, r[:7], strict=True)) | {"status": r[7], "attributes": json.loads(r[8])}
            for r in rows
        ]

    def close(self) -> None:
        self.db.close()


def tree(spans: list[dict[str, Any]]) -> list[str]:
    """A trace as lines: each span under its parent, with its start after the trace's and its
    duration (a span whose parent was not received starts a root of its own)."""
    if not spans:
        return []
    t0 = min(s["start_ns"] for s in spans)
    ids = {s["span_id"] for s in spans}
    children: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        parent = s["parent_span_id"] if s["parent_span_id"] in ids else ""
        children.setdefault(parent, []).append(s)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in children.get(parent, []):
            start = (s["start_ns"] - t0) / 1e6
            took = (s["end_ns"] - s["start_ns"]) / 1e6
            error = "  ERROR" if s["status"] == 2 else ""
            lines.append(
                f"{start:>10.1f} ms {took:>10.1f} ms | {'  ' * depth}{s['service']}: {s['name']}"
                f"{error}"
            )
            walk(s["span_id"], depth + 1)

    walk("", 0)
    return lines


def _inflate(body: bytes, gzip: bool) -> bytes:
    """A compressed body, refused past MAX_BODY once inflated (a small bomb stays small)."""
    inflater = zlib.decompressobj(wbits=31 if gzip else 15)
    out = inflater.decompress(body, MAX_BODY)
    if inflater.unconsumed_tail:
        raise PayloadTooLarge(f"the export inflates past {MAX_BODY} bytes")
    if not inflater.eof:
        raise zlib.error("the compressed body ends early")
    return out


def create_app(settings: TraceSettings | None = None) -> FastAPI:
    s = settings or TraceSettings()
    # Its own requests are never traced: each export would make spans to export.
    s = s.model_copy(update={"otlp_endpoint": None})
    store = SpanStore(s.db_path())
    app = build_app("traces", settings=s, body_limit=MAX_BODY, title="Crucible trace sink")
    app.state.spans = store
    pruned = [0.0]

    @app.post("/v1/traces", include_in_schema=False)
    async def receive(request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith(PROTOBUF):
            raise UnsupportedMediaType(f"send OTLP as protobuf ({PROTOBUF}), as the SDKs do")
        body = await request.body()
        encoding = request.headers.get("content-encoding", "")
        try:
            if encoding in ("gzip", "deflate"):
                body = _inflate(body, gzip=encoding == "gzip")
            export = ExportTraceServiceRequest()
            export.ParseFromString(body)
        except (zlib.error, DecodeError) as exc:
            raise InvalidRequest(f"not an OTLP trace export: {type(exc).__name__}") from None
        await asyncio.to_thread(store.add, export)
        if time.monotonic() - pruned[0] > 60:
            pruned[0] = time.monotonic()
            await asyncio.to_thread(store.prune, s.retention_s)
        answer = ExportTraceServiceResponse().SerializeToString()
        return Response(answer, media_type=PROTOBUF)

    return app


def main() -> None:
    s = TraceSettings()
    serve("traces", create_app(s), s)


if __name__ == "__main__":
    main()

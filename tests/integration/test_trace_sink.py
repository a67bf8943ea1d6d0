"""The native stack's trace sink (services/traces.py) as a process: the OpenTelemetry SDK's own
OTLP/HTTP exporter sends to it, a batch sent twice is kept once, gzip bodies are read as the
protocol allows, and what is not an export is refused without harming what was kept. Also the
gateway's hand-made trace context (services/common/tracing.py) against the SDK's propagator:
both must read and write every header alike; and its hand-made spans (services/gateway/spans.py)
exported by a child process (services/common/spanexport.py) that is restarted if it dies."""

from __future__ import annotations

import gzip
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common import tracing
from services.common.spanexport import SpanPipe
from services.gateway.spans import RequestTrace
from services.traces import PROTOBUF, SpanStore, tree
from tests.processes import Proc, service
from tests.spans import spans_when


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Path]]:
    var = tmp_path_factory.mktemp("traces")
    with service("traces", var, {}, ready="/ready") as proc:
        yield proc, var / "traces.db"


def _spans(db: Path, trace_id: str) -> list[dict[str, Any]]:
    store = SpanStore(db)
    try:
        return store.trace(trace_id)
    finally:
        store.close()


def _export(trace_id: bytes, names: list[str]) -> bytes:
    """An export of spans named `names`, each the child of the one before."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    attribute = resource_spans.resource.attributes.add()
    attribute.key, attribute.value.string_value = "service.name", "lab-app"
    spans = resource_spans.scope_spans.add().spans
    now, parent = time.time_ns(), b""
    for i, name in enumerate(names):
        span = spans.add()
        span.trace_id, span.span_id, span.parent_span_id = trace_id, bytes([i + 1] * 8), parent
        span.name, span.start_time_unix_nano, span.end_time_unix_nano = name, now + i, now + 1000
        parent = span.span_id
    return request.SerializeToString()


def _post(url: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/traces", content=body, headers={"content-type": PROTOBUF, **headers}, timeout=10
    )


def test_the_sdks_exporter_sends_a_tree_the_sink_keeps(sink: tuple[Proc, Path]) -> None:
    proc, db = sink
    provider = TracerProvider(resource=Resource.create({"service.name": "lab-app"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(f"{proc.url}/v1/traces")))
    tracer = provider.get_tracer("test")
    with (
        tracer.start_as_current_span("request") as root,
        tracer.start_as_current_span("step", attributes={"crucible.step": 1}),
    ):
        pass
    provider.shutdown()
    spans = _spans(db, f"{root.get_span_context().trace_id:032x}")
    assert [(s["service"], s["name"]) for s in spans] == [
        ("lab-app", "request"),
        ("lab-app", "step"),
    ]
    assert spans[1]["parent_span_id"] == spans[0]["span_id"]
    assert spans[1]["attributes"] == {"crucible.step": 1}
    lines = tree(spans)
    assert lines[0].endswith("| lab-app: request") and lines[1].endswith("|   lab-app: step")


def test_a_batch_sent_twice_is_kept_once_and_gzip_is_read(sink: tuple[Proc, Path]) -> None:
    proc, db = sink
    trace_id = random.randbytes(16)
    body = _export(trace_id, ["a", "b"])
    for _ in range(2):  # an exporter's retry
        assert _post(proc.url, body).status_code == 200
    assert [s["name"] for s in _spans(db, trace_id.hex())] == ["a", "b"]
    other = random.randbytes(16)
    zipped = gzip.compress(_export(other, ["c"]))
    assert _post(proc.url, zipped, **{"content-encoding": "gzip"}).status_code == 200
    assert [s["name"] for s in _spans(db, other.hex())] == ["c"]


def test_what_is_not_an_export_is_refused_and_harms_nothing(sink: tuple[Proc, Path]) -> None:
    proc, db = sink
    kept = random.randbytes(16)
    assert _post(proc.url, _export(kept, ["kept"])).status_code == 200
    bad = _post(proc.url, b"\xff\xff\xff not protobuf")
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert _post(proc.url, b"\x1f\x8b broken", **{"content-encoding": "gzip"}).status_code == 400
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in 64 KiB
    assert _post(proc.url, bomb, **{"content-encoding": "gzip"}).status_code == 413
    as_json = httpx.post(f"{proc.url}/v1/traces", json={"resourceSpans": []}, timeout=10)
    assert as_json.status_code == 415
    assert [s["name"] for s in _spans(db, kept.hex())] == ["kept"]
    assert httpx.get(f"{proc.url}/ready", timeout=10).status_code == 200


def test_the_gateways_trace_context_agrees_with_the_sdks_propagator() -> None:
    propagator = TraceContextTextMapPropagator()
    for _ in range(200):
        context = SpanContext(
            random.getrandbits(128) or 1,
            random.getrandbits(64) or 1,
            is_remote=False,
            trace_flags=TraceFlags(random.choice([0, 1])),
        )
        carrier: dict[str, str] = {}
        propagator.inject(carrier, trace.set_span_in_context(NonRecordingSpan(context)))
        ours = tracing.header(NonRecordingSpan(context))
        assert ours.decode() == carrier["traceparent"]
        parsed = tracing.parse(ours)
        assert parsed is not None
        assert (parsed.trace_id, parsed.span_id, parsed.trace_flags) == (
            context.trace_id,
            context.span_id,
            context.trace_flags,
        )
    for bad in (b"", b"00-" + b"0" * 32 + b"-" + b"1" * 16 + b"-01", b"zz", b"00-abc-def-01"):
        assert tracing.parse(bad) is None
        extracted = trace.get_current_span(propagator.extract({"traceparent": bad.decode()}))
        assert not extracted.get_span_context().is_valid  # the SDK refuses them too


def _request(pipe: SpanPipe, traceparent: bytes | None, status: int) -> RequestTrace:
    headers = [(b"content-type", b"application/json")]
    if traceparent is not None:
        headers.append((b"traceparent", traceparent))
    traced = RequestTrace(pipe, "POST /v1/chat/completions", headers)
    traced.end(status, None, model="crucible-dev")
    return traced


def test_the_gateways_spans_are_exported_by_a_child_that_is_restarted_if_it_dies(
    sink: tuple[Proc, Path],
) -> None:
    proc, db = sink
    pipe = SpanPipe("gateway", proc.url, every_s=3600)  # sent when the test says
    try:
        caller = f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}"
        continued = _request(pipe, f"{caller}-01".encode(), 200)
        # The caller's span id is the parent; a new span id of the same trace goes upstream.
        assert continued.traceparent.decode().startswith(caller[:36])
        assert continued.traceparent.decode()[36:] == f"{continued.span_id:016x}-01"
        assert continued.span_id != int(caller[36:], 16)
        unsampled = _request(pipe, f"{caller}-00".encode(), 200)
        assert unsampled.traceparent.endswith(b"-00")  # the caller decided: nothing recorded
        failed = _request(pipe, None, 502)  # a new trace, recorded (ratio 1)
        pipe.send()
        ours = f"{continued.trace_id:032x}"
        spans = spans_when(db, ours, bool)
        assert [(s["service"], s["name"], s["kind"]) for s in spans] == [
            ("gateway", "POST /v1/chat/completions", 2)  # SERVER
        ]
        assert spans[0]["parent_span_id"] == caller[36:]
        assert spans[0]["span_id"] == f"{continued.span_id:016x}"
        assert spans[0]["attributes"] == {
            "model": "crucible-dev",
            "http.response.status_code": 200,
        }
        assert spans[0]["start_ns"] <= spans[0]["end_ns"]
        new = spans_when(db, f"{failed.trace_id:032x}", bool)
        assert new[0]["parent_span_id"] in (None, "") and new[0]["status"] == 2  # ERROR
        # The exporter dies: the next batch starts another, and nothing pending is lost.
        child = pipe._proc
        assert child is not None
        child.kill()
        child.wait(10)
        after = _request(pipe, None, 200)
        pipe.send()
        assert spans_when(db, f"{after.trace_id:032x}", bool)
        assert pipe._proc is not child and pipe.dropped == 0
    finally:
        pipe.close()
    assert len(_spans(db, f"{unsampled.trace_id:032x}")) == 1  # only the sampled request's

"""One trace across the platform: W3C trace context (`traceparent`) through every service, and
spans recorded with OpenTelemetry, exported over OTLP/HTTP (README, "Tracing").

Each process calls `setup` once, with its service's name. Spans go to `CRUCIBLE_OTLP_ENDPOINT`
(the native stack's own receiver, services/traces.py; Jaeger under compose), sampled by trace
at `CRUCIBLE_TRACE_SAMPLE_RATIO` unless the caller already decided (a sampled `traceparent` is
always followed). Without an endpoint nothing is recorded, but trace ids are still minted and
passed on, so the logs of one request share its trace id across services.

- The FastAPI services: the framework's instrumentation (a server span per request, its
  `traceparent` continued), httpx's (a client span per outbound call, `traceparent` sent), and
  Celery's in the fine-tuning processes (a job's task continues the trace that queued it).
- The gateway's hot path (services/gateway/spans.py) makes its spans by hand and exports them
  from a child process (services/common/spanexport.py); `parse` reads the incoming header (the
  propagator's regular expressions cost more than the gateway's whole budget allows;
  bench/gateway.py).
"""

from __future__ import annotations

import logging
import random
import re
from contextlib import AbstractContextManager
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, TraceFlags

log = logging.getLogger("crucible.tracing")

TRACEPARENT = b"traceparent"
# The trace id of a request, returned to the client (`crucible trace <id>` prints its tree).
TRACE_ID_HEADER = b"x-trace-id"
_TRACEPARENT_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# The gateway's current trace id, for its log lines (the services' come from their spans).
current_trace_id: ContextVar[str | None] = ContextVar("trace_id", default=None)
# Requests whose spans would only be noise.
EXCLUDED_URLS = "/health,/ready,/metrics"

_provider: TracerProvider | None = None
_bound = TraceIdRatioBased.get_bound_for_rate(1.0)
random_bits = random.getrandbits  # the SDK's own id source (RandomIdGenerator)


def setup(service: str, endpoint: str | None, ratio: float = 1.0) -> TracerProvider:
    """This process's tracer provider (the first call makes it; later ones return it)."""
    global _provider, _bound
    if _provider is not None:
        return _provider
    _bound = TraceIdRatioBased.get_bound_for_rate(ratio)
    sampler = ParentBased(TraceIdRatioBased(ratio)) if endpoint else ALWAYS_OFF
    provider = TracerProvider(resource=Resource.create({"service.name": service}), sampler=sampler)
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces", timeout=5)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown() -> None:
    """Export what is buffered (at a process's exit)."""
    if _provider is not None:
        _provider.shutdown()


def instrument_app(app: Any, provider: TracerProvider) -> None:
    """A FastAPI app's requests as server spans; httpx's calls as client spans."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=provider,
        excluded_urls=EXCLUDED_URLS,
        exclude_spans=["receive", "send"],
    )
    instrument_httpx(provider)


def instrument_httpx(provider: TracerProvider) -> None:
    """Every httpx call of this process as a client span that sends its `traceparent`."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    instrumentor = HTTPXClientInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=provider)


def parse(value: bytes | str | None) -> SpanContext | None:
    """A `traceparent` header (version 00) as a remote span context; None if absent or bad."""
    if not value:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    found = _TRACEPARENT_RE.fullmatch(text.strip().lower())
    if found is None:
        return None
    trace_id, span_id = int(found[1], 16), int(found[2], 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(found[3], 16)))


def incoming(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The `traceparent` among an ASGI request's headers."""
    for name, value in headers:
        if name == TRACEPARENT:
            return value
    return None


def sampled_new(trace_id: int) -> bool:
    """Whether a trace that starts here is recorded: the SDK's ratio sampler's rule (the trace
    id's lower 64 bits under the ratio's bound), for the gateway's hand-made spans."""
    return trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < _bound


def untraced() -> AbstractContextManager[None]:
    """Calls made inside record no span and send no `traceparent`: background work that belongs
    to no request (the gateway's table refreshes: a trace of their own every second otherwise)."""
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    return suppress_instrumentation()


def continued(traceparent: str | None) -> Context | None:
    """The context to start a span in that continues a stored `traceparent` (a job's, a run's:
    the request that made it), or None (a new trace)."""
    parent = parse(traceparent)
    return trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None


def flush() -> None:
    """Export what is buffered now (a worker child about to exit)."""
    if _provider is not None:
        _provider.force_flush(5_000)


def header(span: Span) -> bytes:
    """The `traceparent` that makes `span` the parent of the next hop."""
    c = span.get_span_context()
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{c.trace_flags:02x}".encode()


def current_header() -> bytes | None:
    """The `traceparent` for a call made now from inside the current span (None outside one)."""
    span = trace.get_current_span()
    return header(span) if span.get_span_context().is_valid else None


def current_id() -> str | None:
    """The trace id of what this task is doing now: the gateway's request, or the current span."""
    if (found := current_trace_id.get()) is not None:
        return found
    c = trace.get_current_span().get_span_context()
    return f"{c.trace_id:032x}" if c.is_valid else None

"""A gateway request's trace: its server span (the child of the caller's `traceparent`, or a new
trace), the `traceparent` its upstream gets, and its trace id for the log lines and the
response (`ids`). The proxy and the forwarder open one per request (services/common/tracing.py
says what it costs and why it is made by hand)."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.trace import StatusCode

from services.common import tracing
from services.gateway.keys import ApiKey


class RequestTrace:
    __slots__ = ("_token", "span", "traceparent")

    def __init__(self, tracer: trace.Tracer, name: str, headers: list[tuple[bytes, bytes]]):
        self.span = tracing.server_span(tracer, name, tracing.incoming(headers))
        self.traceparent = tracing.header(self.span)
        self._token = tracing.current_trace_id.set(self.traceparent[3:35].decode())

    def end(self, status: int, key: ApiKey | None, **attributes: Any) -> None:
        """Close the span with the request's outcome: status, key id and project (never the
        key itself), and `attributes`; an error status for a 5xx."""
        span = self.span
        if span.is_recording():
            attributes["http.response.status_code"] = status
            if key is not None:
                attributes["crucible.key_id"] = key.id
                attributes["crucible.project_id"] = key.owner
            span.set_attributes(attributes)
            if status >= 500:
                span.set_status(StatusCode.ERROR)
        span.end()
        tracing.current_trace_id.reset(self._token)


def ids(rid: str) -> list[tuple[bytes, bytes]]:
    """The response headers that name the request: its id and its trace's."""
    headers = [(b"x-request-id", rid.encode())]
    if (trace_id := tracing.current_trace_id.get()) is not None:
        headers.append((tracing.TRACE_ID_HEADER, trace_id.encode()))
    return headers

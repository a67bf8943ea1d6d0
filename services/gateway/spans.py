"""A gateway request's trace: its server span (the child of the caller's `traceparent`, or a new
trace), the `traceparent` its upstream gets, and its trace id for the log lines and the
response (`ids`). The proxy and the forwarder open one per request.

Made by hand, not with the SDK: the span is ids, a start and an end time kept in a tuple, handed
at its end to the process's `SpanPipe` (services/common/spanexport.py), whose child process
builds the SDK's span and exports it. The SDK's span and its exporter cost ten times as much in
the gateway's interpreter (BENCHMARKS.md, "Tracing on the gateway's hot path")."""

from __future__ import annotations

import time
from typing import Any

from services.common import tracing
from services.common.spanexport import SpanPipe
from services.gateway.keys import ApiKey

_bits = tracing.random_bits


class RequestTrace:
    __slots__ = (
        "_name",
        "_parent",
        "_spans",
        "_start",
        "_token",
        "span_id",
        "trace_id",
        "traceparent",
    )

    def __init__(self, spans: SpanPipe | None, name: str, headers: list[tuple[bytes, bytes]]):
        parent = tracing.parse(tracing.incoming(headers))
        if parent is not None:
            self.trace_id, self._parent = parent.trace_id, parent.span_id
            sampled = spans is not None and parent.trace_flags.sampled
        else:
            self.trace_id, self._parent = _bits(128) or 1, 0
            sampled = spans is not None and tracing.sampled_new(self.trace_id)
        self.span_id = _bits(64) or 1
        self._name, self._start = name, time.time_ns()
        self._spans = spans if sampled else None
        trace_hex = f"{self.trace_id:032x}"
        flags = "01" if sampled else "00"
        self.traceparent = f"00-{trace_hex}-{self.span_id:016x}-{flags}".encode()
        self._token = tracing.current_trace_id.set(trace_hex)

    def end(self, status: int, key: ApiKey | None, **attributes: Any) -> None:
        """Close the span with the request's outcome: status, key id and project (never the
        key itself), and `attributes`; an error status for a 5xx."""
        if self._spans is not None:
            attributes["http.response.status_code"] = status
            if key is not None:
                attributes["crucible.key_id"] = key.id
                attributes["crucible.project_id"] = key.owner
            record = (self._name, self.trace_id, self.span_id, self._parent, self._start)
            self._spans.add((*record, time.time_ns(), status >= 500, attributes))
        tracing.current_trace_id.reset(self._token)


def ids(rid: str) -> list[tuple[bytes, bytes]]:
    """The response headers that name the request: its id and its trace's."""
    headers = [(b"x-request-id", rid.encode())]
    if (trace_id := tracing.current_trace_id.get()) is not None:
        headers.append((tracing.TRACE_ID_HEADER, trace_id.encode()))
    return headers

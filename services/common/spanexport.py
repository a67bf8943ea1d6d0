"""The gateway's spans, exported by a process of their own.

Recording a span on the gateway's hot path costs a few microseconds (services/gateway/spans.py
keeps a tuple); turning it into OTLP protobuf and posting it costs ~50 µs a span, which in the
gateway's interpreter competes with its event loop (bench/gateway.py, `--tracing`). So each
gateway process hands its finished spans, every half second, as one pickled batch over a pipe to
a child (`python -m services.common.spanexport <service> <endpoint>`), which builds the SDK's
`ReadableSpan`s and exports them with the OpenTelemetry OTLP/HTTP exporter.

The child ends when the pipe closes (its gateway exited, however it exited). A child that died
is started again at the next batch; what could not be handed over is dropped and counted, never
waited for: spans are worth less than the requests they describe.
"""

from __future__ import annotations

import logging
import pickle
import struct
import subprocess
import sys
import threading
from typing import IO, Any

log = logging.getLogger("crucible.tracing")

# name, trace id, span id, parent span id (0: a root), start ns, end ns, error, attributes
Record = tuple[str, int, int, int, int, int, bool, dict[str, Any]]
_FRAME = struct.Struct("<I")


class SpanPipe:
    """Finished spans of this process, sent to an exporter child every `every_s` seconds.
    `add` is the hot path's whole cost: a list append (at most `max_pending` held)."""

    def __init__(
        self, service: str, endpoint: str, every_s: float = 0.5, max_pending: int = 50_000
    ) -> None:
        self._argv = [sys.executable, "-m", "services.common.spanexport", service, endpoint]
        self._every_s = every_s
        self._max_pending = max_pending
        self._pending: list[Record] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one sender at a time (the thread, or `close`)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="span-pipe", daemon=True)
        self._thread.start()

    def add(self, record: Record) -> None:
        if len(self._pending) < self._max_pending:
            self._pending.append(record)
        else:
            self.dropped += 1

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            self.send()

    def send(self) -> None:
        """Hand what is pending to the child now."""
        with self._lock:
            batch, self._pending = self._pending, []  # one swap: `add` never waits
            if not batch:
                return
            data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
            try:
                stdin = self._child()
                stdin.write(_FRAME.pack(len(data)) + data)
                stdin.flush()
            except OSError as exc:  # the child died: the next batch starts another
                self.dropped += len(batch)
                log.warning("span exporter gone; %d spans dropped: %s", len(batch), exc)
                self._proc = None

    def _child(self) -> IO[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE)
        assert self._proc.stdin is not None
        return self._proc.stdin

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is pending and let the child export it and exit."""
        self._stop.set()
        self._thread.join(timeout_s)
        self.send()
        with self._lock:
            if self._proc is not None and self._proc.stdin is not None:
                self._proc.stdin.close()
                try:
                    self._proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                self._proc = None


def _spans(batch: list[Record], resource: Any, scope: Any) -> list[Any]:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    sampled = TraceFlags(TraceFlags.SAMPLED)
    ok, error = Status(StatusCode.UNSET), Status(StatusCode.ERROR)
    return [
        ReadableSpan(
            name=name,
            context=SpanContext(trace_id, span_id, False, sampled),
            parent=SpanContext(trace_id, parent_id, True, sampled) if parent_id else None,
            resource=resource,
            attributes=attributes,
            kind=SpanKind.SERVER,
            status=error if failed else ok,
            start_time=start,
            end_time=end,
            instrumentation_scope=scope,
        )
        for name, trace_id, span_id, parent_id, start, end, failed, attributes in batch
    ]


def main(argv: list[str]) -> int:
    """Read batches from stdin until it closes, exporting each to `argv[1]`."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from services.common.logging import configure_logging

    service, endpoint = argv
    configure_logging(service)
    resource = Resource.create({"service.name": service})
    scope = InstrumentationScope(f"crucible.{service}")
    exporter = OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces", timeout=5)
    stdin = sys.stdin.buffer
    while header := stdin.read(_FRAME.size):
        (size,) = _FRAME.unpack(header)
        # Written only by the gateway process that started this one, over a private pipe.
        batch: list[Record] = pickle.loads(stdin.read(size))  # noqa: S301
        exporter.export(_spans(batch, resource, scope))
    exporter.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

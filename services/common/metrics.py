"""Prometheus HTTP metrics as a lean ASGI middleware, plus the `/metrics` endpoint.

Labels are bounded: the route template (never the raw path, which holds ids), the method and the
status class.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _generate
from prometheus_client.core import GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common import tracing
from services.common.logging import request_id

log = logging.getLogger("crucible.http")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class HttpMetrics:
    def __init__(self, service: str, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            f"crucible_{service}_http_requests_total",
            "HTTP requests by route template, method and status class.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            f"crucible_{service}_http_request_duration_seconds",
            "Time from request start to the end of the response body.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


def _route_template(scope: Scope) -> str:
    # The router records the route it matched in the scope it was given (nested routers too).
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched")) if route is not None else "unmatched"


class ObservabilityMiddleware:
    """Request id in, request id out, one log line and two metric updates per request."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _incoming_request_id(scope) or uuid.uuid4().hex
        token = request_id.set(rid)
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                ids = [(b"x-request-id", rid.encode())]
                if (trace_id := tracing.current_id()) is not None:
                    ids.append((tracing.TRACE_ID_HEADER, trace_id.encode()))
                message["headers"] = [*message.get("headers", []), *ids]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            route = _route_template(scope)
            method = scope["method"]
            self.metrics.requests.labels(route, method, f"{status // 100}xx").inc()
            self.metrics.duration.labels(route, method).observe(elapsed)
            if route != "/metrics":
                log.info(
                    "request",
                    extra={
                        "method": method,
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                    },
                )
            request_id.reset(token)


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            rid = value.decode("latin-1")
            # Accept only a sane token, so a client cannot inject into our logs.
            if 0 < len(rid) <= 128 and all(c.isalnum() or c in "-_." for c in rid):
                return rid
    return None


def metrics_endpoint(registry: CollectorRegistry) -> Any:
    async def metrics(_: Request) -> Response:
        return Response(_generate(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics


class DiskCollector:
    """Free and total bytes of the filesystem holding a service's data (its var dir), read at
    each scrape: the disk-space alert (CrucibleDiskAlmostFull) watches their ratio."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            usage = shutil.disk_usage(self.path)
        except OSError:  # not created yet: nothing to report
            return
        free = GaugeMetricFamily(
            "crucible_disk_free_bytes", "Bytes free for this service's data (its var dir)."
        )
        free.add_metric([], usage.free)
        size = GaugeMetricFamily(
            "crucible_disk_size_bytes", "Size of the filesystem holding this service's data."
        )
        size.add_metric([], usage.total)
        yield free
        yield size

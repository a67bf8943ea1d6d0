"""The pieces every service's `create_app` puts together: logging, metrics, errors, health."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager, nullcontext
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Gauge

from services.common import tracing
from services.common.bodylimit import BodyLimitMiddleware, LimitFor
from services.common.errors import install_error_handlers
from services.common.metrics import (
    DiskCollector,
    HttpMetrics,
    ObservabilityMiddleware,
    metrics_endpoint,
)

ReadyCheck = Callable[[], Awaitable[None]]
"""Raises when a dependency is unreachable; its message goes into `/ready`'s body."""


def build_app(
    service: str,
    *,
    lifespan: Any = None,
    ready_checks: Iterable[tuple[str, ReadyCheck]] = (),
    check_timeout: float = 2.0,
    body_limit: int | LimitFor = 1 << 20,
    settings: Any = None,
    **fastapi_kwargs: Any,
) -> FastAPI:
    """A service's app; with `settings`, they and the internal token (`tenancy`) are in
    `app.state`."""
    registry = CollectorRegistry()
    fastapi_kwargs.setdefault("title", f"crucible-{service}")
    app = FastAPI(lifespan=_frozen_after_startup(lifespan), **fastapi_kwargs)
    app.state.registry = registry
    if settings is not None:
        app.state.settings = settings
        app.state.internal_token = settings.internal_token
        registry.register(DiskCollector(settings.var_dir))
        provider = tracing.setup(service, settings.otlp_endpoint, settings.trace_sample_ratio)
        tracing.instrument_app(app, provider)
    app.state.http_metrics = HttpMetrics(service, registry)
    install_error_handlers(app)
    checks = list(ready_checks)
    # Each check's last answer, for the alert (CrucibleNotReady): compose's healthcheck and the
    # native stack's monitor ask /ready every few seconds.
    ready_gauge = Gauge(
        "crucible_ready_check",
        "1 if the dependency named by `check` answered the last /ready, else 0.",
        ["check"],
        registry=registry,
    )

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", include_in_schema=False)
    async def ready() -> JSONResponse:
        results = await asyncio.gather(*(_run_check(c, check_timeout) for _, c in checks))
        status = {name: result for (name, _), result in zip(checks, results, strict=True)}
        for name, result in status.items():
            ready_gauge.labels(name).set(1 if result == "ok" else 0)
        ok = all(r == "ok" for r in results)
        body = {"status": "ready" if ok else "not_ready", "checks": status}
        return JSONResponse(body, status_code=200 if ok else 503)

    app.add_route("/metrics", metrics_endpoint(registry), include_in_schema=False)
    limit_for = body_limit if callable(body_limit) else (lambda _, n=body_limit: n)
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.http_metrics)
    return app


def _frozen_after_startup(lifespan: Any) -> Any:
    """The service's lifespan, then `gc.freeze()`: what startup loaded (models, libraries:
    660k objects in retrieval) is left out of every later collection. A full collection over
    them stopped the whole process for ~300 ms (BENCHMARKS.md); frozen, it does not see them."""

    @asynccontextmanager
    async def frozen(app: FastAPI) -> AsyncIterator[None]:
        async with lifespan(app) if lifespan is not None else nullcontext():
            gc.freeze()
            yield

    return frozen


async def _run_check(check: ReadyCheck, limit: float) -> str:
    try:
        await asyncio.wait_for(check(), limit)
    except TimeoutError:
        return f"timed out after {limit:g}s"
    except Exception as exc:  # a failing dependency is a readiness answer, not a crash
        return f"{type(exc).__name__}: {exc}"[:200]
    return "ok"


def serve(service: str, app: Any, settings: Any) -> None:
    """Run a service's app under uvicorn, logging as JSON (the services' `main`)."""
    import uvicorn

    from services.common.logging import configure_logging

    configure_logging(service, settings.log_level)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )

"""The gateway's own metrics (bounded labels: route template, model, status class, kind)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "crucible_gateway_requests_total",
            "Forwarded requests by route, model and outcome (a stream that broke counts as 5xx).",
            ["route", "model", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "crucible_gateway_request_duration_seconds",
            "Request time, to the last byte of the response.",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "crucible_gateway_time_to_first_token_seconds",
            "Time from request start to the first streamed chunk.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "crucible_gateway_tokens_total",
            "Tokens by model and kind, from `usage`.",
            ["model", "kind"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "crucible_gateway_upstream_errors_total",
            "Upstream failures by kind (connect, protocol, timeout, status_5xx, stream_broken...).",
            ["kind"],
            registry=registry,
        )
        self.rejections = Counter(
            "crucible_gateway_rejections_total",
            "Requests refused before forwarding, by reason.",
            ["reason"],
            registry=registry,
        )
        self.streams = Counter(
            "crucible_gateway_streams_total",
            "Streams relayed, by how (direct: from the engine's read callback into the client's "
            "socket; asgi: one ASGI send per read, also where direct is unavailable).",
            ["relay"],
            registry=registry,
        )
        self.streams_by_relay = {r: self.streams.labels(r) for r in ("direct", "asgi")}
        # Per project and model (a lab's handful of each): what the Cost dashboard prices.
        self.engine_seconds = Counter(
            "crucible_gateway_engine_seconds_total",
            "Engine busy time attributed to served requests (processor sharing), by project "
            "and model.",
            ["project", "model"],
            registry=registry,
        )
        self.project_tokens = Counter(
            "crucible_gateway_project_tokens_total",
            "Tokens of served requests by project, model and direction (input, output).",
            ["project", "model", "direction"],
            registry=registry,
        )
        self._usage: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self.budget_used = Gauge(
            "crucible_gateway_budget_used_ratio",
            "What a budget has used or reserved this period, as a fraction of it, at its last "
            "request (scope: key or project; unit: tokens or usd).",
            ["scope", "id", "unit"],
            registry=registry,
        )
        self.backend_up = Gauge(
            "crucible_gateway_backend_up",
            "1 if the backend answered its last probe.",
            ["backend"],
            registry=registry,
        )
        # Bounded like the labels: routes x models x status classes.
        self._cache: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        # Per alias and target (at most 8 targets an alias): the traffic its guard judges.
        self.alias_requests = Counter(
            "crucible_alias_requests_total",
            "Requests to a model alias, by target and outcome (ok, client_error, error: 5xx or "
            "a broken stream, unavailable: the target was chosen but no server had it)",
            ["alias", "target", "outcome"],
            registry=registry,
        )
        self.alias_latency = Histogram(
            "crucible_alias_request_seconds",
            "Time to the first token (streams) or the whole answer, per alias and target",
            ["alias", "target"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )

    def used(self, project: str, model: str, tokens_in: int, tokens_out: int, s: float) -> None:
        """A served request's tokens and engine time, by project and model (a fine-tuned one by
        its base, as everywhere on the public /metrics)."""
        model = self.model_label(model)
        children = self._usage.get((project, model))
        if children is None:
            children = self._usage[(project, model)] = (
                self.engine_seconds.labels(project, model),
                self.project_tokens.labels(project, model, "input"),
                self.project_tokens.labels(project, model, "output"),
            )
        engine, tin, tout = children
        engine.inc(s)
        tin.inc(tokens_in)
        tout.inc(tokens_out)

    def watch(self, concurrency: Any) -> None:
        """Gauges read from the admission counters at scrape time (nothing on the hot path):
        requests admitted and the request-body bytes they hold, which show a client holding
        the gateway open with slow bodies."""
        Gauge(
            "crucible_gateway_requests_in_flight",
            "Requests admitted and not yet answered (each holds a concurrency slot).",
            registry=self.registry,
        ).set_function(lambda: concurrency.total)
        Gauge(
            "crucible_gateway_body_bytes_in_flight",
            "Request-body bytes held by admitted requests (declared length, or as read).",
            registry=self.registry,
        ).set_function(lambda: concurrency.bytes_total)

    def _children(self, route: str, model: str, status_class: str) -> tuple[Any, Any]:
        """The labelled series of a request, cached: `labels()` is a lock and a dict build."""
        key = (route, model, status_class)
        pair = self._cache.get(key)
        if pair is None:
            pair = (
                self.requests.labels(route, model, status_class),
                self.duration.labels(route, model),
            )
            self._cache[key] = pair
        return pair

    def alias_observe(
        self, alias: Any, target: str, status: int, seconds: float, unavailable: bool
    ) -> None:
        name = f"{alias.owner}/{alias.name}"
        if unavailable:
            outcome = "unavailable"
        else:
            outcome = "ok" if status < 400 else "client_error" if status < 500 else "error"
            self.alias_latency.labels(name, target).observe(seconds)
        self.alias_requests.labels(name, target, outcome).inc()

    @staticmethod
    def model_label(model: str) -> str:
        """A fine-tuned model is labelled by its base (`ft:crucible-dev`): its full id names an
        owner's job and suffix, which /metrics must not show to everyone, and each new adapter
        would add series without bound."""
        if model.startswith("ft:"):
            return "ft:" + model.split(":", 2)[1]
        return model

    def observe(
        self,
        route: str,
        model: str,
        status: int,
        seconds: float,
        ttft: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        failed_midstream: bool,
    ) -> None:
        status_class = "5xx" if failed_midstream else f"{status // 100}xx"
        model = self.model_label(model)
        counter, histogram = self._children(route, model, status_class)
        counter.inc()
        histogram.observe(seconds)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
        if prompt_tokens:
            self.tokens.labels(model, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(model, "completion").inc(completion_tokens)

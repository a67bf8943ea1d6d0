"""Fine-tuning metrics: the API's (jobs by status, queue depth) and the worker's (training
tokens/s, step time), the latter summed across job processes (prometheus multiprocess mode)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Gauge(
            "crucible_finetune_jobs", "Fine-tuning jobs by status", ["status"], registry=registry
        )
        self.queue_depth = Gauge(
            "crucible_finetune_queue_depth",
            "Jobs waiting in the broker for a worker",
            registry=registry,
        )
        self.requeued = Counter(
            "crucible_finetune_requeued_total",
            "Jobs requeued by the reconciler, by reason",
            ["reason"],
            registry=registry,
        )
        for reason in ("worker_lost", "message_lost"):
            self.requeued.labels(reason)  # a dashboard shows 0, not "no data"
        self.adapters_restored = Counter(
            "crucible_finetune_adapters_restored_total",
            "Adapters loaded again into a restarted vLLM",
            registry=registry,
        )

        self.captures = Counter(
            "crucible_captures_stored_total",
            "Stored chat completions kept (a redelivered record counts once)",
            registry=registry,
        )
        self.captures_expired = Counter(
            "crucible_captures_expired_total",
            "Stored completions deleted at the end of their key's retention",
            registry=registry,
        )

        self.eval_runs = Gauge(
            "crucible_eval_runs", "Eval runs by status", ["status"], registry=registry
        )
        self.alias_rollbacks = Counter(
            "crucible_alias_rollbacks_total",
            "Revisions an alias's guard rolled back by itself, by alias and the bar crossed",
            ["alias", "bar"],
            registry=registry,
        )

    def watch_runs(self, counts: Callable[[], dict[str, int]]) -> None:
        for status in ("queued", "in_progress", "completed", "canceled", "failed"):
            self.eval_runs.labels(status).set_function(_count_of(counts, status))

    def watch(self, counts: Callable[[], dict[str, int]], depth: Callable[[], int]) -> None:
        for status in STATUSES:
            self.jobs.labels(status).set_function(_count_of(counts, status))
        self.queue_depth.set_function(lambda: float(depth()))


def cost_model(registry: CollectorRegistry, usd_per_second: float, hosted: dict[str, Any]) -> None:
    """The cost model's prices as gauges, for the Cost dashboard to multiply the gateway's
    engine seconds and tokens by."""
    Gauge(
        "crucible_cost_engine_usd_per_second",
        "What one second of one engine's busy time costs (the cost model's settings)",
        registry=registry,
    ).set(usd_per_second)
    prices = Gauge(
        "crucible_cost_hosted_usd_per_million_tokens",
        "A hosted API's price to compare with, by model (* for any other) and direction",
        ["model", "direction"],
        registry=registry,
    )
    for model, price in (hosted or {"*": {}}).items():
        for direction in ("input", "output"):
            prices.labels(model, direction).set(float(price.get(direction, 0.0)))


class LifecycleCollector:
    """Feedback counts by metric and value, the pass rate of each eval's latest completed run
    per model, and the feedback on each alias's targets, read from SQL at each scrape. Each is
    bounded (the 50 largest, latest, or most recently changed): metric names, values, evals and
    aliases are the users' own words."""

    LIMIT = 50

    def __init__(
        self,
        feedback: Callable[[int], Any],
        pass_rates: Callable[[int], Any],
        alias_feedback: Callable[[int], Any],
    ) -> None:
        self.feedback, self.pass_rates = feedback, pass_rates
        self.alias_feedback = alias_feedback

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        fb = GaugeMetricFamily(
            "crucible_feedback", "Feedback given, by metric and value", labels=["metric", "value"]
        )
        for metric, value, n in self.feedback(self.LIMIT):
            fb.add_metric([metric, value[:64]], n)
        yield fb
        rate = GaugeMetricFamily(
            "crucible_eval_pass_rate",
            "Share of items that passed in each eval's latest completed run, per model",
            labels=["eval", "model"],
        )
        for name, model, passed in self.pass_rates(self.LIMIT):
            rate.add_metric([name[:64], model], passed)
        yield rate
        by_target = GaugeMetricFamily(
            "crucible_alias_feedback",
            "Feedback on each alias target's answers since the alias's current revision",
            labels=["alias", "target", "value"],
        )
        for alias, target, value, n in self.alias_feedback(self.LIMIT):
            by_target.add_metric([alias, target, value[:64]], n)
        yield by_target

    def describe(self) -> list[Any]:
        return []


def _count_of(counts: Callable[[], dict[str, int]], status: str) -> Callable[[], float]:
    return lambda: float(counts().get(status, 0))


class WorkerMetrics:
    """Created inside a job's process; values go to PROMETHEUS_MULTIPROC_DIR."""

    def __init__(self) -> None:
        self.tokens = Counter(
            "crucible_finetune_trained_tokens_total", "Tokens trained on (padding excluded)"
        )
        self.step_seconds = Histogram(
            "crucible_finetune_step_duration_seconds",
            "Time per optimizer step",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.tokens_per_s = Gauge(
            "crucible_finetune_tokens_per_second",
            "Training throughput of the last step",
            multiprocess_mode="max",
        )

    def observe_step(self, tokens: int, seconds: float) -> None:
        self.tokens.inc(tokens)
        self.step_seconds.observe(seconds)
        self.tokens_per_s.set(tokens / seconds if seconds else 0.0)


def serve_worker_metrics(port: int, host: str) -> None:
    from prometheus_client import start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    up = Gauge(
        "crucible_finetune_worker_up",
        "1 while the worker process runs",
        registry=None,
        multiprocess_mode="liveall",
    )
    up.set(1)
    start_http_server(port, addr=host, registry=registry)

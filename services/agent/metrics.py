"""Agent metrics: runs by status, steps per run, tool calls by tool and outcome, tool latency."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.agent.tools import TOOLS


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs = Counter(
            "crucible_agent_runs_total", "Runs ended, by status", ["status"], registry=registry
        )
        self.active = Gauge("crucible_agent_runs_active", "Runs executing now", registry=registry)
        self.steps = Histogram(
            "crucible_agent_run_steps",
            "Model steps per ended run",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 50),
            registry=registry,
        )
        self.tool_calls = Counter(
            "crucible_agent_tool_calls_total",
            "Tool calls by tool and outcome (ok, error, invalid, refused)",
            ["tool", "outcome"],
            registry=registry,
        )
        self.tool_seconds = Histogram(
            "crucible_agent_tool_duration_seconds",
            "Tool call latency",
            ["tool"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.loop_seconds = Histogram(
            "crucible_agent_loop_overhead_seconds",
            "The loop's own time per model step (run time less model and tool time)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=registry,
        )
        # Series present from the start: a dashboard shows 0, and rate() sees the first event.
        for status in ("completed", "incomplete", "failed", "cancelled"):
            self.runs.labels(status)
        for tool in TOOLS:
            for outcome in ("ok", "error", "invalid", "refused"):
                self.tool_calls.labels(tool, outcome)
            self.tool_seconds.labels(tool)
        self.tool_calls.labels("unknown", "refused")

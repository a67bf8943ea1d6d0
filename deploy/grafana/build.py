"""Writes Crucible's Grafana dashboards (deploy/grafana/dashboards/*.json) from the panel lists
below; a test checks the files are what this writes, and runs every query against a real
Prometheus.

    python deploy/grafana/build.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

DATASOURCE = {"type": "prometheus", "uid": "crucible-prometheus"}
TRACES = {"type": "jaeger", "uid": "crucible-jaeger"}
# The service whose traces each dashboard's panels link to (Jaeger's search, in Explore).
TRACED = {
    "overview": "gateway",
    "inference": "vllm",
    "retrieval": "retrieval",
    "finetune": "finetune-worker",
    "lifecycle": "eval-worker",
    "agent": "agent",
    "cost": "gateway",
    "gpu": "vllm",
}


def traces_link(service: str) -> dict[str, Any]:
    """A panel link to the service's traces of the panel's time range, in Grafana's Explore."""
    pane = {
        "datasource": TRACES["uid"],
        "queries": [
            {"refId": "A", "datasource": TRACES, "queryType": "search", "service": service}
        ],
        "range": {"from": "${__from}", "to": "${__to}"},
    }
    panes = quote(json.dumps({"traces": pane}, separators=(",", ":")), safe="${}_")
    return {
        "title": f"Traces: {service}",
        "url": f"/explore?schemaVersion=1&panes={panes}",
        "targetBlank": True,
    }


OUT = Path(__file__).resolve().parent / "dashboards"

# A panel: (title, unit, [(expr, legend), ...]).
Panel = tuple[str, str, list[tuple[str, str]]]

CAPTURED = '{stream="crucible:captures"}'
ALIAS_RATE = "rate(crucible_alias_requests_total[5m])"
HTTP = '{__name__=~"crucible_[a-z]+_http_requests_total"}'
HTTP_5XX = '{__name__=~"crucible_[a-z]+_http_requests_total", status="5xx"}'
# The cost model's price of an engine-second, and what a hosted API would charge for the same
# tokens at its "*" prices (the finetune service exports both from its settings).
RATE = "scalar(max(crucible_cost_engine_usd_per_second))"
HOSTED = " + ".join(
    f'sum(increase(crucible_gateway_project_tokens_total{{direction="{d}"}}[1d]))'
    f' * scalar(max(crucible_cost_hosted_usd_per_million_tokens{{model="*", direction="{d}"}}))'
    " / 1e6"
    for d in ("input", "output")
)
HTTP_BUCKETS = '{__name__=~"crucible_[a-z]+_http_request_duration_seconds_bucket"}'


def p95(metric: str, by: str = "", q: float = 0.95) -> str:
    keys = ", ".join(["le", *([by] if by else [])])
    return f"histogram_quantile({q}, sum by ({keys}) (rate({metric}[5m])))"


def zero_if_none(expr: str, like: str) -> str:
    """`expr`, or 0 for every series of `like`: a healthy service shows 0, not "no data"."""
    return f"({expr}) or ({like} * 0)"


DASHBOARDS: dict[str, tuple[str, list[Panel]]] = {
    "overview": (
        "Crucible / Overview",
        [
            (
                "Requests per second",
                "reqps",
                [
                    ("sum(rate(crucible_gateway_requests_total[1m]))", "gateway (API)"),
                    (f"sum by (job) (rate({HTTP}[1m]))", "{{job}}"),
                ],
            ),
            (
                "5xx ratio",
                "percentunit",
                [
                    (
                        zero_if_none(
                            'sum(rate(crucible_gateway_requests_total{status="5xx"}[5m]))'
                            " / sum(rate(crucible_gateway_requests_total[5m]))",
                            "sum(rate(crucible_gateway_requests_total[5m]))",
                        ),
                        "gateway (API)",
                    ),
                    (
                        zero_if_none(
                            f"sum by (job) (rate({HTTP_5XX}[5m]))"
                            f" / sum by (job) (rate({HTTP}[5m]))",
                            f"sum by (job) (rate({HTTP}[5m]))",
                        ),
                        "{{job}}",
                    ),
                ],
            ),
            (
                "Duration p95",
                "s",
                [
                    (p95("crucible_gateway_request_duration_seconds_bucket", "route"), "{{route}}"),
                    (p95(HTTP_BUCKETS, "job"), "{{job}}"),
                ],
            ),
            ("Targets up", "short", [("up", "{{job}}")]),
        ],
    ),
    "inference": (
        "Crucible / Inference",
        [
            (
                "Time to first token",
                "s",
                [
                    (p95("vllm:time_to_first_token_seconds_bucket", q=0.5), "vLLM p50"),
                    (p95("vllm:time_to_first_token_seconds_bucket"), "vLLM p95"),
                    (
                        p95("crucible_gateway_time_to_first_token_seconds_bucket", "model"),
                        "through the gateway p95 {{model}}",
                    ),
                ],
            ),
            (
                "Inter-token latency",
                "s",
                [
                    (p95("vllm:inter_token_latency_seconds_bucket", q=0.5), "p50"),
                    (p95("vllm:inter_token_latency_seconds_bucket"), "p95"),
                ],
            ),
            (
                "Tokens per second",
                "short",
                [
                    ("sum(rate(vllm:generation_tokens_total[1m]))", "generated"),
                    ("sum(rate(vllm:prompt_tokens_total[1m]))", "prompt"),
                ],
            ),
            (
                "Requests running and waiting",
                "short",
                [
                    ("sum(vllm:num_requests_running)", "running"),
                    ("sum(vllm:num_requests_waiting)", "waiting"),
                ],
            ),
            ("KV cache usage", "percentunit", [("max(vllm:kv_cache_usage_perc)", "used")]),
            (
                "Traffic per model and adapter",
                "reqps",
                [
                    (
                        "sum by (model) (rate(crucible_gateway_requests_total"
                        '{route=~"/v1/(chat/)?completions"}[5m]))',
                        "{{model}}",
                    )
                ],
            ),
        ],
    ),
    "retrieval": (
        "Crucible / Retrieval",
        [
            (
                "Search latency",
                "s",
                [
                    (
                        p95("crucible_retrieval_search_duration_seconds_bucket", "mode", 0.5),
                        "p50 {{mode}}",
                    ),
                    (
                        p95("crucible_retrieval_search_duration_seconds_bucket", "mode"),
                        "p95 {{mode}}",
                    ),
                    (
                        p95("crucible_retrieval_search_vector_db_duration_seconds_bucket", "mode"),
                        "p95 {{mode}}, in the vector database",
                    ),
                ],
            ),
            (
                "Ingestion rate",
                "short",
                [
                    ("sum(rate(crucible_retrieval_ingested_chunks_total[5m]))", "chunks/s"),
                    (
                        "sum by (source) (rate(crucible_retrieval_embedded_tokens_total[5m]))",
                        "tokens/s embedded ({{source}})",
                    ),
                ],
            ),
            (
                "Files ingested (last hour)",
                "short",
                [
                    (
                        "sum by (outcome) (increase(crucible_retrieval_ingested_files_total[1h]))",
                        "{{outcome}}",
                    ),
                    (
                        "sum(increase(crucible_retrieval_ingestion_retries_total[1h]))",
                        "retries (vector database unreachable)",
                    ),
                ],
            ),
            (
                "Stores and chunks",
                "short",
                [
                    ("sum(crucible_retrieval_vector_stores)", "vector stores"),
                    ("sum(crucible_retrieval_chunks)", "chunks"),
                    ("sum(crucible_retrieval_ingesting_files)", "files being ingested"),
                ],
            ),
        ],
    ),
    "finetune": (
        "Crucible / Fine-tuning",
        [
            (
                "Jobs by status",
                "short",
                [("sum by (status) (crucible_finetune_jobs)", "{{status}}")],
            ),
            ("Queue depth", "short", [("sum(crucible_finetune_queue_depth)", "queued in Redis")]),
            (
                "Training tokens per second",
                "short",
                [
                    ("max(crucible_finetune_tokens_per_second)", "last step"),
                    ("sum(rate(crucible_finetune_trained_tokens_total[5m]))", "5 min average"),
                ],
            ),
            (
                "Step time",
                "s",
                [
                    (p95("crucible_finetune_step_duration_seconds_bucket", q=0.5), "p50"),
                    (p95("crucible_finetune_step_duration_seconds_bucket"), "p95"),
                ],
            ),
            (
                "Workers alive and requeues",
                "short",
                [
                    ('sum(up{job="finetune-worker"})', "workers up"),
                    (
                        "sum by (reason) (increase(crucible_finetune_requeued_total[1h]))",
                        "requeued: {{reason}}",
                    ),
                ],
            ),
        ],
    ),
    "agent": (
        "Crucible / Agent",
        [
            (
                "Runs ended (last hour)",
                "short",
                [("sum by (status) (increase(crucible_agent_runs_total[1h]))", "{{status}}")],
            ),
            ("Runs in progress", "short", [("sum(crucible_agent_runs_active)", "active")]),
            (
                "Steps per run",
                "short",
                [
                    (p95("crucible_agent_run_steps_bucket", q=0.5), "p50"),
                    (p95("crucible_agent_run_steps_bucket"), "p95"),
                ],
            ),
            (
                "Tool calls by outcome",
                "reqps",
                [
                    (
                        "sum by (tool, outcome) (rate(crucible_agent_tool_calls_total[5m]))",
                        "{{tool}} {{outcome}}",
                    )
                ],
            ),
            (
                "Tool latency p95",
                "s",
                [(p95("crucible_agent_tool_duration_seconds_bucket", "tool"), "{{tool}}")],
            ),
            (
                "Loop overhead per step",
                "s",
                [(p95("crucible_agent_loop_overhead_seconds_bucket", q=0.5), "p50")],
            ),
        ],
    ),
    "cost": (
        "Crucible / Cost",
        [
            (
                "Cost per day (USD): the lab's engines beside a hosted API",
                "currencyUSD",
                [
                    (f"sum(increase(crucible_gateway_engine_seconds_total[1d])) * {RATE}", "lab"),
                    (HOSTED, "hosted API, same tokens"),
                ],
            ),
            (
                "Cost per project (USD, last day)",
                "currencyUSD",
                [
                    (
                        "sum by (project) (increase(crucible_gateway_engine_seconds_total[1d]))"
                        f" * {RATE}",
                        "{{project}}",
                    )
                ],
            ),
            (
                "Cost per model (USD, last day)",
                "currencyUSD",
                [
                    (
                        "sum by (model) (increase(crucible_gateway_engine_seconds_total[1d]))"
                        f" * {RATE}",
                        "{{model}}",
                    )
                ],
            ),
            (
                "Cost per 1k tokens (USD)",
                "currencyUSD",
                [
                    (
                        f"sum(rate(crucible_gateway_engine_seconds_total[1h])) * {RATE} * 1000"
                        " / sum(rate(crucible_gateway_project_tokens_total[1h]))",
                        "lab",
                    )
                ],
            ),
            (
                "Engine busy time attributed (seconds per second)",
                "short",
                [
                    (
                        "sum by (model) (rate(crucible_gateway_engine_seconds_total[5m]))",
                        "{{model}}",
                    )
                ],
            ),
            (
                "Budgets used (fraction of the period's tokens or dollars)",
                "percentunit",
                [
                    (
                        "max by (scope, id, unit) (crucible_gateway_budget_used_ratio) or vector(0)",
                        "{{scope}} {{id}} ({{unit}})",
                    )
                ],
            ),
            (
                "Requests refused for a spent budget (last hour)",
                "short",
                [
                    (
                        'sum(increase(crucible_gateway_rejections_total{reason="budget"}[1h]))'
                        " or vector(0)",
                        "refused",
                    )
                ],
            ),
        ],
    ),
    "lifecycle": (
        "Crucible / Model lifecycle",
        [
            (
                "Stored completions",
                "reqps",
                [
                    (
                        f"sum(rate(crucible_outbox_sent_total{CAPTURED}[5m]))",
                        "handed off by gateways",
                    ),
                    ("sum(rate(crucible_captures_stored_total[5m]))", "stored"),
                ],
            ),
            (
                "Captures dropped (last hour) and waiting",
                "short",
                [
                    (
                        zero_if_none(
                            "sum by (stream, reason) (increase(crucible_outbox_dropped_total[1h]))",
                            "sum by (stream) (crucible_outbox_buffered)",
                        ),
                        "dropped: {{stream}} {{reason}}",
                    ),
                    ("sum by (stream) (crucible_outbox_buffered)", "waiting: {{stream}}"),
                ],
            ),
            (
                "Feedback by metric and value",
                "short",
                [("sum by (metric, value) (crucible_feedback)", "{{metric}} = {{value}}")],
            ),
            (
                "Eval runs by status",
                "short",
                [("sum by (status) (crucible_eval_runs)", "{{status}}")],
            ),
            (
                "Pass rate by eval and model (latest run)",
                "percentunit",
                [("max by (eval, model) (crucible_eval_pass_rate)", "{{eval}} / {{model}}")],
            ),
            (
                "Eval items graded",
                "reqps",
                [("sum by (status) (rate(crucible_eval_items_total[5m]))", "{{status}}")],
            ),
            (
                "Alias traffic share by target",
                "percentunit",
                [
                    (
                        f"sum by (alias, target) ({ALIAS_RATE})"
                        f" / on (alias) group_left sum by (alias) ({ALIAS_RATE})",
                        "{{alias}} → {{target}}",
                    )
                ],
            ),
            (
                "Alias errors by target (5xx, broken streams, not served)",
                "percentunit",
                [
                    (
                        zero_if_none(
                            "sum by (alias, target) (rate(crucible_alias_requests_total"
                            '{outcome=~"error|unavailable"}[5m]))'
                            f" / sum by (alias, target) ({ALIAS_RATE})",
                            f"sum by (alias, target) ({ALIAS_RATE})",
                        ),
                        "{{alias}} → {{target}}",
                    )
                ],
            ),
            (
                "Alias p95 latency by target (to first token when streamed)",
                "s",
                [
                    (
                        p95("crucible_alias_request_seconds_bucket", by="alias, target"),
                        "{{alias}} → {{target}}",
                    )
                ],
            ),
            (
                "Alias feedback by target (current revision)",
                "short",
                [
                    (
                        "sum by (alias, target, value) (crucible_alias_feedback)",
                        "{{alias}} → {{target}}: {{value}}",
                    )
                ],
            ),
            (
                "Alias rollbacks by the guard (last hour)",
                "short",
                [
                    (
                        zero_if_none(
                            "sum by (alias, bar) (increase(crucible_alias_rollbacks_total[1h]))",
                            f"sum by (alias) ({ALIAS_RATE})",
                        ),
                        "{{alias}}: {{bar}}",
                    )
                ],
            ),
        ],
    ),
    "gpu": (
        "Crucible / GPU",
        [
            ("GPU utilisation", "percent", [("DCGM_FI_DEV_GPU_UTIL", "GPU {{gpu}} {{modelName}}")]),
            (
                "GPU memory used",
                "percentunit",
                [
                    (
                        "DCGM_FI_DEV_FB_USED / (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE)",
                        "GPU {{gpu}} {{modelName}}",
                    )
                ],
            ),
            ("Power", "watt", [("DCGM_FI_DEV_POWER_USAGE", "GPU {{gpu}}")]),
            ("Temperature", "celsius", [("DCGM_FI_DEV_GPU_TEMP", "GPU {{gpu}}")]),
        ],
    ),
}


def dashboard(uid: str, title: str, panels: list[Panel]) -> dict[str, Any]:
    out = []
    for i, (panel_title, unit, queries) in enumerate(panels):
        out.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": panel_title,
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "links": [traces_link(TRACED[uid])],
                "targets": [
                    {
                        "refId": chr(ord("A") + j),
                        "datasource": DATASOURCE,
                        "expr": expr,
                        "legendFormat": legend,
                    }
                    for j, (expr, legend) in enumerate(queries)
                ],
            }
        )
    return {
        "uid": f"crucible-{uid}",
        "title": title,
        "tags": ["crucible"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": out,
    }


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {
        f"{uid}.json": json.dumps(dashboard(uid, title, panels), indent=2) + "\n"
        for uid, (title, panels) in DASHBOARDS.items()
    }


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")

"""Prometheus for the native stack: the config `make up` writes for the local ports.

The scrape jobs carry the same names as in compose (`deploy/prometheus/prometheus.yml`), so the
alert rules and the dashboards under `deploy/` work unchanged on both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

# Job name -> the stack's port name. Everything here serves /metrics.
JOBS = {
    "gateway": "gateway",
    "inference": "inference",
    "retrieval": "retrieval",
    "finetune": "finetune",
    "finetune-worker": "finetune_worker",
    "eval-worker": "eval_worker",
    "agent": "agent",
    "prometheus": "prometheus",
}

# Native only: the monitor that supervises `make up`'s processes (compose has Docker's restarts).
NATIVE_JOBS = {"supervisor": "supervisor"}


def native_config(ports: dict[str, int], scrape_interval: str) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [{"targets": [f"127.0.0.1:{ports[port]}"]}],
            }
            for job, port in {**JOBS, **NATIVE_JOBS}.items()
        ],
    }

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


# CRUCIBLE_REPLICAS=2: the jobs with two processes, and their second one's port (the gateway's
# are both apart from the balancer, which takes the gateway's own port).
REPLICAS = {"gateway": ["gateway_1", "gateway_2"], "inference": ["inference", "inference_2"]}
REPLICAS["finetune-worker"] = ["finetune_worker", "finetune_worker_2"]


def native_config(ports: dict[str, int], scrape_interval: str, replicas: int = 1) -> dict[str, Any]:
    def targets(job: str, port: str) -> list[str]:
        names = REPLICAS[job] if replicas == 2 and job in REPLICAS else [port]
        return [f"127.0.0.1:{ports[n]}" for n in names]

    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets(job, port)}]}
            for job, port in {**JOBS, **NATIVE_JOBS}.items()
        ],
    }

"""CRUCIBLE_REPLICAS=2: what the stack runs (services/stackconfig.py), checked without running
it; tests/integration/test_balancer.py checks and runs the balancer in front of two gateways."""

from __future__ import annotations

from pathlib import Path

import pytest

from services import monitoring
from services.stackconfig import Ports, StackConfig


def test_one_replica_is_the_stack_as_it_was() -> None:
    names = [s.name for s in StackConfig().services()]
    assert "balancer" not in names and "gateway-2" not in names and "inference-2" not in names
    (gateway,) = [s for s in StackConfig().services() if s.name == "gateway"]
    assert gateway.url == "http://127.0.0.1:8080"


def test_two_replicas_run_two_gateways_behind_the_balancer_two_engines_and_two_workers(
    tmp_path: Path,
) -> None:
    config = StackConfig(var_dir=tmp_path, replicas=2)
    services = {s.name: s for s in config.services()}
    p = config.ports
    assert {"gateway", "gateway-2", "inference", "inference-2", "balancer"} <= set(services)
    assert {"finetune-worker", "finetune-worker-2"} <= set(services)
    engines = f'["http://127.0.0.1:{p.inference}", "http://127.0.0.1:{p.inference_2}"]'
    for name in ("gateway", "gateway-2"):
        env = services[name].env
        assert services[name].argv[-1] == "services.gateway"
        assert env["CRUCIBLE_GATEWAY_INFERENCE_URLS"] == engines
    assert services["finetune"].env["CRUCIBLE_FINETUNE_INFERENCE_URLS"] == engines
    ports = {services[n].env["CRUCIBLE_GATEWAY_PORT"] for n in ("gateway", "gateway-2")}
    assert ports == {str(p.gateway_1), str(p.gateway_2)}
    # The balancer takes the gateway's own port: clients and the other services see one URL.
    assert services["balancer"].url == f"http://127.0.0.1:{p.gateway}"
    assert services["agent"].env["CRUCIBLE_AGENT_GATEWAY_URL"] == services["balancer"].url
    # Each engine on its own half of the cores, so two engines do not thrash each other.
    bind = [services[n].env["VLLM_CPU_OMP_THREADS_BIND"] for n in ("inference", "inference-2")]
    assert len(set(bind)) == 2
    metrics = {
        services[n].env["CRUCIBLE_FINETUNE_WORKER_METRICS_PORT"]
        for n in ("finetune-worker", "finetune-worker-2")
    }
    assert len(metrics) == 2
    # Every port distinct (a free-port stack too).
    for ports_ in (Ports(), Ports.free()):
        values = [getattr(ports_, f) for f in ports_.__dataclass_fields__]
        assert len(set(values)) == len(values)


def test_prometheus_scrapes_each_replica_under_its_job() -> None:
    ports = {f: getattr(Ports(), f) for f in Ports.__dataclass_fields__}
    jobs = {
        c["job_name"]: c["static_configs"][0]["targets"]
        for c in monitoring.native_config(ports, "5s", replicas=2)["scrape_configs"]
    }
    assert jobs["gateway"] == ["127.0.0.1:8090", "127.0.0.1:8091"]
    assert jobs["inference"] == ["127.0.0.1:8000", "127.0.0.1:8010"]
    assert jobs["finetune-worker"] == ["127.0.0.1:8012", "127.0.0.1:8015"]
    single = monitoring.native_config(ports, "5s")["scrape_configs"]
    assert {c["job_name"]: c["static_configs"][0]["targets"] for c in single}["gateway"] == [
        "127.0.0.1:8080"
    ]


def test_other_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="1 or 2"):
        StackConfig(replicas=3)

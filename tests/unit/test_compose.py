"""Compose and the native stack run the same commands with the same variables."""

import re
from pathlib import Path

import pytest
import yaml

from services.stack import StackConfig
from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# Variables only compose sets: secrets and the PostgreSQL URL (natively, SQLite is the default).
COMPOSE_ONLY = {
    "HF_TOKEN",
    "CRUCIBLE_INTERNAL_TOKEN",
    "CRUCIBLE_VAR_DIR",
    "CRUCIBLE_GATEWAY_DATABASE_URL",
    "CRUCIBLE_RETRIEVAL_DATABASE_URL",
    "CRUCIBLE_RETRIEVAL_MILVUS_TOKEN",
    "CRUCIBLE_FINETUNE_DATABASE_URL",
    "CRUCIBLE_AGENT_DATABASE_URL",
    "CRUCIBLE_AGENT_NATIVE_TOOL_MODELS",  # the GPU profiles' models; the dev model has none
    "VLLM_API_KEY",
    "CRUCIBLE_GATEWAY_INFERENCE_API_KEY",
    "CRUCIBLE_FINETUNE_INFERENCE_API_KEY",
    "REDISCLI_AUTH",
    "CRUCIBLE_TRACE_SAMPLE_RATIO",  # a lab under load may record fewer; natively every trace
    # Milvus standalone's graph index (the native engine has FLAT and IVF_FLAT only).
    "CRUCIBLE_RETRIEVAL_DENSE_INDEX",
    "CRUCIBLE_RETRIEVAL_HNSW_M",
    "CRUCIBLE_RETRIEVAL_HNSW_EF_CONSTRUCTION",
    "CRUCIBLE_RETRIEVAL_HNSW_EF",
    # The lab's prices, from compose's .env (natively, the caller's environment passes them).
    "CRUCIBLE_GATEWAY_BUDGET_PRICES",
    "CRUCIBLE_FINETUNE_COST_HARDWARE_USD",
    "CRUCIBLE_FINETUNE_COST_AMORTIZATION_YEARS",
    "CRUCIBLE_FINETUNE_COST_POWER_WATTS",
    "CRUCIBLE_FINETUNE_COST_KWH_USD",
    "CRUCIBLE_FINETUNE_COST_HOSTING_USD_MONTH",
    "CRUCIBLE_FINETUNE_COST_ENGINES",
    "CRUCIBLE_FINETUNE_COST_HOSTED_PRICES",
}


def test_each_native_service_runs_the_same_module_with_the_same_variables_in_compose() -> None:
    for svc in StackConfig().services():
        if svc.name == "traces":  # natively our OTLP sink, in compose Jaeger (test below)
            continue
        spec = COMPOSE["services"][svc.name]
        if svc.argv[0] == "redis-server":
            assert spec["command"][0] == "redis-server"
            assert "--appendonly" in spec["command"] and "--appendonly" in svc.argv
            continue
        if svc.name == "milvus":  # natively milvus-lite's server, in compose Milvus standalone
            assert spec["image"].startswith("milvusdb/milvus:")
            assert svc.argv[1:3] == ["-m", "services.milvuslite"]
            continue
        if svc.name == "prometheus":  # its own image; the same jobs (test below)
            assert spec["image"].startswith("prom/prometheus:")
            continue
        assert spec["command"][1:] == svc.argv[1:], svc.name  # argv[0] is the local python
        assert set(spec["environment"]) - COMPOSE_ONLY == set(svc.env), svc.name


def test_only_the_gateway_publishes_a_port() -> None:
    bindings = {name: spec.get("ports", []) for name, spec in COMPOSE["services"].items()}
    public = [
        n for n, ports in bindings.items() if any(not p.startswith("127.0.0.1:") for p in ports)
    ]
    assert public == ["gateway"]
    # Grafana is for ops on the host itself (or through an SSH tunnel), never the network.
    assert [n for n, ports in bindings.items() if ports and n != "gateway"] == ["grafana"]


def test_compose_prometheus_scrapes_what_the_native_one_does_and_more() -> None:
    from services.monitoring import JOBS

    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert set(JOBS) <= jobs
    assert {"redis", "postgres", "milvus", "gpu"} <= jobs  # compose's exporters
    mounts = COMPOSE["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in mounts


def test_stateful_services_keep_their_data_in_volumes() -> None:
    for name in (
        "redis",
        "postgres",
        "retrieval",
        "milvus",
        "etcd",
        "minio",
        "prometheus",
        "grafana",
    ):
        assert any(
            v.split(":")[0] in COMPOSE["volumes"] for v in COMPOSE["services"][name]["volumes"]
        )


def test_every_service_has_a_healthcheck_and_a_restart_policy() -> None:
    for name, spec in COMPOSE["services"].items():
        if "tools" in spec.get("profiles", []):  # one-shot commands, never left running
            continue
        assert spec.get("healthcheck", {}).get("test"), name
        assert spec.get("restart") == "unless-stopped", name


def test_images_are_pinned_to_a_version() -> None:
    images = [s["image"] for s in COMPOSE["services"].values() if "build" not in s]
    for dockerfile in (ROOT / "services").glob("*/Dockerfile"):
        images += [
            line.split()[1]
            for line in dockerfile.read_text().splitlines()
            if line.startswith("FROM ")
        ]
    assert len(images) >= 4
    for image in images:
        # A version tag (MinIO pins by immutable release date).
        assert re.search(r":(v?\d+\.\d+|RELEASE\.\d{4}-)", image) and ":latest" not in image, image


def test_inference_reserves_gpus_and_stays_on_the_internal_network() -> None:
    inference = COMPOSE["services"]["inference"]
    devices = inference["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "ports" not in inference
    assert COMPOSE["networks"]["backend"]["internal"] is True
    assert Path(ROOT / inference["build"]["dockerfile"]).exists()


def _holders(secret: str) -> set[str]:
    return {
        name
        for name, spec in COMPOSE["services"].items()
        if secret in str(spec.get("environment", {})) or secret in str(spec.get("command", ""))
    }


def test_redis_requires_a_password_that_only_its_clients_hold() -> None:
    redis = COMPOSE["services"]["redis"]
    assert "--requirepass" in redis["command"]
    assert _holders("${REDIS_PASSWORD") == {
        "redis",
        "gateway",
        "finetune",
        "finetune-worker",
        "redis-exporter",
    }
    for name in ("gateway", "finetune"):
        url = next(v for k, v in COMPOSE["services"][name]["environment"].items() if "REDIS" in k)
        assert url.startswith("redis://:${REDIS_PASSWORD:?")


def test_vllm_answers_only_the_gateway_and_fine_tuning() -> None:
    """The agent and retrieval reach models through the gateway, as a key; never vLLM itself."""
    assert _holders("${VLLM_API_KEY") == {"inference", "gateway", "finetune", "finetune-worker"}
    assert "VLLM_API_KEY" in COMPOSE["services"]["inference"]["environment"]


def test_the_backup_tool_sees_every_database_and_the_file_and_adapter_volumes() -> None:
    tool = COMPOSE["services"]["backup"]
    assert tool["profiles"] == ["tools"]
    for service in ("gateway", "retrieval", "finetune", "agent"):
        name = f"CRUCIBLE_{service.upper()}_DATABASE_URL"
        assert tool["environment"][name] == COMPOSE["services"][service]["environment"][name]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in tool["volumes"]}
    var = tool["environment"]["CRUCIBLE_VAR_DIR"]
    # Where retrieval and the worker keep them, seen from the tool's own var dir.
    assert mounts["retrieval-files"] == var and "retrieval-files:" + var in str(
        COMPOSE["services"]["retrieval"]["volumes"]
    )
    assert mounts["adapters"] == f"{var}/adapters"


def test_every_service_has_a_memory_limit() -> None:
    """One leaking or flooded service is stopped at its own limit (and restarted), instead of
    taking memory from the others: the engine, the database and the gateway share a host."""
    missing = [name for name, svc in COMPOSE["services"].items() if not svc.get("mem_limit")]
    assert not missing, f"no mem_limit: {missing}"
    for name, svc in COMPOSE["services"].items():
        limit = str(svc["mem_limit"])
        # A fixed size, or one the deployment may override from .env with a default.
        assert re.fullmatch(r"\d+[mg]|\$\{CRUCIBLE_\w+_MEM_LIMIT:-\d+[mg]\}", limit), (name, limit)


def test_every_service_sends_its_spans_to_jaeger_which_grafana_reads() -> None:
    """Compose's trace backend is Jaeger, pinned; each of our services (and vLLM) exports to its
    OTLP/HTTP port, as the native stack's services do to the sink; the Grafana data source that
    every dashboard panel links to is that Jaeger."""
    jaeger = COMPOSE["services"]["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/jaeger:2.")
    assert "receivers.otlp.protocols.http.endpoint=0.0.0.0:4318" in jaeger["command"]
    native = {s.name: s.env for s in StackConfig().services()}
    traced = [name for name, env in native.items() if "CRUCIBLE_OTLP_ENDPOINT" in env]
    assert {"gateway", "inference", "retrieval", "finetune", "agent", "eval-worker"} <= set(traced)
    for name in traced:
        env = COMPOSE["services"][name]["environment"]
        assert env["CRUCIBLE_OTLP_ENDPOINT"] == "http://jaeger:4318", name
    source = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/jaeger.yml").read_text()
    )["datasources"][0]
    assert (source["type"], source["url"]) == ("jaeger", "http://jaeger:16686")
    for board in (ROOT / "deploy/grafana/dashboards").glob("*.json"):
        for panel in yaml.safe_load(board.read_text())["panels"]:
            (link,) = panel["links"]
            assert link["url"].startswith("/explore?") and source["uid"] in link["url"], board


def test_the_lab_prices_compose_passes_parse_with_their_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unset price variable in compose's .env gives each service its default, not an error."""
    from services.finetune.config import FinetuneSettings
    from services.gateway.config import GatewaySettings

    default = re.compile(r"^\$\{(\w+):-(.*)\}$")  # `${NAME:-default}`, as compose reads it unset
    for service, settings in (("gateway", GatewaySettings), ("finetune", FinetuneSettings)):
        env = COMPOSE["services"][service]["environment"]
        prices = {k: v for k, v in env.items() if "_COST_" in k or k.endswith("BUDGET_PRICES")}
        assert prices, service
        for name, value in prices.items():
            found = default.match(value)
            assert found and found[1] == name, value
            monkeypatch.setenv(name, found[2])
        built = settings()
        assert built.model_dump(include={k.split("_", 2)[2].lower() for k in prices}) == {
            k.split("_", 2)[2].lower(): settings.model_fields[
                k.split("_", 2)[2].lower()
            ].get_default(call_default_factory=True)
            for k in prices
        }

"""deploy/k8s renders, validates against Kubernetes' own schemas (and the engines' resources
against the schemas the repo keeps for the fields it uses) and keeps the policies of
docs/kubernetes.md, without a cluster: `kubectl kustomize` never reaches an API server
(KUBECONFIG=/dev/null; the default API address would be the gateway's port)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
from functools import cache
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
ENGINES = K8S / "engines"
OVERLAYS = ("cpu-dev", "gpu-lab")
KUBERNETES = "1.32"  # the oldest minor the manifests are validated for
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
# The keys of the Secret an operator creates (docs/kubernetes.md): nothing else is referenced.
SECRET_KEYS = {
    "internal-token",
    "postgres-password",
    "redis-password",
    "vllm-api-key",
    "milvus-root-password",
}
# The engines' custom resources, each checked against the schema the repo keeps for it.
CUSTOM = {"Milvus": "milvus.schema.json", "Cluster": "postgres.schema.json"}
OPERATORS = ["cnpg-system", "milvus-operator", "monitoring"]


def kustomize(directory: str, *flags: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl renders deploy/k8s: install it (docs/kubernetes.md)"
    env = {**os.environ, "KUBECONFIG": os.devnull}
    out = subprocess.run(
        [kubectl, "kustomize", *flags, str(K8S / directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return kustomize(f"overlays/{overlay}")


@cache
def engines_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("engines_build", ENGINES / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _schema(name: str) -> dict[str, Any]:
    return json.loads((ENGINES / "schemas" / name).read_text())


def _kinds(overlay: str, *kinds: str) -> list[dict[str, Any]]:
    return [d for d in rendered(overlay) if d["kind"] in kinds]


def _containers(overlay: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(the service it runs, as compose names it; its pod; the container) of every workload."""
    return [
        (d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"], pod, c)
        for d in _kinds(overlay, "Deployment", "StatefulSet")
        for pod in [d["spec"]["template"]["spec"]]
        for c in pod["containers"]
    ]


def _endpoints(overlay: str) -> dict[str, Any]:
    (found,) = [
        c
        for c in _kinds(overlay, "ConfigMap")
        if c["metadata"]["name"].startswith("crucible-endpoints")
    ]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_its_schema(overlay: str) -> None:
    objects = rendered(overlay)
    kinds = {d["kind"] for d in objects}
    assert {
        "Deployment",
        "StatefulSet",
        "Service",
        "NetworkPolicy",
        "HorizontalPodAutoscaler",
    } <= kinds
    assert {"PodDisruptionBudget", "PersistentVolumeClaim", "ConfigMap", "Namespace"} <= kinds
    assert set(CUSTOM) <= kinds
    for d in objects:
        if d["kind"] in CUSTOM:
            jsonschema.validate(d, _schema(CUSTOM[d["kind"]]))
        else:
            kubernetes_validate.validate(d, KUBERNETES, strict=True)
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "crucible", (d["kind"], d["metadata"]["name"])
    # The checks have teeth: a misspelt field and a wrong type are refused.
    gateway = copy.deepcopy(next(d for d in objects if d["kind"] == "Deployment"))
    gateway["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, KUBERNETES, strict=True)
    del gateway["spec"]["replica"]
    gateway["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, KUBERNETES, strict=True)
    milvus = copy.deepcopy(next(d for d in objects if d["kind"] == "Milvus"))
    milvus["spec"]["components"]["queryNodes"] = {"replicas": 2}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(milvus, _schema("milvus.schema.json"))
    cluster = copy.deepcopy(next(d for d in objects if d["kind"] == "Cluster"))
    cluster["spec"]["instances"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cluster, _schema("postgres.schema.json"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_bounded_probed_pinned_and_unprivileged(overlay: str) -> None:
    containers = _containers(overlay)
    names = {name for name, _, _ in containers}
    assert names == {
        "gateway",
        "retrieval",
        "finetune",
        "finetune-worker",
        "eval-worker",
        "agent",
        "redis",
    }
    for name, pod, c in containers:
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][part]), (name, part)
        ready, live = c["readinessProbe"], c["livenessProbe"]
        if name == "redis":
            assert ready["exec"]["command"] == live["exec"]["command"] == ["redis-cli", "ping"]
        else:
            assert ready["httpGet"]["path"] in ("/ready", "/metrics"), name
            assert live["httpGet"]["path"] in ("/health", "/metrics"), name
        image = c["image"]
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+(-\w+)?", image) or "@sha256:" in image, image
        sc, psc = c["securityContext"], pod["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"], name
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc.get("privileged"), name
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), name


def test_gpus_are_asked_for_only_where_training_runs() -> None:
    wants = [
        (overlay, name, pod.get("nodeSelector"))
        for overlay in OVERLAYS
        for name, pod, c in _containers(overlay)
        if "nvidia.com/gpu" in c["resources"]["limits"]
    ]
    assert [(o, n) for o, n, _ in wants] == [("gpu-lab", "finetune-worker")] * 2
    assert len({json.dumps(selector) for _, _, selector in wants if selector}) == 2


def test_each_gpu_class_has_its_workers_on_the_queue_the_api_sends_its_models_to() -> None:
    from services.finetune.config import FinetuneSettings

    deployments = _kinds("gpu-lab", "Deployment")
    workers = [d for d in deployments if d["metadata"]["name"].startswith("finetune-worker")]
    selectors = {json.dumps(w["spec"]["selector"], sort_keys=True) for w in workers}
    assert len(workers) == len(selectors) == 2  # no class's Deployment takes another's pods
    queues = {
        e["value"]
        for w in workers
        for e in w["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"] == "CRUCIBLE_FINETUNE_QUEUE"
    }
    (api,) = [d for d in deployments if d["metadata"]["name"] == "finetune"]
    env = {
        e["name"]: e.get("value") for e in api["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    routed = FinetuneSettings(queue_by_model=json.loads(env["CRUCIBLE_FINETUNE_QUEUE_BY_MODEL"]))
    assert set(routed.queues()) == queues and len(queues) == 2
    assert routed.queue_for("qwen3-32b") != routed.queue_for("crucible-dev")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_takes_traffic_from_outside(overlay: str) -> None:
    for svc in _kinds(overlay, "Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
    for milvus in _kinds(overlay, "Milvus"):
        assert (
            milvus["spec"]["components"].get("proxy", {}).get("serviceType", "ClusterIP")
            == "ClusterIP"
        )
    policies = {p["metadata"]["name"]: p["spec"] for p in _kinds(overlay, "NetworkPolicy")}
    deny = policies["default-deny-ingress"]
    assert deny["podSelector"] == {} and "ingress" not in deny  # everything, unless allowed
    inside = {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "crucible"}}}
    namespace: dict[str, Any] = {"podSelector": {}}
    monitoring = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }
    operators = {
        "namespaceSelector": {
            "matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": OPERATORS}
            ]
        }
    }
    for name, spec in policies.items():
        for rule in spec.get("ingress", []):
            if "from" not in rule:  # from anywhere: the gateway's port only
                assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "gateway"}}
                assert rule["ports"] == [{"port": 8080, "protocol": "TCP"}], name
                continue
            for peer in rule["from"]:
                assert peer in (inside, namespace, monitoring, operators), (name, peer)
    # The policies select Crucible's pods by the label every pod template carries.
    for d in _kinds(overlay, "Deployment", "StatefulSet"):
        assert (
            d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "crucible"
        )


# What compose sets that Kubernetes leaves to defaults or to optional ConfigMaps.
NOT_IN_K8S_ENV = re.compile(
    r"CRUCIBLE_(TRACE_SAMPLE_RATIO|FINETUNE_COST_\w+|AGENT_NATIVE_TOOL_MODELS)"
)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_runs_what_compose_runs_with_the_same_variables(overlay: str) -> None:
    endpoints = _endpoints(overlay)["data"]
    for name, _, c in _containers(overlay):
        spec = COMPOSE["services"][name]
        assert c["image"] == spec["image"], name
        if name == "redis":  # the same server and persistence, its password from the Secret
            assert "--appendonly yes" in c["command"][-1] and "--requirepass" in c["command"][-1]
            continue
        assert c["command"] == spec["command"], name
        ours = {e["name"] for e in c["env"]} | set(endpoints)
        theirs = {k for k in spec["environment"] if not NOT_IN_K8S_ENV.fullmatch(k)}
        if name == "finetune-worker":  # compose's worker shares the API's variables, its port too
            theirs -= {"CRUCIBLE_FINETUNE_HOST", "CRUCIBLE_FINETUNE_PORT"}
        assert theirs - ours == set(), name
        k8s_only = {
            "CRUCIBLE_VAR_DIR",
            "CRUCIBLE_FINETUNE_QUEUE",
            "CRUCIBLE_FINETUNE_QUEUE_BY_MODEL",
        }
        assert {k for k in ours - theirs if k.startswith("CRUCIBLE_")} <= k8s_only, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_variable_references_and_secrets_resolve(overlay: str) -> None:
    endpoints = _endpoints(overlay)
    for name, _, c in _containers(overlay):
        defined: set[str] = set()
        for source in c.get("envFrom", []):
            ref = source["configMapRef"]
            if ref["name"] == endpoints["metadata"]["name"]:  # the hashed name kustomize wrote
                defined |= set(endpoints["data"])
            else:
                assert ref.get("optional") is True, f"{name}: {ref['name']} is not made here"
        assert name == "redis" or defined, f"{name} does not read crucible-endpoints"
        for e in c["env"]:
            for ref in re.findall(r"\$\((\w+)\)", e.get("value", "")):
                assert ref in defined, f"{name}: {e['name']} uses $({ref}) before it is defined"
            source = e.get("valueFrom", {})
            if "secretKeyRef" in source:
                secret = source["secretKeyRef"]
                assert secret["name"] == "crucible-secrets" and secret["key"] in SECRET_KEYS
            elif "configMapKeyRef" in source:
                assert source["configMapKeyRef"]["optional"] is True
            defined.add(e["name"])
    for milvus in _kinds(overlay, "Milvus"):  # its root password: the one retrieval signs in with
        (env,) = milvus["spec"]["components"]["env"]
        assert env["valueFrom"]["secretKeyRef"] == {
            "name": "crucible-secrets",
            "key": "milvus-root-password",
        }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_engines_values_are_the_launch_profiles_for_production_stacks_chart(
    overlay: str,
) -> None:
    build = engines_build()
    on_disk = build.path(overlay).read_text()
    assert on_disk == build.render(overlay), "run: python deploy/k8s/engines/build.py"
    values = yaml.safe_load(on_disk)
    jsonschema.validate(values, _schema("vllm-stack.values.schema.json"))
    # The gateway and fine-tuning reach each engine's own Service (the chart's router is off).
    assert values["routerSpec"] == {"enableRouter": False}
    urls = json.loads(_endpoints(overlay)["data"]["INFERENCE_URLS"])
    assert urls == build.inference_urls(overlay) and urls
    engine = values["servingEngineSpec"]
    assert engine["vllmApiKey"] == {"secretName": "crucible-secrets", "secretKey": "vllm-api-key"}
    # What the chart puts into the engine's pod, as Kubernetes would take it: non-root under the
    # namespace's restricted policy, the models and the adapters mounted where the workers
    # write them, the profile's flags after the chart's own.
    for spec in engine["modelSpec"]:
        pod: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": spec["name"]},
            "spec": {
                "securityContext": engine["securityContext"],
                "volumes": spec["extraVolumes"],
                "containers": [
                    {
                        "name": "vllm",
                        "image": f"{spec['repository']}:{spec['tag']}",
                        "args": spec["vllmConfig"]["extraArgs"],
                        "env": spec["env"],
                        "volumeMounts": spec["extraVolumeMounts"],
                        "securityContext": engine["containerSecurityContext"],
                    }
                ],
            },
        }
        if "nodeSelectorTerms" in spec:
            terms = {"nodeSelectorTerms": spec["nodeSelectorTerms"]}
            affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": terms}}
            pod["spec"]["affinity"] = affinity
        kubernetes_validate.validate(pod, KUBERNETES, strict=True)
        assert engine["securityContext"]["runAsNonRoot"] is True
        assert engine["containerSecurityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"]: m["name"] for m in spec["extraVolumeMounts"]}
        assert mounts == {"/models": "models", "/var/lib/crucible/adapters": "adapters"}
        args = spec["vllmConfig"]["extraArgs"]
        assert args[:2] == ["--served-model-name", spec["name"]] and "--enable-lora" in args
    gpu = [s for s in engine["modelSpec"] if s.get("requestGPU")]
    assert bool(gpu) == (overlay == "gpu-lab")


def test_monitoring_carries_composes_rules_and_dashboards_and_scrapes_the_same_jobs() -> None:
    from services.monitoring import JOBS

    objects = kustomize("monitoring", "--load-restrictor", "LoadRestrictionsNone")
    for d in objects:
        kubernetes_validate.validate(d, KUBERNETES, strict=True)
    maps = {
        d["metadata"]["name"].rsplit("-", 1)[0]: d["data"]
        for d in objects
        if d["kind"] == "ConfigMap"
    }
    prom = ROOT / "deploy" / "prometheus"
    config = maps["prometheus-config"]
    for rules in ("alerts.yml", "gpu-alerts.yml"):
        assert config[rules] == (prom / rules).read_text()
    dashboards = ROOT / "deploy" / "grafana" / "dashboards"
    assert maps["grafana-dashboards"] == {f.name: f.read_text() for f in dashboards.glob("*.json")}
    # The jobs: the crucible job relabels each pod's name into `job`, as compose names them.
    scrape = yaml.safe_load(config["prometheus.yml"])["scrape_configs"]
    names = {job["job_name"] for job in scrape}
    (crucible,) = [job for job in scrape if job["job_name"] == "crucible"]
    pods = next(
        r["regex"]
        for r in crucible["relabel_configs"]
        if "app_kubernetes_io_name" in r["source_labels"][0]
    )
    relabelled = set(pods.split("|"))
    assert (names - {"crucible"}) | relabelled == set(JOBS)
    # The data sources keep the uids every dashboard panel names.
    sources = yaml.safe_load(maps["grafana-datasources"]["crucible.yml"])["datasources"]
    assert {d["uid"] for d in sources} == {"crucible-prometheus", "crucible-jaeger"}
    for _, pod, c in [
        (d["metadata"]["name"], d["spec"]["template"]["spec"], c)
        for d in objects
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    ]:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"cpu", "memory"} <= set(c["resources"]["limits"])
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", c["image"]), c["image"]

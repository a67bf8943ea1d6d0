"""deploy/k8s renders, validates against Kubernetes' own schemas and keeps the policies of
docs/kubernetes.md, without a cluster: `kubectl kustomize` never reaches an API server
(KUBECONFIG=/dev/null; the default API address would be the gateway's port)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from functools import cache
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu-dev", "gpu-lab")
KUBERNETES = "1.32"  # the oldest minor the manifests are validated for
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
# The keys of the Secret an operator creates (docs/kubernetes.md): nothing else is referenced.
SECRET_KEYS = {
    "internal-token",
    "postgres-password",
    "redis-password",
    "vllm-api-key",
    "milvus-token",
}


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render deploy/k8s (scripts/setup.sh installs it)"
    env = {**os.environ, "KUBECONFIG": os.devnull}
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def _kinds(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in rendered(overlay) if d["kind"] == kind]


def _containers(overlay: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"]["spec"], c)
        for d in _kinds(overlay, "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    objects = rendered(overlay)
    kinds = {d["kind"] for d in objects}
    assert {"Deployment", "Service", "NetworkPolicy", "HorizontalPodAutoscaler"} <= kinds
    assert {"PodDisruptionBudget", "PersistentVolumeClaim", "ConfigMap", "Namespace"} <= kinds
    for d in objects:
        kubernetes_validate.validate(d, KUBERNETES, strict=True)
    # The check has teeth: a misspelt field and a wrong type are refused.
    gateway = copy.deepcopy(next(d for d in objects if d["kind"] == "Deployment"))
    gateway["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, KUBERNETES, strict=True)
    del gateway["spec"]["replica"]
    gateway["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, KUBERNETES, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_bounded_probed_pinned_and_unprivileged(overlay: str) -> None:
    containers = _containers(overlay)
    names = {name for name, _, _ in containers}
    assert names == {"gateway", "retrieval", "finetune", "finetune-worker", "eval-worker", "agent"}
    for name, pod, c in containers:
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][part]), (name, part)
        assert c["readinessProbe"]["httpGet"]["path"] in ("/ready", "/metrics"), name
        assert c["livenessProbe"]["httpGet"]["path"] in ("/health", "/metrics"), name
        image = c["image"]
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+", image) or "@sha256:" in image, image
        sc, psc = c["securityContext"], pod["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"], name
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc.get("privileged"), name
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), name


def test_gpus_are_asked_for_only_where_training_runs() -> None:
    wants = {
        (overlay, name): "nvidia.com/gpu" in c["resources"]["limits"]
        for overlay in OVERLAYS
        for name, _, c in _containers(overlay)
    }
    assert {k for k, v in wants.items() if v} == {("gpu-lab", "finetune-worker")}
    (worker,) = [
        d for d in _kinds("gpu-lab", "Deployment") if d["metadata"]["name"] == "finetune-worker"
    ]
    assert worker["spec"]["template"]["spec"]["nodeSelector"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_takes_traffic_from_outside(overlay: str) -> None:
    for svc in _kinds(overlay, "Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
    policies = {p["metadata"]["name"]: p["spec"] for p in _kinds(overlay, "NetworkPolicy")}
    deny = policies["default-deny-ingress"]
    assert deny["podSelector"] == {} and "ingress" not in deny  # everything, unless allowed
    for name, spec in policies.items():
        for rule in spec.get("ingress", []):
            if "from" not in rule:  # from anywhere: the gateway's port only
                assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "gateway"}}
                assert rule["ports"] == [{"port": 8080, "protocol": "TCP"}], name
                continue
            for peer in rule["from"]:
                inside = (
                    peer.get("podSelector")
                    == {"matchLabels": {"app.kubernetes.io/part-of": "crucible"}}
                    and "namespaceSelector" not in peer
                )
                monitoring = peer.get("namespaceSelector") == {
                    "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                }
                assert inside or monitoring, (name, peer)
    # The policies select pods by the label every pod template carries.
    for d in _kinds(overlay, "Deployment"):
        assert (
            d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "crucible"
        )


# What compose sets that Kubernetes leaves to defaults or to optional ConfigMaps.
NOT_IN_K8S_ENV = re.compile(
    r"CRUCIBLE_(TRACE_SAMPLE_RATIO|FINETUNE_COST_\w+|AGENT_NATIVE_TOOL_MODELS)"
)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_runs_what_compose_runs_with_the_same_variables(overlay: str) -> None:
    endpoints = next(
        c["data"]
        for c in _kinds(overlay, "ConfigMap")
        if c["metadata"]["name"].startswith("crucible-endpoints")
    )
    for name, _, c in _containers(overlay):
        spec = COMPOSE["services"][name]
        assert c["command"] == spec["command"], name
        assert c["image"] == spec["image"], name
        ours = {e["name"] for e in c["env"]} | set(endpoints)
        theirs = {k for k in spec["environment"] if not NOT_IN_K8S_ENV.fullmatch(k)}
        if name == "finetune-worker":  # compose's worker shares the API's variables, its port too
            theirs -= {"CRUCIBLE_FINETUNE_HOST", "CRUCIBLE_FINETUNE_PORT"}
        assert theirs - ours == set(), name
        assert {k for k in ours - theirs if k.startswith("CRUCIBLE_")} <= {"CRUCIBLE_VAR_DIR"}, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_variable_references_and_secrets_resolve(overlay: str) -> None:
    endpoints = next(
        c
        for c in _kinds(overlay, "ConfigMap")
        if c["metadata"]["name"].startswith("crucible-endpoints")
    )
    for name, _, c in _containers(overlay):
        refs = [r["configMapRef"]["name"] for r in c["envFrom"]]
        assert endpoints["metadata"]["name"] in refs, name  # the hashed name kustomize wrote
        defined = set(endpoints["data"])
        for e in c["env"]:
            for ref in re.findall(r"\$\((\w+)\)", e.get("value", "")):
                assert ref in defined, f"{name}: {e['name']} uses $({ref}) before it is defined"
            secret = e.get("valueFrom", {}).get("secretKeyRef")
            if secret:
                assert secret["name"] == "crucible-secrets" and secret["key"] in SECRET_KEYS
            defined.add(e["name"])

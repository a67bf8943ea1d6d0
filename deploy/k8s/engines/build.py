"""Writes the vLLM engines' values for production-stack's Helm chart (vllm-stack), one file per
overlay, from the same launch profiles `make up` and compose run (deploy/inference/):

    python deploy/k8s/engines/build.py

Each engine is a `modelSpec` entry, so the chart makes it a Service of its own
(`<release>-<name>-engine-service`), and the chart's router is off: Crucible's gateway is the
router (fewest outstanding requests, failover before the first byte), and the fine-tuning
service loads each adapter into every engine, which it can only do by addressing each one.
The overlay's `crucible-endpoints` names the same Services (tests/unit/test_kubernetes.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from services.inference import profiles  # noqa: E402

RELEASE = "vllm"  # helm install vllm vllm/vllm-stack -n crucible -f <values>
CHART = "vllm-stack 0.1.12"  # production-stack's chart these values are written for
ADAPTERS = "/var/lib/crucible/adapters"  # where the workers write them (the finetune service)
NON_ROOT = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}

# overlay -> its engines: (profile, image, replicas, resources, node selector terms).
ENGINES: dict[str, list[dict[str, Any]]] = {
    "gpu-lab": [
        {
            "profile": "gpu-single",
            "image": ("vllm/vllm-openai", "v0.32.0"),
            "resources": {
                "requestCPU": 8,
                "requestMemory": "64Gi",
                "limitCPU": 16,
                # Weights pass through host memory while loading (compose: 96g).
                "limitMemory": "96Gi",
                "requestGPU": 1,
                "shmSize": "16Gi",
            },
            # The RTX Pro 6000's nodes: the value GPU feature discovery gives them
            # (`kubectl get nodes -L nvidia.com/gpu.product`).
            "gpu_product": "NVIDIA-RTX-PRO-6000-Blackwell-Workstation-Edition",
        }
    ],
    "cpu-dev": [
        {
            "profile": "cpu-dev",
            "image": ("public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo", "v0.32.0"),
            "resources": {
                "requestCPU": 2,
                "requestMemory": "4Gi",
                "limitCPU": 4,
                "limitMemory": "8Gi",
                "shmSize": "1Gi",
            },
        }
    ],
}


def engine_service(name: str) -> str:
    """The Service the chart makes for a modelSpec entry (its `service-vllm.yaml`)."""
    return f"{RELEASE}-{name}-engine-service"


def _model_spec(engine: dict[str, Any]) -> dict[str, Any]:
    profile = profiles.load(engine["profile"])
    flags = dict(profile.vllm)
    # The chart writes --no-enable-prefix-caching unless vllmConfig says otherwise.
    prefix_caching = bool(flags.pop("enable-prefix-caching", False))
    args = ["--served-model-name", profile.served_model_name]
    for key, value in flags.items():
        args += profiles._flag(key, value)
    repository, tag = engine["image"]
    env = [{"name": k, "value": v} for k, v in profile.env.items()]
    # The image's HOME is root's: a non-root engine keeps its caches (compiled kernels) here.
    env.append({"name": "HOME", "value": "/tmp/vllm"})
    spec: dict[str, Any] = {
        "name": profile.served_model_name,
        "repository": repository,
        "tag": tag,
        "modelURL": f"/models/{profile.model}",
        "replicaCount": 1,  # one engine per entry: the gateway reaches each (module docstring)
        **engine["resources"],
        "env": env,
        "vllmConfig": {"enablePrefixCaching": prefix_caching, "extraArgs": args},
        "extraVolumes": [
            {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
            {"name": "adapters", "persistentVolumeClaim": {"claimName": "adapters", "readOnly": True}},
        ],
        "extraVolumeMounts": [
            {"name": "models", "mountPath": "/models", "readOnly": True},
            {"name": "adapters", "mountPath": ADAPTERS, "readOnly": True},
        ],
    }
    if "gpu_product" in engine:
        spec["nodeSelectorTerms"] = [
            {
                "matchExpressions": [
                    {
                        "key": "nvidia.com/gpu.product",
                        "operator": "In",
                        "values": [engine["gpu_product"]],
                    }
                ]
            }
        ]
    return spec


def values(overlay: str) -> dict[str, Any]:
    gpu = overlay != "cpu-dev"
    return {
        "servingEngineSpec": {
            "enableEngine": True,
            "runtimeClassName": "nvidia" if gpu else "",
            "vllmApiKey": {"secretName": "crucible-secrets", "secretKey": "vllm-api-key"},
            "securityContext": NON_ROOT,
            "containerSecurityContext": CONTAINER,
            "modelSpec": [_model_spec(e) for e in ENGINES[overlay]],
        },
        "routerSpec": {"enableRouter": False},
    }


def inference_urls(overlay: str) -> list[str]:
    """What the overlay's crucible-endpoints must name: every engine's Service."""
    return [
        f"http://{engine_service(profiles.load(e['profile']).served_model_name)}:80"
        for e in ENGINES[overlay]
    ]


def render(overlay: str) -> str:
    head = (
        f"# production-stack's {CHART} values for the {overlay} overlay, written by\n"
        "# deploy/k8s/engines/build.py from deploy/inference/ (edit those, then run it):\n"
        f"#   helm install {RELEASE} vllm/vllm-stack -n crucible -f {path(overlay).name}\n"
    )
    return head + yaml.safe_dump(values(overlay), sort_keys=False, width=100)


def path(overlay: str) -> Path:
    return HERE / f"vllm-{overlay}.values.yaml"


def main() -> None:
    for overlay in ENGINES:
        path(overlay).write_text(render(overlay))
        print(f"wrote {path(overlay)}")


if __name__ == "__main__":
    main()

"""Launch profiles (`deploy/inference/*.yaml`) and the vLLM command each one turns into.

This module runs inside the vLLM image too, so it needs only the standard library and PyYAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROFILES_DIR = ROOT / "deploy" / "inference"
DEFAULT_MODELS_DIR = ROOT / "var" / "models"


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    model: str
    served_model_name: str
    device: str
    vllm: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    gpus: tuple[int, ...] = ()
    # The kind of each GPU in `gpus` (the planner's names: 5090, pro6000, h100, h200).
    gpu_models: tuple[str, ...] = ()
    source: str | None = None

    def model_path(self, models_dir: Path) -> Path:
        path = Path(self.model)
        return path if path.is_absolute() else models_dir / path

    def command(
        self, python: str, *, host: str, port: int, models_dir: Path, extra: list[str] | None = None
    ) -> list[str]:
        """The argv that starts vLLM's OpenAI server for this profile."""
        argv = [python, "-m", "vllm.entrypoints.openai.api_server"]
        argv += ["--model", str(self.model_path(models_dir))]
        argv += ["--served-model-name", self.served_model_name]
        argv += ["--host", host, "--port", str(port)]
        for key, value in self.vllm.items():
            argv += _flag(key, value)
        return argv + list(extra or [])

    def environment(self) -> dict[str, str]:
        env = dict(self.env)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.gpus)
        return env


def _flag(key: str, value: Any) -> list[str]:
    opt = f"--{key}"
    if value is True:
        return [opt]
    if value is False or value is None:
        return []
    if isinstance(value, list):
        return [opt, *(str(v) for v in value)]
    if isinstance(value, dict):
        import json

        return [opt, json.dumps(value, separators=(",", ":"))]
    return [opt, str(value)]


_KNOWN = {
    "description",
    "model",
    "served_model_name",
    "device",
    "vllm",
    "env",
    "gpus",
    "gpu_models",
    "source",
}


def load(name: str, directory: Path = PROFILES_DIR) -> Profile:
    path = directory / f"{name}.yaml"
    if not path.is_file():
        raise ProfileError(f"no profile {name!r}; known: {', '.join(available(directory))}")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - _KNOWN
    if unknown:
        raise ProfileError(f"{path.name}: unknown keys {sorted(unknown)}")
    for key in ("model", "served_model_name", "device"):
        if not data.get(key):
            raise ProfileError(f"{path.name}: {key} is required")
    if data["device"] not in ("cpu", "cuda"):
        raise ProfileError(f"{path.name}: device must be cpu or cuda")
    if data.get("gpu_models") and len(data["gpu_models"]) != len(data.get("gpus") or ()):
        raise ProfileError(f"{path.name}: gpu_models must name each of gpus")
    return Profile(
        name=name,
        description=data.get("description", ""),
        model=str(data["model"]),
        served_model_name=str(data["served_model_name"]),
        device=data["device"],
        vllm=dict(data.get("vllm") or {}),
        env={k: str(v) for k, v in (data.get("env") or {}).items()},
        gpus=tuple(int(g) for g in data.get("gpus") or ()),
        gpu_models=tuple(str(g) for g in data.get("gpu_models") or ()),
        source=data.get("source"),
    )


def available(directory: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))

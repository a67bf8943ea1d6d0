"""Fine-tuned adapters: admission checks, loading into vLLM, and serving them again after a
vLLM restart. vLLM's LoRA routes are internal: the gateway never forwards them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx

from services.finetune.jobs import AdapterRow, JobStore

log = logging.getLogger("crucible.finetune.adapters")


def model_id(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's shape, as DESIGN.md names it: ft:<base-model>:<suffix>:<job-id>."""
    return f"ft:{base}:{suffix or ''}:{job_id}"


def admission_problems(
    adapter_dir: Path, base_model: str, served: set[str], max_rank: int, supported: list[str]
) -> list[str]:
    """Why vLLM would refuse (or crash on) this adapter; empty when it can be served."""
    problems = []
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if base_model not in served:
        problems.append(f"base model {base_model!r} is not the one served ({sorted(served)})")
    if int(config.get("r", 0)) > max_rank:
        problems.append(f"LoRA rank {config.get('r')} exceeds the server's maximum {max_rank}")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    unsupported = sorted(set(targets) - set(supported))
    if unsupported:
        problems.append(f"target modules not supported by the server: {unsupported}")
    if not (adapter_dir / "adapter_model.safetensors").exists():
        problems.append("the adapter weights are missing")
    return problems


Headers = dict[str, str]  # vLLM's API key, where it has one (FinetuneSettings.inference_headers)


def served_models(url: str, headers: Headers, timeout: float = 5.0) -> set[str]:
    r = httpx.get(f"{url}/v1/models", headers=headers, timeout=timeout)
    r.raise_for_status()
    return {m["id"] for m in r.json()["data"]}


def base_models(url: str, headers: Headers, timeout: float = 5.0) -> set[str]:
    """The base models a server serves (adapters name their parent in `parent`)."""
    r = httpx.get(f"{url}/v1/models", headers=headers, timeout=timeout)
    r.raise_for_status()
    return {m["id"] for m in r.json()["data"] if not m.get("parent")}


def load(url: str, headers: Headers, name: str, path: Path, timeout: float = 60.0) -> None:
    r = httpx.post(
        f"{url}/v1/load_lora_adapter",
        headers=headers,
        json={"lora_name": name, "lora_path": str(path)},
        timeout=timeout,
    )
    if r.status_code != 200 and "already" not in r.text:
        raise RuntimeError(f"vLLM refused adapter {name}: {r.status_code} {r.text[:300]}")


def restore(store: JobStore, urls: list[str], headers: Headers) -> int:
    """Load every registered adapter a server lacks (it restarted); returns how many."""
    adapters = store.adapters()
    loaded = 0
    for url in urls:
        try:
            present = served_models(url, headers)
        except httpx.HTTPError:
            continue  # that server is down; the next round tries again
        for a in adapters:
            if a.model not in present and a.base_model in present:
                try:
                    load(url, headers, a.model, Path(a.path))
                    loaded += 1
                except (httpx.HTTPError, RuntimeError) as exc:
                    log.warning(
                        "adapter not restored", extra={"model": a.model, "error": str(exc)[:200]}
                    )
    return loaded


def register(store: JobStore, row: AdapterRow, urls: list[str], headers: Headers) -> list[str]:
    """Record the adapter (so restarts restore it) and load it everywhere it can be served;
    returns the servers that could not take it now (the reconciler retries them)."""
    store.register_adapter(row)
    failed = []
    for url in urls:
        try:
            load(url, headers, row.model, Path(row.path))
        except (httpx.HTTPError, RuntimeError) as exc:
            log.warning("adapter not loaded", extra={"model": row.model, "error": str(exc)[:200]})
            failed.append(url)
    return failed

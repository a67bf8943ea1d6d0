"""Fine-tuned adapters: admission checks, loading into vLLM, and serving them again after a
vLLM restart. vLLM's LoRA routes are internal: the gateway never forwards them."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import httpx

from services.common.errors import Conflict, NotFound, QuotaExceeded
from services.finetune.jobs import AdapterRow, JobStore

log = logging.getLogger("crucible.finetune.adapters")
PREFIX = "ft:"
# Jobs whose output nobody can use again: their directories (checkpoints) are removed.
ENDED = ("failed", "cancelled")


def model_id(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's shape, as DESIGN.md names it: ft:<base-model>:<suffix>:<job-id>."""
    return f"{PREFIX}{base}:{suffix or ''}:{job_id}"


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


def _cards(url: str, headers: Headers, timeout: float = 5.0) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/v1/models", headers=headers, timeout=timeout)
    r.raise_for_status()
    cards: list[dict[str, Any]] = r.json()["data"]
    return cards


def served_models(url: str, headers: Headers, timeout: float = 5.0) -> set[str]:
    return {m["id"] for m in _cards(url, headers, timeout)}


def base_models(url: str, headers: Headers, timeout: float = 5.0) -> set[str]:
    """The base models a server serves (adapters name their parent in `parent`)."""
    return {m["id"] for m in _cards(url, headers, timeout) if not m.get("parent")}


def load(url: str, headers: Headers, name: str, path: Path, timeout: float = 60.0) -> None:
    r = httpx.post(
        f"{url}/v1/load_lora_adapter",
        headers=headers,
        json={"lora_name": name, "lora_path": str(path)},
        timeout=timeout,
    )
    if r.status_code != 200 and "already" not in r.text:
        raise RuntimeError(f"vLLM refused adapter {name}: {r.status_code} {r.text[:300]}")


def unload(url: str, headers: Headers, name: str, timeout: float = 30.0) -> None:
    r = httpx.post(
        f"{url}/v1/unload_lora_adapter", headers=headers, json={"lora_name": name}, timeout=timeout
    )
    if r.status_code not in (200, 404):  # 404: that server no longer has it
        raise RuntimeError(f"vLLM did not unload adapter {name}: {r.status_code} {r.text[:300]}")


def restore(store: JobStore, urls: list[str], headers: Headers) -> int:
    """Load every registered adapter a server lacks (it restarted), and unload the ones no
    longer registered (retired while that server was unreachable); returns how many loaded."""
    cards = {}
    for url in urls:
        try:
            cards[url] = _cards(url, headers)
        except httpx.HTTPError:
            continue  # that server is down; the next round tries again
    # Read after the servers' lists: an adapter is registered before it is loaded anywhere, so
    # one seen loaded above is already here unless it was retired.
    adapters = store.adapters()
    registered = {a.model for a in adapters}
    loaded = 0
    for url, served in cards.items():
        present = {c["id"] for c in served}
        for c in served:
            if c.get("parent") and c["id"].startswith(PREFIX) and c["id"] not in registered:
                try:
                    unload(url, headers, c["id"])
                    log.info("retired adapter unloaded", extra={"model": c["id"]})
                except (httpx.HTTPError, RuntimeError) as exc:
                    log.warning("adapter not unloaded", extra={"error": str(exc)[:200]})
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


def retire(
    store: JobStore,
    routes: list[dict[str, Any]],
    adapters_dir: Path,
    urls: list[str],
    headers: Headers,
    owner: str,
    model: str,
) -> None:
    """Stop serving the owner's fine-tuned model everywhere and delete its files (the job's
    directory: adapter and checkpoints). `routes` is every alias's current routing: a model an
    alias still routes to is not retired (409), or that alias would send requests nowhere."""
    row = store.adapter(model)
    if row is None or row.owner != owner:
        raise NotFound(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    routing = sorted(
        a["name"] if a["owner"] == owner else "(an alias of another owner)"
        for a in routes
        if any(r["model"] == model for r in a["routes"])
    )
    if routing:
        raise Conflict(
            f"model aliases route to {model}: {', '.join(routing)}; route them elsewhere first",
            param="model",
        )
    if store.delete_adapter(model):  # first: the reconciler must not load it again
        for url in urls:
            try:
                unload(url, headers, model)
            except (httpx.HTTPError, RuntimeError) as exc:  # the reconciler unloads it later
                log.warning("adapter not unloaded", extra={"error": str(exc)[:200]})
    shutil.rmtree(adapters_dir / row.job_id, ignore_errors=True)
    log.info("adapter retired", extra={"model": model})


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # removed meanwhile
                continue
    return total


def check_quota(store: JobStore, adapters_dir: Path, owner: str, quota: int) -> None:
    """429 `insufficient_quota` when the owner's fine-tuning output (adapters and checkpoints
    of every job) has reached its quota; deleting models makes room."""
    used = sum(tree_bytes(adapters_dir / job_id) for job_id in store.job_ids(owner))
    if used >= quota:
        raise QuotaExceeded(
            f"the fine-tuned models and checkpoints of this owner use {used:,} of {quota:,} "
            "bytes; delete models you no longer need (DELETE /v1/models/{model})"
        )


def sweep(store: JobStore, adapters_dir: Path) -> int:
    """Remove the directories of jobs that failed or were cancelled (their checkpoints can no
    longer be resumed or served); returns how many."""
    if not adapters_dir.is_dir():
        return 0
    present = {p.name for p in adapters_dir.iterdir() if p.is_dir()}
    if not present:
        return 0
    ended = store.job_ids(statuses=ENDED, among=sorted(present))
    for job_id in ended:
        shutil.rmtree(adapters_dir / job_id, ignore_errors=True)
    return len(ended)

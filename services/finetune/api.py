"""/v1/fine_tuning/jobs: OpenAI's request and response shapes, plus Crucible's `crucible` extras."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from services.common import tracing
from services.common.errors import Conflict, InvalidRequest, NotFound
from services.common.pagination import Cursor, PageParams
from services.common.tenancy import Owner, internal_only
from services.finetune import adapters
from services.finetune.files import FilesUnavailable, file_info, file_text
from services.finetune.handoff import HandoffRow, Promote, check_promote
from services.finetune.jobs import JobRow, JobStore, job_object, new_job_id
from services.finetune.remote import KEY_ID_HEADER
from services.finetune.training import ALL_LINEAR, auto_epochs, example_limit, load_tokenizer
from services.finetune.validation import TrainingFileError, check_lengths, parse_numbered

log = logging.getLogger("crucible.finetune")

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Annotated[int, Field(ge=1, le=500)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] | Auto = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=1000)] | Auto = "auto"


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised"]
    supervised: Supervised = Field(default_factory=Supervised)


class LoraOptions(BaseModel):
    """Crucible's own extras (`extra_body={"crucible": {...}}` with the openai SDK)."""

    model_config = ConfigDict(extra="forbid")
    lora_rank: Annotated[int, Field(ge=1, le=256)] = 16
    lora_alpha: Annotated[int, Field(ge=1, le=1024)] = 32
    target_modules: list[StrictStr] = Field(default_factory=lambda: list(ALL_LINEAR))
    # 4bit: QLoRA (bitsandbytes NF4); auto: 4-bit where a GPU is present.
    quantize: Literal["auto", "4bit", "none"] = "auto"
    checkpoint_every: Annotated[int, Field(ge=1)] | None = None
    # On success, evaluate the model on the alias's gate and, past it, add it at a canary weight.
    promote: Promote | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr
    training_file: StrictStr
    validation_file: StrictStr | None = None
    suffix: Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9_-]*$")] | None = None
    seed: StrictInt | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    integrations: list[Any] | None = None
    crucible: LoraOptions = Field(default_factory=LoraOptions)


def router() -> APIRouter:
    r = APIRouter()

    @r.post("/v1/fine_tuning/jobs")
    async def create(
        body: JobCreate,
        request: Request,
        owner: Owner,
        idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
    ) -> dict[str, Any]:
        key_id = request.headers.get(KEY_ID_HEADER, "")
        job = await asyncio.to_thread(
            submit, request.app.state, owner, key_id, body, idempotency_key
        )
        return job_object(job)

    @r.get("/v1/fine_tuning/jobs")
    def list_jobs(request: Request, owner: Owner, page: PageParams) -> dict[str, Any]:
        return request.app.state.jobs.list_jobs(owner, page)

    @r.get("/v1/fine_tuning/jobs/{job_id}")
    def retrieve(job_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        return job_object(request.app.state.jobs.get(job_id, owner))

    @r.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel(job_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        jobs: JobStore = request.app.state.jobs
        if jobs.get(job_id, owner).status in ("succeeded", "failed"):
            raise InvalidRequest(f"job {job_id} has already finished", param="fine_tuning_job_id")
        return job_object(jobs.request_cancel(job_id, owner))

    @r.get("/v1/fine_tuning/jobs/{job_id}/events")
    def events(
        job_id: str,
        request: Request,
        owner: Owner,
        limit: Annotated[int, Query(ge=1, le=1000)] = 20,
        after: Cursor = None,
    ) -> dict[str, Any]:
        return request.app.state.jobs.events(job_id, owner, limit, after)

    @r.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def checkpoints(
        job_id: str, request: Request, owner: Owner, page: PageParams
    ) -> dict[str, Any]:
        return request.app.state.jobs.checkpoints(job_id, owner, page)

    @r.delete("/v1/models/{model_id:path}")
    def delete_model(model_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        """OpenAI's "delete a fine-tuned model": unloaded from every server, its files gone;
        the job that made it stays (its `fine_tuned_model` names what it made)."""
        state = request.app.state
        s = state.settings
        routes = state.aliases.table()
        adapters.retire(
            state.jobs,
            routes,
            s.adapters(),
            s.inference_urls,
            s.inference_headers(),
            owner,
            model_id,
        )
        return {"id": model_id, "object": "model", "deleted": True}

    @r.get("/internal/adapters", dependencies=[Depends(internal_only)])
    def adapter_owners(request: Request) -> dict[str, Any]:
        """For the gateway: who may use each fine-tuned model (never forwarded)."""
        rows = request.app.state.jobs.adapters()
        return {"data": [{"model": a.model, "owner": a.owner} for a in rows]}

    return r


def submit(
    state: Any, owner: str, key_id: str, body: JobCreate, idempotency_key: str | None = None
) -> JobRow:
    """A new job (or the one this Idempotency-Key made), queued for validation; with its
    hand-off to an alias when it asks for one."""
    s = state.settings
    adapters.check_quota(state.jobs, s.adapters(), owner, s.owner_adapter_bytes)
    promote = body.crucible.promote
    if promote is not None:
        check_promote(state, owner, promote)
    row = _new_job(body, owner, s, idempotency_key)
    job, created = state.jobs.create(row)
    if not created and job.request_hash != row.request_hash:
        raise Conflict(
            "this Idempotency-Key was used for a different request", param="Idempotency-Key"
        )
    if created:
        if promote is not None:
            state.handoffs.add(
                HandoffRow(
                    job_id=job.id,
                    owner=owner,
                    key_id=key_id,
                    alias=promote.alias,
                    weight=promote.weight,
                    data_source=promote.data_source,
                    reason=promote.reason,
                    status="waiting",
                    updated_at=time.time(),
                )
            )
        state.validate(job.id)
    return job


def check_base_model(s: Any, model: str) -> None:
    """A model to fine-tune is a directory name in the models directory, never a path (no
    separators, no dot names): else 400."""
    is_name = model not in ("", ".", "..") and not any(c in model for c in "/\\\0")
    if not is_name or not (s.models() / model / "config.json").exists():
        raise InvalidRequest(
            f"model {model!r} is not available for fine-tuning",
            param="model",
            code="model_not_available",
        )


def _new_job(body: JobCreate, owner: str, s: Any, idempotency_key: str | None) -> JobRow:
    """Check what can be checked at once (400/404 now, not a failed job later)."""
    if body.integrations:
        raise InvalidRequest("integrations are not supported", param="integrations")
    check_base_model(s, body.model)
    file_info(s.retrieval_url, s.internal_token, owner, body.training_file)
    if body.validation_file:
        file_info(s.retrieval_url, s.internal_token, owner, body.validation_file)
    opts = body.crucible
    if opts.lora_rank > s.max_lora_rank:
        raise InvalidRequest(
            f"lora_rank {opts.lora_rank} exceeds the server's maximum {s.max_lora_rank}",
            param="crucible.lora_rank",
        )
    unsupported = sorted(set(opts.target_modules) - set(s.supported_target_modules))
    if unsupported or not opts.target_modules:
        raise InvalidRequest(
            f"unsupported target modules {unsupported}; supported: {s.supported_target_modules}",
            param="crucible.target_modules",
        )
    hp = (
        (body.method.supervised.hyperparameters if body.method else None)
        or body.hyperparameters
        or Hyperparameters()
    )
    quantize = opts.quantize
    if quantize == "auto":
        quantize = "4bit" if _has_gpu() else "none"
    lora = {
        "rank": opts.lora_rank,
        "alpha": opts.lora_alpha,
        "target_modules": opts.target_modules,
        "quantize": quantize,
        "checkpoint_every": opts.checkpoint_every,
    }
    request_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    return JobRow(
        id=new_job_id(),
        owner=owner,
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        suffix=body.suffix,
        seed=body.seed if body.seed is not None else int(time.time()) % 2**31,
        hyperparameters=hp.model_dump(),
        lora=lora,
        metadata_=body.metadata,
        status="validating_files",
        created_at=int(time.time()),
        attempts=0,
        cancel_requested=False,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        traceparent=(tracing.current_header() or b"").decode() or None,
    )


def resolve_hyperparameters(hp: dict[str, Any], n_examples: int) -> dict[str, Any]:
    """ "auto" made concrete once the data is known (what the job then reports)."""
    return {
        "n_epochs": auto_epochs(n_examples) if hp["n_epochs"] == "auto" else hp["n_epochs"],
        "batch_size": (
            max(1, min(8, n_examples // 4)) if hp["batch_size"] == "auto" else hp["batch_size"]
        ),
        "learning_rate_multiplier": (
            1.0 if hp["learning_rate_multiplier"] == "auto" else hp["learning_rate_multiplier"]
        ),
    }


def validate_job(jobs: JobStore, s: Any, job_id: str) -> bool:
    """Read and check the training data (line numbers in every error); queue or fail the job.
    Returns whether it was queued."""
    job = jobs.get(job_id)
    model_dir = s.models() / job.model
    try:
        read = functools.partial(
            file_text, s.retrieval_url, s.internal_token, job.owner, retry_s=s.files_retry_s
        )
        numbered = parse_numbered(read(job.training_file), max_examples=s.max_examples)
        limit = example_limit(model_dir, s.max_example_tokens)
        tokenizer = functools.partial(load_tokenizer, model_dir)
        check_lengths(numbered, tokenizer, limit)
        if job.validation_file:
            check_lengths(
                parse_numbered(read(job.validation_file), min_examples=1), tokenizer, limit
            )
    except FilesUnavailable as exc:
        jobs.transition(
            job_id,
            "failed",
            only_from=("validating_files",),
            error={"code": "files_unavailable", "message": str(exc), "param": "training_file"},
            message=f"Training file unreadable: {exc}",
        )
        return False
    except (TrainingFileError, NotFound) as exc:
        jobs.transition(
            job_id,
            "failed",
            only_from=("validating_files",),
            error={
                "code": "invalid_training_file",
                "message": str(exc)[:4000],
                "param": "training_file",
            },
            message=f"Training file invalid: {str(exc)[:500]}",
        )
        return False
    hp = resolve_hyperparameters(job.hyperparameters, len(numbered))
    return jobs.transition(
        job_id,
        "queued",
        only_from=("validating_files",),
        hyperparameters=hp,
        message="Files validated; job queued",
    )


@functools.cache
def _has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())

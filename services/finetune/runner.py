"""One job, start to end, in a worker process: claim, train (resuming), admit, register.

Called by the Celery task; a plain function, so it can also run without Celery.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import httpx
from opentelemetry import trace

from services.common import tracing
from services.common.errors import NotFound
from services.finetune import adapters, trainproc
from services.finetune.config import FinetuneSettings
from services.finetune.files import FilesUnavailable, file_text
from services.finetune.jobs import AdapterRow, JobRow, JobStore
from services.finetune.training import Hooks, TrainSpec, checkpoint_steps, example_limit
from services.finetune.validation import TrainingFileError, parse

_TRACER = trace.get_tracer("crucible.finetune")
log = logging.getLogger("crucible.finetune.runner")
EVENT_EVERY = 10  # steps between metrics events


class _Watch:
    """The heartbeat thread: beats, and notices a cancel or a lost claim."""

    def __init__(self, store: JobStore, job_id: str, worker: str, every: float) -> None:
        self.stop = threading.Event()
        self.halt = threading.Event()  # cancel asked, or another worker owns the job now
        self._thread = threading.Thread(
            target=self._beat, args=(store, job_id, worker, every), daemon=True, name="heartbeat"
        )
        self._thread.start()

    def _beat(self, store: JobStore, job_id: str, worker: str, every: float) -> None:
        while not self.stop.wait(every):
            try:
                if store.heartbeat(job_id, worker):
                    self.halt.set()
            except Exception:  # a database blip: the next beat tries again
                log.warning("heartbeat failed", exc_info=True)

    def close(self) -> None:
        self.stop.set()
        self._thread.join(5)


def run(job_id: str, s: FinetuneSettings, worker: str, metrics: Any = None) -> None:
    store = JobStore(s.db_url())
    try:
        if not store.claim(job_id, worker, s.stale_after_s):
            log.info("job not claimable (done, cancelled or owned)", extra={"job_id": job_id})
            return
        job = store.get(job_id)
        if job.attempts > s.max_attempts:
            store.transition(
                job_id,
                "failed",
                only_from=("running",),
                error={
                    "code": "too_many_attempts",
                    "param": None,
                    "message": f"the job was interrupted {job.attempts - 1} times",
                },
            )
            return
        watch = _Watch(store, job_id, worker, s.heartbeat_s)
        span = _TRACER.start_span(
            "finetune.job",
            context=tracing.continued(job.traceparent),
            attributes={"crucible.job_id": job_id, "crucible.attempt": job.attempts},
        )
        try:
            with trace.use_span(span, end_on_exit=True):
                _train_and_register(store, job, s, watch, metrics)
        finally:
            watch.close()
    finally:
        store.engine.dispose()


def _train_and_register(
    store: JobStore, job: JobRow, s: FinetuneSettings, watch: _Watch, metrics: Any
) -> None:
    read = functools.partial(
        file_text, s.retrieval_url, s.internal_token, job.owner, retry_s=s.files_retry_s
    )
    try:
        examples = parse(read(job.training_file))
        valid = parse(read(job.validation_file), min_examples=1) if job.validation_file else None
    except TrainingFileError as exc:
        _fail(store, job.id, "invalid_training_file", str(exc), "training_file")
        return
    except (FilesUnavailable, NotFound) as exc:
        _fail(store, job.id, "files_unavailable", str(exc), "training_file")
        return
    spec = _spec(job, s, examples, valid)
    store.event(job.id, f"Training started: {len(spec.train)} examples, {spec.n_epochs} epochs")
    result = trainproc.run(spec, _hooks(store, job.id, watch, metrics))
    if result.adapter_dir is None:  # stopped: a cancel, or the job moved to another worker
        if store.get(job.id).cancel_requested and store.transition(
            job.id, "cancelled", only_from=("running",), message="Job cancelled during training"
        ):
            log.info("job cancelled", extra={"job_id": job.id})
        return
    done = {"step": result.steps, "train_loss": result.train_loss}
    if result.valid_loss is not None:
        done["valid_loss"] = result.valid_loss
    store.event(job.id, f"Training finished after {result.steps} steps", type="metrics", data=done)
    name = adapters.model_id(job.model, job.suffix, job.id)
    try:
        served = set().union(
            *(adapters.base_models(u, s.inference_headers()) for u in s.inference_urls)
        )
    except httpx.HTTPError:
        served = {job.model}  # no server reachable now: the reconciler loads it later
    problems = adapters.admission_problems(
        result.adapter_dir, job.model, served, s.max_lora_rank, s.supported_target_modules
    )
    if problems:
        _fail(store, job.id, "adapter_rejected", "; ".join(problems), None)
        return
    row = AdapterRow(
        model=name,
        owner=job.owner,
        job_id=job.id,
        base_model=job.model,
        path=str(result.adapter_dir.resolve()),
        created_at=job.created_at,
    )
    pending = adapters.register(store, row, s.inference_urls, s.inference_headers())
    if pending:
        store.event(
            job.id,
            f"Adapter registered; {len(pending)} server(s) will load it when they are back",
            level="warn",
        )
    store.transition(
        job.id,
        "succeeded",
        only_from=("running",),
        fine_tuned_model=name,
        trained_tokens=result.trained_tokens,
        message=f"Job succeeded: {name}",
    )


def _spec(
    job: JobRow,
    s: FinetuneSettings,
    examples: list[dict[str, Any]],
    valid: list[dict[str, Any]] | None,
) -> TrainSpec:
    hp, lora = job.hyperparameters, job.lora
    batch = hp["batch_size"]
    return TrainSpec(
        base_model=s.models() / job.model,
        train=examples,
        validation=valid,
        output_dir=s.adapters() / job.id,
        n_epochs=hp["n_epochs"],
        batch_size=batch,
        learning_rate=s.base_learning_rate * hp["learning_rate_multiplier"],
        seed=job.seed,
        lora_rank=lora["rank"],
        lora_alpha=lora["alpha"],
        target_modules=lora["target_modules"],
        quantize_4bit=lora["quantize"] == "4bit",
        checkpoint_every=lora.get("checkpoint_every") or s.checkpoint_every,
        max_length=example_limit(s.models() / job.model, s.max_example_tokens),
        keep_checkpoints=s.keep_checkpoints,
    )


def _hooks(store: JobStore, job_id: str, watch: _Watch, metrics: Any) -> Hooks:
    def on_step(step: int, total: int, loss: float, tokens: int, seconds: float) -> None:
        if metrics is not None:
            metrics.observe_step(tokens, seconds)
        if step % EVENT_EVERY == 0 or step == total:
            store.event(
                job_id,
                f"Step {step}/{total}: training loss={loss:.4f}",
                type="metrics",
                data={
                    "step": step,
                    "total_steps": total,
                    "train_loss": loss,
                    "step_seconds": seconds,
                    "tokens_per_s": tokens / seconds,
                },
            )

    def on_checkpoint(step: int, path: Any, values: dict[str, float]) -> None:
        # The listing shows what is on disk: training keeps the newest few.
        store.add_checkpoint(job_id, step, values, keep=checkpoint_steps(path.parents[1]))
        valid = f", validation loss={values['valid_loss']:.4f}" if "valid_loss" in values else ""
        store.event(
            job_id,
            f"Checkpoint at step {step}{valid}",
            type="metrics",
            data={"step": step, **values},
        )

    def on_resume(step: int) -> None:
        store.event(
            job_id, f"Resumed from the checkpoint at step {step}", data={"resumed_from_step": step}
        )

    return Hooks(
        on_step=on_step,
        on_checkpoint=on_checkpoint,
        on_resume=on_resume,
        should_stop=watch.halt.is_set,
    )


def _fail(store: JobStore, job_id: str, code: str, message: str, param: str | None) -> None:
    store.transition(
        job_id,
        "failed",
        only_from=("running", "validating_files"),
        error={"code": code, "message": message[:4000], "param": param},
    )

"""The fine-tuning hand-off: a job that names an alias (`crucible.promote`) is evaluated once it
has succeeded and its model is served, on the alias's gate eval, and joins the alias at a canary
weight if it clears the gate. Each step is a job event; the hand-off's state is a row advanced by
the service's reconciler, so a restart resumes it where it stood.

    waiting ──(job succeeded, model served)──► evaluating ──(run completed)──► promoted | refused
       └──(job failed or cancelled)──► skipped              └──(run failed)──► failed
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr
from sqlalchemy import JSON, Float, String, select, update
from sqlalchemy.orm import Mapped, mapped_column

from services.common.errors import Conflict, CrucibleError, InvalidRequest, NotFound
from services.finetune.aliases import promoted
from services.finetune.aliasgate import check_gate
from services.finetune.jobs import Base
from services.finetune.remote import model_available

log = logging.getLogger("crucible.finetune.handoff")
SERVED_WITHIN_S = 3600  # a model not served to the key this long after its job: the hand-off fails


class Promote(BaseModel):
    """`crucible.promote` on a job: the alias its model joins if it clears the alias's gate."""

    model_config = ConfigDict(extra="forbid")
    alias: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    weight: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = 10
    # The gate's eval run, as for client.evals.runs.create, without `model` (the job's).
    data_source: dict[str, Any]
    reason: Annotated[StrictStr, Field(max_length=1000)] | None = None


class HandoffRow(Base):
    __tablename__ = "fine_tuning_handoffs"

    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    key_id: Mapped[str] = mapped_column(String(64))
    alias: Mapped[str] = mapped_column(String(64))
    weight: Mapped[float] = mapped_column(Float)
    data_source: Mapped[dict[str, Any]] = mapped_column(JSON)
    reason: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    run_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    detail: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)


def check_promote(state: Any, owner: str, p: Promote) -> None:
    """At job create: the alias is the owner's and gated, the data source can be sampled."""
    param = "crucible.promote"
    try:
        _, rev = state.aliases.get(owner, p.alias)
    except NotFound:
        raise InvalidRequest(f"no model alias {p.alias!r}", param=f"{param}.alias") from None
    if not rev.config.get("gate"):
        raise InvalidRequest(
            f"the alias {p.alias!r} has no gate; a job's model joins an alias only past one",
            param=f"{param}.alias",
        )
    ds = p.data_source
    if ds.get("type") != "completions" or "model" in ds or not isinstance(ds.get("source"), dict):
        raise InvalidRequest(
            f"{param}.data_source is a completions data source with a source and no model "
            "(the job's model is the one sampled)",
            param=f"{param}.data_source",
        )


class HandoffStore:
    def __init__(self, sessions: Any) -> None:
        self.session = sessions

    def add(self, row: HandoffRow) -> None:
        with self.session.begin() as s:
            if s.get(HandoffRow, row.job_id) is None:
                s.add(row)

    def get(self, job_id: str) -> HandoffRow | None:
        with self.session() as s:
            found: HandoffRow | None = s.get(HandoffRow, job_id)
            return found

    def open(self) -> list[HandoffRow]:
        with self.session() as s:
            stmt = select(HandoffRow).where(HandoffRow.status.in_(("waiting", "evaluating")))
            return list(s.scalars(stmt))

    def advance(self, job_id: str, was: str, status: str, **values: Any) -> bool:
        """From `was` to `status`, once (two reconcilers never both take a step)."""
        with self.session.begin() as s:
            moved = s.execute(
                update(HandoffRow)
                .where(HandoffRow.job_id == job_id, HandoffRow.status == was)
                .values(status=status, updated_at=time.time(), **values)
            ).rowcount
        return bool(moved == 1)


def handoff_round(state: Any) -> None:
    """Every open hand-off, one step further where it can go."""
    for h in state.handoffs.open():
        try:
            if h.status == "waiting":
                _waiting(state, h)
            else:
                _evaluating(state, h)
        except NotFound as exc:  # the alias (or the run) was deleted meanwhile
            if state.handoffs.advance(h.job_id, h.status, "failed", detail=exc.message[:2000]):
                state.jobs.event(h.job_id, f"Not handed to alias {h.alias}: {exc.message[:500]}")
        except Exception:  # one hand-off's trouble must not stop the others
            log.warning("hand-off step failed", extra={"job": h.job_id}, exc_info=True)


def _waiting(state: Any, h: HandoffRow) -> None:
    from services.finetune.evals_api import RunCreate, new_run

    job = state.jobs.get(h.job_id)
    if job.status in ("failed", "cancelled"):
        if state.handoffs.advance(h.job_id, "waiting", "skipped", detail=f"the job {job.status}"):
            state.jobs.event(h.job_id, f"Not handed to alias {h.alias}: the job {job.status}")
        return
    model = job.fine_tuned_model
    if job.status != "succeeded" or not model:
        return
    try:
        model_available(state.settings, h.key_id, model, "model")
    except InvalidRequest:
        if time.time() - (job.finished_at or time.time()) < SERVED_WITHIN_S:
            return  # not served yet (the adapter is being loaded): next round
        detail = f"{model} was not served to the job's key within {SERVED_WITHIN_S // 60} min"
        if state.handoffs.advance(h.job_id, "waiting", "failed", detail=detail):
            state.jobs.event(h.job_id, f"Not handed to alias {h.alias}: {detail}", level="warn")
        return
    _, rev = state.aliases.get(h.owner, h.alias)
    eval_id = rev.config["gate"]["eval_id"]
    body = RunCreate(
        name=f"gate of {h.alias} for {h.job_id}",
        metadata={"fine_tuning_job": h.job_id, "alias": h.alias},
        data_source={**h.data_source, "model": model},
    )
    try:
        run = state.evals.add_run(new_run(state, h.owner, h.key_id, eval_id, body))
    except CrucibleError as exc:
        if state.handoffs.advance(h.job_id, "waiting", "failed", detail=exc.message[:2000]):
            state.jobs.event(
                h.job_id, f"Not handed to alias {h.alias}: {exc.message[:500]}", level="warn"
            )
        return
    if state.handoffs.advance(h.job_id, "waiting", "evaluating", run_id=run["id"]):
        state.jobs.event(
            h.job_id,
            f"Evaluating {model} on eval {eval_id} (run {run['id']}), the gate of alias {h.alias}",
        )


def _evaluating(state: Any, h: HandoffRow) -> None:
    run = state.evals.get_run(h.run_id, h.owner)
    if run.status in ("failed", "canceled"):
        if state.handoffs.advance(h.job_id, "evaluating", "failed", detail=f"run {run.status}"):
            state.jobs.event(
                h.job_id, f"Not handed to alias {h.alias}: the eval run {run.status}", level="warn"
            )
        return
    if run.status != "completed":
        return
    model = state.jobs.get(h.job_id).fine_tuned_model
    aliases = state.aliases
    row, current = aliases.get(h.owner, h.alias)
    config = promoted(current.config, model, h.weight)
    try:
        evidence = check_gate(state.evals, h.owner, h.alias, current.config, config)
        _, rev = aliases.change(
            row,
            current,
            config,
            f"job:{h.job_id}",
            "promote",
            h.reason or f"fine-tuning job {h.job_id} cleared the gate",
            evidence=evidence,
        )
    except Conflict as exc:
        if exc.code == "revision_conflict":
            return  # someone changed the alias meanwhile: judged again next round
        if state.handoffs.advance(h.job_id, "evaluating", "refused", detail=exc.message[:2000]):
            state.jobs.event(h.job_id, f"Not promoted: {exc.message[:1500]}", level="warn")
        return
    if state.handoffs.advance(h.job_id, "evaluating", "promoted"):
        state.jobs.event(
            h.job_id,
            f"{model} joined alias {h.alias} at {h.weight:g}% (revision {rev.number})",
        )

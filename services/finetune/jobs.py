"""Jobs, their events and checkpoints, and registered adapters, in SQL (SQLite or PostgreSQL).

The job row is the truth about a job; Celery only carries "run job X". A worker claims a job
with one conditional UPDATE, so a duplicate message or a second worker can never run it twice,
and a job whose worker stopped beating can be claimed again and resume.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    and_,
    case,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.common import migrations
from services.common.db import make_engine, make_sessionmaker
from services.common.errors import InvalidRequest, NotFound
from services.common.pagination import PageQuery, listing, page

ACTIVE = ("validating_files", "queued", "running")
FINAL = ("succeeded", "failed", "cancelled")


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (UniqueConstraint("owner", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    model: Mapped[str] = mapped_column(String(256))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(Integer)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    lora: Mapped[dict[str, Any]] = mapped_column(JSON)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(24), index=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer, index=True)
    queued_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Seconds its workers trained it, beat to beat (an attempt whose worker died counts to its
    # last beat): what the costs price as its GPU time.
    train_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The request that made it: each attempt's span continues its trace.
    traceparent: Mapped[str | None] = mapped_column(String(55), nullable=True)


class EventRow(Base):
    __tablename__ = "fine_tuning_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"), index=True)
    created_at: Mapped[int] = mapped_column(Integer)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(String(2000))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class CheckpointRow(Base):
    __tablename__ = "fine_tuning_checkpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(Integer, index=True)


class AdapterRow(Base):
    """A fine-tuned model the platform serves: loaded into vLLM again after it restarts."""

    __tablename__ = "adapters"

    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    job_id: Mapped[str] = mapped_column(String(40))
    base_model: Mapped[str] = mapped_column(String(256))
    path: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[int] = mapped_column(Integer)


def job_object(row: JobRow) -> dict[str, Any]:
    hp = row.hyperparameters
    return {
        "object": "fine_tuning.job",
        "id": row.id,
        "model": row.model,
        "created_at": row.created_at,
        "finished_at": row.finished_at,
        "fine_tuned_model": row.fine_tuned_model,
        "organization_id": f"org-{row.owner}",
        "result_files": [],
        "status": row.status,
        "validation_file": row.validation_file,
        "training_file": row.training_file,
        "hyperparameters": hp,
        "trained_tokens": row.trained_tokens,
        "error": row.error,
        "seed": row.seed,
        "estimated_finish": None,
        "integrations": [],
        "user_provided_suffix": row.suffix,
        "metadata": row.metadata_,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        "crucible": {
            "lora": row.lora,
            "attempts": row.attempts,
            "trace_id": row.traceparent[3:35] if row.traceparent else None,
        },
    }


def event_object(row: EventRow) -> dict[str, Any]:
    return {
        "object": "fine_tuning.job.event",
        "id": f"ftevent-{row.id:012d}",
        "created_at": row.created_at,
        "level": row.level,
        "message": row.message,
        "type": row.type,
        "data": row.data,
    }


def _event_number(event_id: str) -> int:
    """The row number inside an event id (`ftevent-000000000042`), for an `after` cursor."""
    prefix, _, digits = event_id.partition("-")
    if prefix != "ftevent" or not digits.isascii() or not digits.isdigit() or len(digits) > 18:
        raise InvalidRequest(f"`after` is not an event id: {event_id[:64]!r}", param="after")
    return int(digits)


def checkpoint_object(row: CheckpointRow, fine_tuned: str) -> dict[str, Any]:
    return {
        "object": "fine_tuning.job.checkpoint",
        "id": row.id,
        "created_at": row.created_at,
        "fine_tuned_model_checkpoint": f"{fine_tuned}:ckpt-step-{row.step}",
        "step_number": row.step,
        "metrics": {"step": row.step, **row.metrics},
        "fine_tuning_job_id": row.job_id,
    }


def _trained(now: float) -> Any:
    """SQL: the job's training seconds with the time since its last beat, while it runs."""
    running = and_(JobRow.status == "running", JobRow.heartbeat_at.is_not(None))
    since = now - func.coalesce(JobRow.heartbeat_at, now)
    return case((running, JobRow.train_seconds + since), else_=JobRow.train_seconds)


class JobStore:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        migrations.upgrade(self.engine, "finetune")
        self.session = make_sessionmaker(self.engine)

    def create(self, row: JobRow) -> tuple[JobRow, bool]:
        """Insert, or return the job an earlier request with the same idempotency key made
        (concurrent requests with one key included: the unique key decides, the loser reads)."""
        if row.idempotency_key and (existing := self._by_key(row)) is not None:
            return existing, False
        try:
            with self.session.begin() as s:
                s.add(row)
                s.flush()  # the job row first: events reference it
                s.add(_event(row.id, "info", f"Created fine-tuning job: {row.id}"))
        except IntegrityError:
            if not row.idempotency_key or (existing := self._by_key(row)) is None:
                raise
            return existing, False
        return row, True

    def _by_key(self, row: JobRow) -> JobRow | None:
        with self.session() as s:
            return s.scalar(
                select(JobRow).where(
                    JobRow.owner == row.owner, JobRow.idempotency_key == row.idempotency_key
                )
            )

    def get(self, job_id: str, owner: str | None = None) -> JobRow:
        with self.session() as s:
            row = s.get(JobRow, job_id)
        if row is None or (owner is not None and row.owner != owner):
            raise NotFound(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
        return row

    def list_jobs(self, owner: str, q: PageQuery) -> dict[str, Any]:
        with self.session() as s:
            rows, more = page(
                s, select(JobRow).where(JobRow.owner == owner), JobRow.created_at, JobRow.id, q
            )
        out = listing([job_object(r) for r in rows], more)
        return out

    def transition(
        self,
        job_id: str,
        status: str,
        *,
        message: str | None = None,
        only_from: Sequence[str] | None = None,
        **fields: Any,
    ) -> bool:
        """Set the status (and fields) if the job is in one of `only_from`; log an event."""
        values: dict[str, Any] = {"status": status, **fields}
        if status in FINAL:
            now = time.time()
            values["finished_at"] = int(now)
            values["train_seconds"] = _trained(now)
        if status == "queued":
            values["queued_at"] = time.time()
        with self.session.begin() as s:
            stmt = update(JobRow).where(JobRow.id == job_id)
            if only_from is not None:
                stmt = stmt.where(JobRow.status.in_(list(only_from)))
            changed = s.execute(stmt.values(**values)).rowcount > 0
            if changed:
                level = "error" if status == "failed" else "info"
                s.add(_event(job_id, level, message or f"Job {status.replace('_', ' ')}"))
        return changed

    def claim(self, job_id: str, worker: str, stale_after: float) -> bool:
        """Take a queued job, or a running one whose worker went silent. Atomic."""
        now = time.time()
        with self.session.begin() as s:
            stmt = (
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    JobRow.cancel_requested.is_(False),
                    or_(
                        JobRow.status == "queued",
                        and_(JobRow.status == "running", JobRow.heartbeat_at < now - stale_after),
                    ),
                )
                .values(
                    status="running", worker=worker, heartbeat_at=now, attempts=JobRow.attempts + 1
                )
            )
            return s.execute(stmt).rowcount > 0

    def heartbeat(self, job_id: str, worker: str) -> bool:
        """Beat; returns whether a cancel was asked for (or the job is no longer ours)."""
        now = time.time()
        with self.session.begin() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.worker == worker)
                .values(heartbeat_at=now, train_seconds=_trained(now))
            )
            row = s.get(JobRow, job_id)
            return row is None or row.cancel_requested or row.worker != worker

    def request_cancel(self, job_id: str, owner: str) -> JobRow:
        row = self.get(job_id, owner)
        if row.status in FINAL:
            return row
        with self.session.begin() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id).values(cancel_requested=True))
        # Not yet running: cancelled at once. Running: the worker stops at its next step.
        self.transition(
            job_id, "cancelled", only_from=("validating_files", "queued"), message="Job cancelled"
        )
        return self.get(job_id)

    def event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: dict[str, Any] | None = None,
    ) -> None:
        with self.session.begin() as s:
            s.add(_event(job_id, level, message, type, data))

    def events(self, job_id: str, owner: str, limit: int, after: str | None) -> dict[str, Any]:
        self.get(job_id, owner)
        stmt = select(EventRow).where(EventRow.job_id == job_id)
        if after:
            stmt = stmt.where(EventRow.id < _event_number(after))
        with self.session() as s:
            rows = list(s.scalars(stmt.order_by(EventRow.id.desc()).limit(limit + 1)))
        return {
            "object": "list",
            "data": [event_object(r) for r in rows[:limit]],
            "has_more": len(rows) > limit,
        }

    def add_checkpoint(
        self, job_id: str, step: int, metrics: dict[str, float], keep: list[int] | None = None
    ) -> None:
        """Record a checkpoint; with `keep`, the job's other checkpoints not among those steps
        (removed from disk) leave the listing."""
        with self.session.begin() as s:
            if keep is not None:
                s.execute(
                    delete(CheckpointRow).where(
                        CheckpointRow.job_id == job_id, CheckpointRow.step.not_in(keep)
                    )
                )
            s.add(
                CheckpointRow(
                    id="ftckpt_" + secrets.token_hex(12),
                    job_id=job_id,
                    step=step,
                    metrics=metrics,
                    created_at=int(time.time()),
                )
            )

    def checkpoints(self, job_id: str, owner: str, q: PageQuery) -> dict[str, Any]:
        job = self.get(job_id, owner)
        name = job.fine_tuned_model or f"ft:{job.model}:{job.suffix or ''}:{job.id}"
        with self.session() as s:
            rows, more = page(
                s,
                select(CheckpointRow).where(CheckpointRow.job_id == job_id),
                CheckpointRow.created_at,
                CheckpointRow.id,
                q,
            )
        return listing([checkpoint_object(r, name) for r in rows], more)

    def with_status(self, *statuses: str) -> list[JobRow]:
        with self.session() as s:
            return list(s.scalars(select(JobRow).where(JobRow.status.in_(statuses))))

    def counts(self) -> dict[str, int]:
        from sqlalchemy import func

        with self.session() as s:
            return dict(
                s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all()
            )

    # --- adapters --------------------------------------------------------------------------

    def register_adapter(self, row: AdapterRow) -> None:
        with self.session.begin() as s:
            s.merge(row)

    def adapters(self) -> list[AdapterRow]:
        with self.session() as s:
            return list(s.scalars(select(AdapterRow)))

    def adapter(self, model: str) -> AdapterRow | None:
        with self.session() as s:
            return s.get(AdapterRow, model)

    def delete_adapter(self, model: str) -> bool:
        """Forget a served model (restarts no longer load it); False if it was already gone."""
        with self.session.begin() as s:
            return bool(s.execute(delete(AdapterRow).where(AdapterRow.model == model)).rowcount)

    def job_ids(
        self, owner: str | None = None, statuses: Sequence[str] = (), among: Sequence[str] = ()
    ) -> list[str]:
        """Ids of jobs: of one owner, in some statuses, among some ids, where given."""
        q = select(JobRow.id)
        if owner is not None:
            q = q.where(JobRow.owner == owner)
        if statuses:
            q = q.where(JobRow.status.in_(statuses))
        if among:
            q = q.where(JobRow.id.in_(among))
        with self.session() as s:
            return list(s.scalars(q))


def new_job_id() -> str:
    return "ftjob-" + secrets.token_hex(12)


def _event(
    job_id: str, level: str, message: str, type: str = "message", data: dict[str, Any] | None = None
) -> EventRow:
    return EventRow(
        job_id=job_id,
        created_at=int(time.time()),
        level=level,
        type=type,
        message=message,
        data=data,
    )

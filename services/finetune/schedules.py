"""Retraining on a schedule (Crucible's extension of the fine-tuning API): a cron expression, a
dataset over stored completions (optionally only the last `window_days`), a job (the base model,
its hyperparameters, and `crucible.promote` to hand the result to an alias past its gate).

    POST   /v1/fine_tuning/schedules                 create
    GET    /v1/fine_tuning/schedules                 the owner's schedules
    GET    /v1/fine_tuning/schedules/{id}
    POST   /v1/fine_tuning/schedules/{id}            update {name, cron, enabled}
    DELETE /v1/fine_tuning/schedules/{id}
    POST   /v1/fine_tuning/schedules/{id}/run        run now (besides the cron)
    GET    /v1/fine_tuning/schedules/{id}/runs       each run with its outcome

The service's reconciler is the scheduler: a due schedule is claimed by moving its `next_run_at`
with a compare-and-set, so two finetune processes never both start one run; a service that was
down runs a missed schedule once when it is back, not once per missed slot.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from cronsim import CronSim, CronSimError
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError
from sqlalchemy import JSON, Boolean, Float, Integer, String, select, update
from sqlalchemy.orm import Mapped, mapped_column

from services.common.errors import CrucibleError, InvalidRequest, NotFound
from services.common.metadata import check_metadata
from services.common.pagination import PageParams, PageQuery, listing, page
from services.common.tenancy import Owner
from services.finetune.datasets import DatasetCreate, make_dataset
from services.finetune.jobs import Base
from services.finetune.remote import KEY_ID_HEADER

log = logging.getLogger("crucible.finetune.schedules")
Cron = Annotated[StrictStr, Field(min_length=9, max_length=128)]


class ScheduleCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[StrictStr, Field(max_length=256)] | None = None
    cron: Cron  # five fields, UTC: "0 3 * * 1" is Mondays at 03:00
    dataset: DatasetCreate
    window_days: Annotated[int, Field(ge=1, le=3650)] | None = None
    job: dict[str, Any]  # as for client.fine_tuning.jobs.create, without the files
    enabled: StrictBool = True
    metadata: dict[str, Any] | None = None


class ScheduleUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[StrictStr, Field(max_length=256)] | None = None
    cron: Cron | None = None
    enabled: StrictBool | None = None


class ScheduleRow(Base):
    __tablename__ = "fine_tuning_schedules"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    key_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(256))
    cron: Mapped[str] = mapped_column(String(128))
    dataset: Mapped[dict[str, Any]] = mapped_column(JSON)
    window_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    job: Mapped[dict[str, Any]] = mapped_column(JSON)
    enabled: Mapped[bool] = mapped_column(Boolean)
    next_run_at: Mapped[float] = mapped_column(Float, index=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)


class ScheduleRunRow(Base):
    __tablename__ = "fine_tuning_schedule_runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    schedule_id: Mapped[str] = mapped_column(String(40), index=True)
    owner: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float, index=True)
    trigger: Mapped[str] = mapped_column(String(8))  # cron | manual
    status: Mapped[str] = mapped_column(String(16))  # succeeded (a job started) | failed
    dataset_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


def next_run(cron: str, after: float) -> float:
    try:
        when = next(CronSim(cron, datetime.fromtimestamp(after, UTC)))
    except (CronSimError, StopIteration) as exc:
        raise InvalidRequest(f"cron {cron!r}: {exc}", param="cron") from None
    return when.timestamp()


def check_job(state: Any, owner: str, job: dict[str, Any]) -> None:
    """The job a schedule will submit is one `client.fine_tuning.jobs.create` would take."""
    from services.finetune.api import JobCreate, check_base_model
    from services.finetune.handoff import check_promote

    for name in ("training_file", "validation_file"):
        if name in job:
            raise InvalidRequest(f"a schedule makes the job's {name}", param=f"job.{name}")
    try:
        body = JobCreate.model_validate({**job, "training_file": "file-scheduled"})
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise InvalidRequest(f"job.{where}: {error['msg']}", param=f"job.{where}") from None
    check_base_model(state.settings, body.model)
    if body.crucible.promote is not None:
        check_promote(state, owner, body.crucible.promote)


def schedule_object(row: ScheduleRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "fine_tuning.schedule",
        "name": row.name,
        "cron": row.cron,
        "enabled": row.enabled,
        "next_run_at": int(row.next_run_at) if row.enabled else None,
        "dataset": row.dataset,
        "window_days": row.window_days,
        "job": row.job,
        "created_at": int(row.created_at),
        "metadata": row.metadata_,
    }


class ScheduleStore:
    def __init__(self, sessions: Any) -> None:
        self.session = sessions

    def add(self, row: ScheduleRow) -> None:
        with self.session.begin() as s:
            s.add(row)

    def get(self, schedule_id: str, owner: str | None = None) -> ScheduleRow:
        with self.session() as s:
            row = s.get(ScheduleRow, schedule_id)
        if row is None or (owner is not None and row.owner != owner):
            raise NotFound(f"No fine-tuning schedule {schedule_id!r}.", param="schedule_id")
        return row

    def of_owner(self, owner: str, q: PageQuery) -> dict[str, Any]:
        with self.session() as s:
            stmt = select(ScheduleRow).where(ScheduleRow.owner == owner)
            rows, more = page(s, stmt, ScheduleRow.created_at, ScheduleRow.id, q)
        return listing([schedule_object(r) for r in rows], more)

    def update(self, schedule_id: str, owner: str, values: dict[str, Any]) -> ScheduleRow:
        self.get(schedule_id, owner)
        with self.session.begin() as s:
            s.execute(update(ScheduleRow).where(ScheduleRow.id == schedule_id).values(**values))
        return self.get(schedule_id)

    def delete(self, schedule_id: str, owner: str) -> None:
        with self.session.begin() as s:
            row = s.get(ScheduleRow, schedule_id)
            if row is None or row.owner != owner:
                raise NotFound(f"No fine-tuning schedule {schedule_id!r}.", param="schedule_id")
            s.delete(row)

    def due(self, now: float) -> list[ScheduleRow]:
        with self.session() as s:
            stmt = select(ScheduleRow).where(
                ScheduleRow.enabled.is_(True), ScheduleRow.next_run_at <= now
            )
            return list(s.scalars(stmt))

    def claim(self, row: ScheduleRow, now: float) -> bool:
        """Take a due run: move `next_run_at` on, if no one else did."""
        with self.session.begin() as s:
            moved = s.execute(
                update(ScheduleRow)
                .where(ScheduleRow.id == row.id, ScheduleRow.next_run_at == row.next_run_at)
                .values(next_run_at=next_run(row.cron, now))
            ).rowcount
        return bool(moved == 1)

    def record(self, run: ScheduleRunRow) -> None:
        with self.session.begin() as s:
            s.add(run)

    def runs(self, schedule_id: str, owner: str, q: PageQuery) -> tuple[Sequence[Any], bool]:
        self.get(schedule_id, owner)
        with self.session() as s:
            stmt = select(ScheduleRunRow).where(ScheduleRunRow.schedule_id == schedule_id)
            return page(s, stmt, ScheduleRunRow.created_at, ScheduleRunRow.id, q)


def run_schedule(state: Any, row: ScheduleRow, trigger: str) -> ScheduleRunRow:
    """One run: the dataset from the stored completions now, then the job on it."""
    from services.finetune.api import JobCreate, submit

    run = ScheduleRunRow(
        id="ftschedrun_" + secrets.token_hex(10),
        schedule_id=row.id,
        owner=row.owner,
        created_at=time.time(),
        trigger=trigger,
        status="failed",
    )
    try:
        spec = DatasetCreate.model_validate(row.dataset)
        if row.window_days:
            since = int(time.time()) - row.window_days * 86_400
            spec.filter.created_after = max(spec.filter.created_after or 0, since)
        dataset = make_dataset(state, row.owner, spec)
        run.dataset_id = dataset["id"]
        body = JobCreate.model_validate(
            {
                **row.job,
                "training_file": dataset["training_file"],
                "validation_file": dataset.get("validation_file"),
                "metadata": {**(row.job.get("metadata") or {}), "schedule": row.id},
            }
        )
        job = submit(state, row.owner, row.key_id, body)
        run.job_id, run.status = job.id, "succeeded"
    except CrucibleError as exc:
        run.error = {"code": exc.code, "message": exc.message[:2000], "param": exc.param}
    state.schedules.record(run)
    log.info(
        "schedule run",
        extra={"schedule": row.id, "status": run.status, "job": run.job_id, "trigger": trigger},
    )
    return run


def schedule_round(state: Any, now: float | None = None) -> None:
    now = now or time.time()
    for row in state.schedules.due(now):
        if state.schedules.claim(row, now):
            run_schedule(state, row, "cron")


def run_object(state: Any, run: ScheduleRunRow) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": run.id,
        "object": "fine_tuning.schedule.run",
        "schedule_id": run.schedule_id,
        "created_at": int(run.created_at),
        "trigger": run.trigger,
        "status": run.status,
        "error": run.error,
        "dataset_id": run.dataset_id,
        "fine_tuning_job_id": run.job_id,
        "job_status": None,
        "fine_tuned_model": None,
        "handoff": None,
    }
    if run.job_id:
        try:
            job = state.jobs.get(run.job_id)
            out["job_status"], out["fine_tuned_model"] = job.status, job.fine_tuned_model
        except NotFound:
            pass
        h = state.handoffs.get(run.job_id)
        if h is not None:
            out["handoff"] = {
                "alias": h.alias,
                "status": h.status,
                "eval_run_id": h.run_id,
                "detail": h.detail,
            }
    return out


def router() -> APIRouter:
    r = APIRouter()

    def store(request: Request) -> ScheduleStore:
        schedules: ScheduleStore = request.app.state.schedules
        return schedules

    @r.post("/v1/fine_tuning/schedules")
    async def create(body: ScheduleCreate, request: Request, owner: Owner) -> dict[str, Any]:
        state = request.app.state
        check_metadata(body.metadata)
        body.dataset.filter.compile()  # its metadata, checked now
        await asyncio.to_thread(check_job, state, owner, body.job)
        now = time.time()
        row = ScheduleRow(
            id="ftsched_" + secrets.token_hex(10),
            owner=owner,
            key_id=request.headers.get(KEY_ID_HEADER, ""),
            name=body.name or body.cron,
            cron=body.cron,
            dataset=body.dataset.model_dump(),
            window_days=body.window_days,
            job=body.job,
            enabled=body.enabled,
            next_run_at=next_run(body.cron, now),
            created_at=now,
            metadata_=body.metadata,
        )
        await asyncio.to_thread(store(request).add, row)
        return schedule_object(row)

    @r.get("/v1/fine_tuning/schedules")
    def list_schedules(request: Request, owner: Owner, page: PageParams) -> dict[str, Any]:
        return store(request).of_owner(owner, page)

    @r.get("/v1/fine_tuning/schedules/{schedule_id}")
    def retrieve(schedule_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        return schedule_object(store(request).get(schedule_id, owner))

    @r.post("/v1/fine_tuning/schedules/{schedule_id}")
    def update_schedule(
        schedule_id: str, body: ScheduleUpdate, request: Request, owner: Owner
    ) -> dict[str, Any]:
        values = body.model_dump(exclude_unset=True, exclude_none=True)
        if "cron" in values or values.get("enabled"):
            cron = values.get("cron") or store(request).get(schedule_id, owner).cron
            values["next_run_at"] = next_run(cron, time.time())
        return schedule_object(store(request).update(schedule_id, owner, values))

    @r.delete("/v1/fine_tuning/schedules/{schedule_id}")
    def delete(schedule_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        store(request).delete(schedule_id, owner)
        return {"id": schedule_id, "object": "fine_tuning.schedule.deleted", "deleted": True}

    @r.post("/v1/fine_tuning/schedules/{schedule_id}/run")
    async def run_now(schedule_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        state = request.app.state
        row = store(request).get(schedule_id, owner)
        run = await asyncio.to_thread(run_schedule, state, row, "manual")
        return run_object(state, run)

    @r.get("/v1/fine_tuning/schedules/{schedule_id}/runs")
    def runs(schedule_id: str, request: Request, owner: Owner, page: PageParams) -> dict[str, Any]:
        rows, more = store(request).runs(schedule_id, owner, page)
        return listing([run_object(request.app.state, r) for r in rows], more)

    return r

"""Evaluations in OpenAI's Evals wire format: evals (what data, which graders), runs (a model or
an answer set over that data) and their output items, kept in SQL.

A run is created `queued` with its items resolved (a file, inline content or stored
completions); the eval worker (evalworker.py) claims it, samples and grades each item, and
writes one output item per item, which is unique per (run, item): a worker killed mid-run is
replaced, the run resumes from what was written, and no item is graded twice.
"""

from __future__ import annotations

import secrets
import time
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
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from services.common.errors import NotFound
from services.common.pagination import PageQuery, listing, page
from services.finetune.jobs import Base
from services.finetune.usage import UsageRow

RUN_FINAL = ("completed", "failed", "canceled")


class EvalRow(Base):
    __tablename__ = "evals"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[float] = mapped_column(Float, index=True)
    data_source_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    testing_criteria: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)


class RunRow(Base):
    __tablename__ = "eval_runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    eval_id: Mapped[str] = mapped_column(ForeignKey("evals.id"), index=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    key_id: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(256))
    model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    data_source: Mapped[dict[str, Any]] = mapped_column(JSON)
    items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    usage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The request that made it: the worker's span for the run continues its trace.
    traceparent: Mapped[str | None] = mapped_column(String(55), nullable=True)


class OutputRow(Base):
    __tablename__ = "eval_output_items"
    __table_args__ = (UniqueConstraint("run_id", "item_index"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("eval_runs.id"), index=True)
    eval_id: Mapped[str] = mapped_column(String(40))
    item_index: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    status: Mapped[str] = mapped_column(String(8), index=True)  # pass, fail, error
    item: Mapped[dict[str, Any]] = mapped_column(JSON)
    sample: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    results: Mapped[list[dict[str, Any]]] = mapped_column(JSON)


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# --- the API's objects -----------------------------------------------------------------------


def eval_object(row: EvalRow) -> dict[str, Any]:
    return {
        "object": "eval",
        "id": row.id,
        "name": row.name,
        "data_source_config": row.data_source_config,
        "testing_criteria": row.testing_criteria,
        "created_at": int(row.created_at),
        "metadata": row.metadata_ or {},
    }


def run_object(row: RunRow, counts: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "eval.run",
        "id": row.id,
        "eval_id": row.eval_id,
        "name": row.name,
        "model": row.model,
        "status": row.status,
        "created_at": int(row.created_at),
        "data_source": row.data_source,
        "metadata": row.metadata_ or {},
        "error": row.error,
        "report_url": f"/v1/evals/{row.eval_id}/runs/{row.id}/output_items",
        "trace_id": row.traceparent[3:35] if row.traceparent else None,
        "result_counts": counts["result_counts"],
        "per_testing_criteria_results": counts["per_testing_criteria_results"],
        "per_model_usage": [
            {"model_name": model, "cached_tokens": 0, **usage}
            for model, usage in sorted((row.usage or {}).items())
        ],
    }


def output_object(row: OutputRow) -> dict[str, Any]:
    return {
        "object": "eval.run.output_item",
        "id": row.id,
        "run_id": row.run_id,
        "eval_id": row.eval_id,
        "created_at": int(row.created_at),
        "status": row.status,
        "datasource_item_id": row.item_index,
        "datasource_item": row.item,
        "results": row.results,
        "sample": row.sample,
    }


class EvalStore:
    def __init__(self, sessions: Any) -> None:
        self.session = sessions

    # evals

    def add_eval(self, row: EvalRow) -> dict[str, Any]:
        with self.session.begin() as s:
            s.add(row)
        return eval_object(row)

    def get_eval(self, eval_id: str, owner: str) -> EvalRow:
        with self.session() as s:
            row = s.get(EvalRow, eval_id)
        if row is None or row.owner != owner:
            raise NotFound(f"No such eval: {eval_id}", param="eval_id")
        return row

    def list_evals(self, owner: str, q: PageQuery) -> dict[str, Any]:
        with self.session() as s:
            stmt = select(EvalRow).where(EvalRow.owner == owner)
            rows, more = page(s, stmt, EvalRow.created_at, EvalRow.id, q)
        return listing([eval_object(r) for r in rows], more)

    def update_eval(self, eval_id: str, owner: str, changes: dict[str, Any]) -> dict[str, Any]:
        self.get_eval(eval_id, owner)
        with self.session.begin() as s:
            row = s.get(EvalRow, eval_id)
            assert row is not None
            if "name" in changes:
                row.name = changes["name"]
            if "metadata" in changes:
                row.metadata_ = changes["metadata"]
        return eval_object(self.get_eval(eval_id, owner))

    def delete_eval(self, eval_id: str, owner: str) -> None:
        self.get_eval(eval_id, owner)
        with self.session.begin() as s:
            runs = list(s.scalars(select(RunRow.id).where(RunRow.eval_id == eval_id)))
            s.execute(delete(OutputRow).where(OutputRow.run_id.in_(runs)))
            s.execute(delete(RunRow).where(RunRow.eval_id == eval_id))
            s.execute(delete(EvalRow).where(EvalRow.id == eval_id))

    # runs

    def add_run(self, row: RunRow) -> dict[str, Any]:
        with self.session.begin() as s:
            s.add(row)
        return self.run(row.id, row.owner, row.eval_id)

    def get_run(self, run_id: str, owner: str | None = None, eval_id: str | None = None) -> RunRow:
        with self.session() as s:
            row = s.get(RunRow, run_id)
        if (
            row is None
            or (owner is not None and row.owner != owner)
            or (eval_id is not None and row.eval_id != eval_id)
        ):
            raise NotFound(f"No such eval run: {run_id}", param="run_id")
        return row

    def run(self, run_id: str, owner: str, eval_id: str) -> dict[str, Any]:
        row = self.get_run(run_id, owner, eval_id)
        return run_object(row, self.counts(row))

    def list_runs(
        self, eval_id: str, owner: str, q: PageQuery, status: str | None
    ) -> dict[str, Any]:
        self.get_eval(eval_id, owner)
        with self.session() as s:
            stmt = select(RunRow).where(RunRow.eval_id == eval_id, RunRow.owner == owner)
            if status:
                stmt = stmt.where(RunRow.status == status)
            rows, more = page(s, stmt, RunRow.created_at, RunRow.id, q)
        return listing([run_object(r, self.counts(r)) for r in rows], more)

    def counts(self, row: RunRow) -> dict[str, Any]:
        with self.session() as s:
            by_status = dict(
                s.execute(
                    select(OutputRow.status, func.count())
                    .where(OutputRow.run_id == row.id)
                    .group_by(OutputRow.status)
                ).all()
            )
            results = list(s.scalars(select(OutputRow.results).where(OutputRow.run_id == row.id)))
        per: dict[str, dict[str, int]] = {}
        for item_results in results:
            for r in item_results:
                slot = per.setdefault(r["name"], {"passed": 0, "failed": 0})
                slot["passed" if r.get("passed") else "failed"] += 1
        return {
            "result_counts": {
                "total": sum(by_status.values()),
                "passed": by_status.get("pass", 0),
                "failed": by_status.get("fail", 0),
                "errored": by_status.get("error", 0),
            },
            "per_testing_criteria_results": [
                {"testing_criteria": name, **v} for name, v in per.items()
            ],
        }

    def cancel(self, run_id: str, owner: str, eval_id: str) -> dict[str, Any]:
        row = self.get_run(run_id, owner, eval_id)
        if row.status not in RUN_FINAL:
            with self.session.begin() as s:
                s.execute(update(RunRow).where(RunRow.id == run_id).values(cancel_requested=True))
                # Not started: cancelled now. Running: its worker stops within a heartbeat.
                s.execute(
                    update(RunRow)
                    .where(RunRow.id == run_id, RunRow.status == "queued")
                    .values(status="canceled")
                )
        return self.run(run_id, owner, eval_id)

    def delete_run(self, run_id: str, owner: str, eval_id: str) -> None:
        self.get_run(run_id, owner, eval_id)
        with self.session.begin() as s:
            s.execute(update(RunRow).where(RunRow.id == run_id).values(cancel_requested=True))
            s.execute(delete(OutputRow).where(OutputRow.run_id == run_id))
            s.execute(delete(RunRow).where(RunRow.id == run_id))

    def outputs(
        self, run_id: str, owner: str, eval_id: str, q: PageQuery, status: str | None
    ) -> dict[str, Any]:
        self.get_run(run_id, owner, eval_id)
        with self.session() as s:
            stmt = select(OutputRow).where(OutputRow.run_id == run_id)
            if status:
                stmt = stmt.where(OutputRow.status == status)
            rows, more = page(s, stmt, OutputRow.created_at, OutputRow.id, q)
        return listing([output_object(r) for r in rows], more)

    def output(self, item_id: str, run_id: str, owner: str, eval_id: str) -> dict[str, Any]:
        self.get_run(run_id, owner, eval_id)
        with self.session() as s:
            row = s.get(OutputRow, item_id)
        if row is None or row.run_id != run_id:
            raise NotFound(f"No such output item: {item_id}", param="output_item_id")
        return output_object(row)

    # the worker's side

    def claim(self, worker: str, stale_after: float) -> RunRow | None:
        """Take a queued run, or one whose worker went silent. One conditional UPDATE each."""
        now = time.time()
        runnable = or_(
            RunRow.status == "queued",
            and_(RunRow.status == "in_progress", RunRow.heartbeat_at < now - stale_after),
        )
        with self.session() as s:
            candidates = list(
                s.scalars(
                    select(RunRow.id)
                    .where(runnable, RunRow.cancel_requested.is_(False))
                    .order_by(RunRow.created_at)
                    .limit(5)
                )
            )
        for run_id in candidates:
            with self.session.begin() as s:
                took = s.execute(
                    update(RunRow)
                    .where(RunRow.id == run_id, runnable, RunRow.cancel_requested.is_(False))
                    .values(
                        status="in_progress",
                        worker=worker,
                        heartbeat_at=now,
                        attempts=RunRow.attempts + 1,
                    )
                ).rowcount
            if took:
                return self.get_run(run_id)
        return None

    def heartbeat(self, run_id: str, worker: str) -> bool:
        """Beat; whether the run should go on (not cancelled, deleted, or taken over)."""
        with self.session.begin() as s:
            s.execute(
                update(RunRow)
                .where(RunRow.id == run_id, RunRow.worker == worker)
                .values(heartbeat_at=time.time())
            )
            row = s.get(RunRow, run_id)
            return row is not None and not row.cancel_requested and row.worker == worker

    def done_indexes(self, run_id: str) -> set[int]:
        with self.session() as s:
            return set(s.scalars(select(OutputRow.item_index).where(OutputRow.run_id == run_id)))

    def add_output(self, row: OutputRow) -> bool:
        """Write an item's result once; False if it was already written."""
        from sqlalchemy.exc import IntegrityError

        try:
            with self.session.begin() as s:
                s.add(row)
        except IntegrityError:
            return False
        return True

    def add_usage(self, run_id: str, usage: dict[str, dict[str, int]]) -> None:
        with self.session.begin() as s:
            row = s.get(RunRow, run_id)
            if row is None:
                return
            merged = {m: dict(v) for m, v in (row.usage or {}).items()}
            for model, u in usage.items():
                slot = merged.setdefault(
                    model,
                    {
                        "invocation_count": 0,
                        "prompt_tokens": 0,
                        "completion_tokens": 0,
                        "total_tokens": 0,
                    },
                )
                for k, v in u.items():
                    slot[k] = slot.get(k, 0) + v
            row.usage = merged

    def finish(self, run_id: str, worker: str, status: str, error: dict[str, Any] | None) -> None:
        """End the run (if `worker` still holds it) and, in the same transaction, its usage
        record: the model calls and tokens of all its samples and graders."""
        with self.session.begin() as s:
            ended = s.execute(
                update(RunRow)
                .where(RunRow.id == run_id, RunRow.worker == worker)
                .values(status=status, error=error)
            ).rowcount
            row = s.get(RunRow, run_id)
            if ended and row is not None and s.get(UsageRow, run_id) is None:
                used = (row.usage or {}).values()
                s.add(
                    UsageRow(
                        id=run_id,
                        at=int(time.time()),
                        kind="eval_runs",
                        project_id=row.owner,
                        api_key_id=row.key_id,
                        model=row.model or "",
                        input_tokens=sum(u.get("prompt_tokens", 0) for u in used),
                        output_tokens=sum(u.get("completion_tokens", 0) for u in used),
                        input_cached_tokens=0,
                        requests=sum(u.get("invocation_count", 0) for u in used),
                    )
                )

    def latest_completed(
        self, eval_id: str, owner: str, models: list[str]
    ) -> tuple[str, float] | None:
        """(run id, share passed) of the eval's latest completed run on any of `models`."""
        with self.session() as s:
            row = s.scalars(
                select(RunRow)
                .where(
                    RunRow.eval_id == eval_id,
                    RunRow.owner == owner,
                    RunRow.status == "completed",
                    RunRow.model.in_(models),
                )
                .order_by(RunRow.created_at.desc())
                .limit(1)
            ).first()
        if row is None:
            return None
        counts = self.counts(row)["result_counts"]
        return row.id, counts["passed"] / counts["total"] if counts["total"] else 0.0

    def pass_rates(self, limit: int) -> list[tuple[str, str, float]]:
        """(eval name, model, share passed) of each eval's latest completed run per model."""
        with self.session() as s:
            latest = (
                select(RunRow.eval_id, RunRow.model, func.max(RunRow.created_at).label("at"))
                .where(RunRow.status == "completed")
                .group_by(RunRow.eval_id, RunRow.model)
                .subquery()
            )
            runs = s.execute(
                select(RunRow.id, EvalRow.name, RunRow.model)
                .join(
                    latest,
                    and_(RunRow.eval_id == latest.c.eval_id, RunRow.created_at == latest.c.at),
                )
                .join(EvalRow, EvalRow.id == RunRow.eval_id)
                .order_by(RunRow.created_at.desc())
                .limit(limit)
            ).all()
            out = []
            for run_id, name, model in runs:
                counts = dict(
                    s.execute(
                        select(OutputRow.status, func.count())
                        .where(OutputRow.run_id == run_id)
                        .group_by(OutputRow.status)
                    ).all()
                )
                total = sum(counts.values())
                if total:
                    out.append((name, model or "given", counts.get("pass", 0) / total))
        return out

    def status_counts(self) -> dict[str, int]:
        with self.session() as s:
            return dict(
                s.execute(select(RunRow.status, func.count()).group_by(RunRow.status)).all()
            )

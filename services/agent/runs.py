"""Agent runs and their steps in SQL (SQLite or PostgreSQL), scoped by owner.

A run row holds what the run was asked (messages, tools, stores, budgets, system prompt, all
fixed at creation) and how it ended; each step is appended as it completes, so a retrieve
during the run shows every step so far, and a crash loses at most the step in flight.
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
    insert,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.common import migrations
from services.common.db import make_engine, make_sessionmaker
from services.common.errors import NotFound
from services.common.pagination import PageQuery, listing, page

ACTIVE = ("queued", "in_progress")
FINAL = ("completed", "incomplete", "failed", "cancelled")


class Base(DeclarativeBase):
    pass


class RunRow(Base):
    __tablename__ = "agent_runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    key_id: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(256))
    mode: Mapped[str] = mapped_column(String(16))
    instructions: Mapped[str] = mapped_column(String(20_000))
    # Delimits untrusted text in this run's prompts (prompt.py); never shown to callers.
    nonce: Mapped[str] = mapped_column(String(32))
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    tools: Mapped[list[str]] = mapped_column(JSON)
    # "required": the first step must call a tool (say, search before answering); then "auto".
    tool_choice: Mapped[str] = mapped_column(String(16), default="auto", server_default="auto")
    vector_store_ids: Mapped[list[str]] = mapped_column(JSON)
    budgets: Mapped[dict[str, int]] = mapped_column(JSON)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    usage: Mapped[dict[str, int]] = mapped_column(JSON)
    # wall, model, tools and the loop's own time, in ms (the loop's is what the agent adds).
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)
    incomplete_details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(Integer, index=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    # The trace of the request that made it (its steps' spans are in it): `crucible trace`.
    trace_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


class StepRow(Base):
    __tablename__ = "agent_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("agent_runs.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


def new_run_id() -> str:
    return "run_" + secrets.token_hex(12)


def run_object(row: RunRow, steps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": row.id,
        "object": "agent.run",
        "created_at": row.created_at,
        "started_at": row.started_at,
        "completed_at": row.completed_at,
        "status": row.status,
        "model": row.model,
        "mode": row.mode,
        "instructions": row.instructions,
        "tools": row.tools,
        "tool_choice": row.tool_choice,
        "vector_store_ids": row.vector_store_ids,
        "budgets": row.budgets,
        "usage": row.usage,
        "timings": row.timings,
        "output": row.output,
        "incomplete_details": row.incomplete_details,
        "error": row.error,
        "metadata": row.metadata_,
        "trace_id": row.trace_id,
    }
    if steps is not None:
        obj["steps"] = steps
    return obj


class RunStore:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        migrations.upgrade(self.engine, "agent")
        self.sessions = make_sessionmaker(self.engine)

    def create(self, row: RunRow) -> RunRow:
        with self.sessions.begin() as s:
            s.add(row)
        return row

    def get(self, run_id: str, owner: str) -> RunRow:
        """The run, if it is the owner's; another owner's id is indistinguishable from none."""
        with self.sessions() as s:
            row = s.get(RunRow, run_id)
        if row is None or row.owner != owner:
            raise NotFound(f"No run found with id '{run_id}'.", param="run_id")
        return row

    def steps(self, run_id: str) -> list[dict[str, Any]]:
        stmt = select(StepRow.data).where(StepRow.run_id == run_id).order_by(StepRow.index)
        with self.sessions() as s:
            return list(s.scalars(stmt).all())

    def add_steps(self, run_id: str, steps: list[dict[str, Any]], usage: dict[str, int]) -> bool:
        """Append steps and the usage so far in one transaction; returns whether a cancel was
        requested (by any process), so the loop needs no query of its own for it."""
        rows = [{"run_id": run_id, "index": st["index"], "data": st} for st in steps]
        with self.engine.begin() as c:  # Core, not the ORM: this runs beside the loop
            c.execute(insert(StepRow), rows)
            flag = c.execute(
                update(RunRow)
                .where(RunRow.id == run_id)
                .values(usage=usage)
                .returning(RunRow.cancel_requested)
            ).scalar()
        return bool(flag)

    def start(self, run_id: str) -> None:
        with self.sessions.begin() as s:
            s.execute(
                update(RunRow)
                .where(RunRow.id == run_id, RunRow.status == "queued")
                .values(status="in_progress", started_at=time.time())
            )

    def finish(self, run_id: str, status: str, **values: Any) -> RunRow:
        """The run's end state; a run ends once (a later call changes nothing)."""
        with self.sessions.begin() as s:
            s.execute(
                update(RunRow)
                .where(RunRow.id == run_id, RunRow.status.in_(ACTIVE))
                .values(status=status, completed_at=time.time(), **values)
            )
            row = s.get(RunRow, run_id)
        assert row is not None
        return row

    def request_cancel(self, run_id: str, owner: str) -> RunRow:
        self.get(run_id, owner)
        with self.sessions.begin() as s:
            s.execute(update(RunRow).where(RunRow.id == run_id).values(cancel_requested=True))
        return self.get(run_id, owner)

    def list_runs(self, owner: str, q: PageQuery) -> dict[str, Any]:
        with self.sessions() as s:
            stmt = select(RunRow).where(RunRow.owner == owner)
            rows, more = page(s, stmt, RunRow.created_at, RunRow.id, q)
        return listing([run_object(r) for r in rows], more)

    def ended_since(self, since: float, limit: int) -> list[dict[str, Any]]:
        """Usage records of the runs that ended at or after `since`, oldest first (the finetune
        service keeps them, once each by run id, for `/v1/organization/usage/agent_runs`)."""
        stmt = (
            select(RunRow)
            .where(RunRow.completed_at >= since, RunRow.status.in_(FINAL))
            .order_by(RunRow.completed_at, RunRow.id)
            .limit(limit)
        )
        with self.sessions() as s:
            rows = list(s.scalars(stmt))
        return [
            {
                "id": r.id,
                "at": int(r.completed_at or 0),
                "ended_at": r.completed_at,
                "kind": "agent_runs",
                "project_id": r.owner,
                "api_key_id": r.key_id,
                "model": r.model,
                "input_tokens": r.usage.get("prompt_tokens", 0),
                "output_tokens": r.usage.get("completion_tokens", 0),
                "requests": r.usage.get("model_calls", 0),
                "tool_calls": r.usage.get("tool_calls", 0),
                "tool_seconds": (r.timings or {}).get("tools_ms", 0.0) / 1000,
            }
            for r in rows
        ]

    def interrupted(self) -> list[str]:
        """Runs left active by a previous process (it stopped mid-run)."""
        with self.sessions() as s:
            return list(s.scalars(select(RunRow.id).where(RunRow.status.in_(ACTIVE))).all())

"""Projects: what keys belong to, and what every object in Crucible is scoped by (files, vector
stores, fine-tuning jobs and their models, stored completions, evals, aliases, agent runs).
Shaped as OpenAI's organization projects: created, renamed, listed, archived (an archived
project's keys are revoked with it, and no key can be made in it)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select, update

from services.common.errors import Conflict, NotFound
from services.gateway import audit
from services.gateway.keys import (
    ApiKeyRow,
    BudgetTokens,
    BudgetUsd,
    KeyStore,
    Period,
    _epoch,
    usd,
    usd_micros,
)
from services.gateway.tables import ProjectRow

Name = Annotated[str, Field(min_length=1, max_length=256)]


class ProjectUpdate(BaseModel):
    """`POST /admin/projects/{id}`: the fields sent, and only those."""

    model_config = ConfigDict(extra="forbid")
    name: Name | None = None
    budget_tokens: BudgetTokens | None = None  # per period, all its keys together (null: none)
    budget_usd: BudgetUsd | None = None  # per period, at the gateway's price list (null: none)
    budget_period: Period = "month"

    def columns(self, exclude_unset: bool = False) -> dict[str, Any]:
        """The row's columns this sets (dollars kept as micro-dollars)."""
        fields = self.model_dump(exclude_unset=exclude_unset)
        if "budget_usd" in fields:
            fields["budget_usd_micros"] = usd_micros(fields.pop("budget_usd"))
        return fields

    @field_validator("name")
    @classmethod
    def _named(cls, name: str | None) -> str:
        if name is None:
            raise ValueError("a project keeps a name")
        return name


class ProjectCreate(ProjectUpdate):
    """`POST /admin/projects`."""

    name: Name


def describe(row: ProjectRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "organization.project",
        "name": row.name,
        "created_at": _epoch(row.created_at),
        "archived_at": _epoch(row.archived_at),
        "status": "archived" if row.archived_at is not None else "active",
        "budget_tokens": row.budget_tokens,
        "budget_usd": usd(row.budget_usd_micros),
        "budget_period": row.budget_period,
    }


class Projects:
    """In the gateway's database, beside the keys (one transaction archives a project and
    revokes its keys)."""

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys
        self.sessions = keys.sessions

    def create(self, body: ProjectCreate, actor: audit.Actor = audit.OPERATOR) -> dict[str, Any]:
        row = ProjectRow(
            id="proj_" + secrets.token_hex(12), created_at=datetime.now(UTC), **body.columns()
        )
        with self.sessions.begin() as s:
            s.add(row)
            s.flush()
            audit.add(s, actor, "project.create", row.id, body.model_dump())
            out = describe(row)
        self.keys.forget()
        return out

    def list(self, include_archived: bool = False) -> list[dict[str, Any]]:
        stmt = select(ProjectRow).order_by(ProjectRow.created_at, ProjectRow.id)
        if not include_archived:
            stmt = stmt.where(ProjectRow.archived_at.is_(None))
        with self.sessions() as s:
            return [describe(row) for row in s.scalars(stmt)]

    def get(self, project_id: str) -> dict[str, Any]:
        with self.sessions() as s:
            return describe(self._row(s, project_id))

    def update(
        self, project_id: str, body: ProjectUpdate, actor: audit.Actor = audit.OPERATOR
    ) -> dict[str, Any]:
        """Change what `body` sets (its name, its budget): at once in this gateway process,
        in the others within their key cache's TTL."""
        changes = body.model_dump(exclude_unset=True)
        with self.sessions.begin() as s:
            row = self._row(s, project_id)
            for field, value in body.columns(exclude_unset=True).items():
                setattr(row, field, value)
            audit.add(s, actor, "project.update", project_id, changes)
            out = describe(row)
        self.keys.forget()
        return out

    def archive(self, project_id: str, actor: audit.Actor = audit.OPERATOR) -> dict[str, Any]:
        """Archive a project and revoke its keys; its objects stay (an admin can still export
        them). Archiving again changes nothing; an admin key's own project is refused."""
        with self.sessions.begin() as s:
            row = self._row(s, project_id)
            own = s.get(ApiKeyRow, actor[0])
            if own is not None and own.owner == project_id:
                raise Conflict(
                    "an admin key cannot archive its own project (it would be revoked with it): "
                    "use an admin key of another project, or `crucible projects archive`",
                    param="project_id",
                )
            if row.archived_at is None:
                now = datetime.now(UTC)
                row.archived_at = now
                revoked = s.execute(
                    update(ApiKeyRow)
                    .where(ApiKeyRow.owner == project_id, ApiKeyRow.revoked_at.is_(None))
                    .values(revoked_at=now)
                ).rowcount
                audit.add(s, actor, "project.archive", project_id, {"keys_revoked": revoked})
            out = describe(row)
        self.keys.forget()
        return out

    @staticmethod
    def _row(s: Any, project_id: str) -> ProjectRow:
        row = s.get(ProjectRow, project_id)
        if row is None:
            raise NotFound(f"no project {project_id[:128]!r}", param="project_id")
        return row

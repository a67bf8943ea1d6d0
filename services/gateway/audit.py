"""The audit log: who changed what, when. Key changes are recorded in the transaction that makes
them (through the API or `crucible keys`); admin exports and purges, model deletions, and alias
changes forwarded to the finetune service, when they succeed. Never a key, a secret or a body:
an action, its target's id or name, and for key changes the fields set (limits, not secrets)."""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import JSON, Float, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from services.common.pagination import PageQuery, listing, page
from services.gateway.tables import Base

Actor = tuple[str, str]  # (key id, that key's owner)
OPERATOR: Actor = ("cli", "")  # `crucible keys`: an operator on the host


class AuditRow(Base):
    __tablename__ = "audit_log"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    actor: Mapped[str] = mapped_column(String(32))  # a key id, or "cli"
    actor_owner: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(256))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


def add(
    s: Session, actor: Actor, action: str, target: str, detail: dict[str, Any] | None = None
) -> None:
    """Record an action in the caller's transaction."""
    s.add(
        AuditRow(
            id="audit_" + secrets.token_hex(12),
            at=time.time(),
            actor=actor[0][:32],
            actor_owner=actor[1][:128],
            action=action,
            target=target[:256],
            detail=detail,
        )
    )


def event_object(row: AuditRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "audit.event",
        "created_at": row.at,
        "actor": row.actor,
        "actor_owner": row.actor_owner,
        "action": row.action,
        "target": row.target,
        "detail": row.detail,
    }


class AuditLog:
    def __init__(self, sessions: Any) -> None:
        self.sessions = sessions

    def record(
        self, actor: Actor, action: str, target: str, detail: dict[str, Any] | None = None
    ) -> None:
        with self.sessions.begin() as s:
            add(s, actor, action, target, detail)

    def events(
        self, q: PageQuery, action: str | None = None, target: str | None = None
    ) -> dict[str, Any]:
        stmt = select(AuditRow)
        if action is not None:
            stmt = stmt.where(AuditRow.action == action)
        if target is not None:
            stmt = stmt.where(AuditRow.target == target)
        with self.sessions() as s:
            rows, more = page(s, stmt, AuditRow.at, AuditRow.id, q)
            return listing([event_object(r) for r in rows], more)


# Alias changes forwarded to the finetune service that the log records: (method, what follows
# the alias's name in the path) → action.
ALIAS_ACTIONS = {
    ("POST", ""): "alias.update",
    ("DELETE", ""): "alias.delete",
    ("POST", "promote"): "alias.promote",
    ("POST", "rollback"): "alias.rollback",
}
ALIASES = "/v1/model_aliases"


def forwarded_action(method: str, path: str) -> tuple[str, str] | None:
    """(action, target) of a forwarded change the log records, else None. An alias's create
    has an empty target here: the caller takes the name from the body."""
    if path == ALIASES and method == "POST":
        return "alias.create", ""
    if not path.startswith(ALIASES + "/"):
        return None
    name, _, rest = path[len(ALIASES) + 1 :].partition("/")
    action = ALIAS_ACTIONS.get((method, rest))
    return (action, name) if action else None

"""Model aliases: a stable name an owner's apps call, routed by weight to its targets.

Every change is an immutable revision (who, when, why); the alias points at its current one.
The gateways read the current table (`table`) every second and route by it; they report each
aliased request's outcome through an outbox stream, kept here per second (`StatsRow`), and the
guard (`guard_round`) rolls a revision back by itself when a target it raised crosses a bar.

A revision changes only by a compare-and-set on the alias's revision number, so two changes at
once (a person's promote and the guard's rollback) never both apply: the second is a 409.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from services.common.errors import Conflict, NotFound
from services.common.pagination import PageQuery, page_of
from services.finetune.jobs import Base

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PIN = "@"  # "alias@target": a request pinned to one target, weight 0 included
# Latency buckets (ms, upper bounds) the gateways report in; the p95 is read from them.
BUCKETS_MS = (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 300_000)
ROLLBACKS = ("rollback", "auto_rollback")


class AliasRow(Base):
    __tablename__ = "model_aliases"
    __table_args__ = (UniqueConstraint("owner", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    revision: Mapped[int] = mapped_column(Integer)


class RevisionRow(Base):
    __tablename__ = "model_alias_revisions"
    __table_args__ = (UniqueConstraint("alias_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alias_id: Mapped[str] = mapped_column(
        ForeignKey("model_aliases.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    actor: Mapped[str] = mapped_column(String(64))  # a key id, or "guard"
    action: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # routes, sticky, gate, guard
    restored: Mapped[int | None] = mapped_column(Integer, nullable=True)
    evidence: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class StatsRow(Base):
    """What the gateways saw of one target of one revision, one batch of the stream at a time."""

    __tablename__ = "model_alias_stats"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alias_id: Mapped[str] = mapped_column(String(40), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    target: Mapped[str] = mapped_column(String(256))
    at: Mapped[float] = mapped_column(Float, index=True)
    requests: Mapped[int] = mapped_column(Integer)
    errors: Mapped[int] = mapped_column(Integer)  # 5xx answered to the client
    unavailable: Mapped[int] = mapped_column(Integer)  # chosen, but no server had it loaded
    buckets: Mapped[list[int]] = mapped_column(JSON)  # latency counts per BUCKETS_MS (+ over)


# Each alias with its current revision.
CURRENT = select(AliasRow, RevisionRow).join(
    RevisionRow,
    (RevisionRow.alias_id == AliasRow.id) & (RevisionRow.number == AliasRow.revision),
)


def shares(routes: list[dict[str, Any]]) -> dict[str, float]:
    total = sum(r["weight"] for r in routes)
    return {r["model"]: r["weight"] / total for r in routes}


def raised(before: dict[str, Any] | None, after: dict[str, Any]) -> list[str]:
    """The candidates a change raises (a share up, the incumbent, heaviest before, aside):
    what a gate must clear and a guard watches. Shrinking a canary raises nothing."""
    old = shares(before["routes"]) if before else {}
    incumbent = max(old, key=lambda m: old[m]) if old else None
    return [
        m
        for m, v in shares(after["routes"]).items()
        if v > old.get(m, 0.0) + 1e-9 and m != incumbent
    ]


def promoted(config: dict[str, Any], model: str, weight: float) -> dict[str, Any]:
    """`model` at `weight`% of the traffic, the others sharing the rest as they did (at 100%,
    they stay listed at weight 0: reachable pinned, and one rollback away)."""
    others = [x for x in config["routes"] if x["model"] != model]
    rest = sum(x["weight"] for x in others)
    left = 100 - weight
    routes = [{"model": model, "weight": weight}] + [
        {"model": x["model"], "weight": round(x["weight"] / rest * left, 4) if rest else 0}
        for x in others
    ]
    return {**config, "routes": routes}


def alias_object(row: AliasRow, rev: RevisionRow) -> dict[str, Any]:
    c = rev.config
    return {
        "id": row.id,
        "object": "model_alias",
        "name": row.name,
        "created_at": int(row.created_at),
        "updated_at": int(rev.created_at),
        "revision": rev.number,
        "routes": c["routes"],
        "shares": {m: round(v, 4) for m, v in shares(c["routes"]).items()},
        "sticky": c["sticky"],
        "gate": c.get("gate"),
        "guard": c.get("guard"),
    }


def revision_object(rev: RevisionRow) -> dict[str, Any]:
    return {
        "id": f"rev_{rev.number}",
        "object": "model_alias.revision",
        "number": rev.number,
        "created_at": int(rev.created_at),
        "actor": rev.actor,
        "action": rev.action,
        "reason": rev.reason,
        "forced": rev.forced,
        "restored": rev.restored,
        "evidence": rev.evidence,
        **{k: rev.config.get(k) for k in ("routes", "sticky", "gate", "guard")},
    }


def p95(buckets: list[int]) -> float | None:
    """The 95th percentile's bucket bound (ms); past the last bound, infinity."""
    total = sum(buckets)
    if not total:
        return None
    seen = 0
    for bound, n in zip((*BUCKETS_MS, float("inf")), buckets, strict=False):
        seen += n
        if seen >= 0.95 * total:
            return float(bound)
    return float("inf")


def bucket_of(ms: float) -> int:
    for i, bound in enumerate(BUCKETS_MS):
        if ms <= bound:
            return i
    return len(BUCKETS_MS)


class AliasStore:
    def __init__(self, sessions: Any) -> None:
        self.session = sessions

    # --- reading --------------------------------------------------------------------------

    def _get(self, s: Any, owner: str, name: str) -> tuple[AliasRow, RevisionRow]:
        row = s.scalars(
            select(AliasRow).where(AliasRow.owner == owner, AliasRow.name == name)
        ).first()
        if row is None:
            raise NotFound(f"No model alias named '{name}'.", param="alias")
        rev = s.scalars(
            select(RevisionRow).where(
                RevisionRow.alias_id == row.id, RevisionRow.number == row.revision
            )
        ).one()
        return row, rev

    def get(self, owner: str, name: str) -> tuple[AliasRow, RevisionRow]:
        with self.session() as s:
            return self._get(s, owner, name)

    def exists(self, owner: str, name: str) -> bool:
        with self.session() as s:
            return (
                s.scalar(
                    select(func.count())
                    .select_from(AliasRow)
                    .where(AliasRow.owner == owner, AliasRow.name == name)
                )
                or 0
            ) > 0

    def of_owner(self, owner: str) -> list[dict[str, Any]]:
        with self.session() as s:
            rows = s.execute(CURRENT.where(AliasRow.owner == owner).order_by(AliasRow.name)).all()
        return [alias_object(a, r) for a, r in rows]

    def current(self, limit: int) -> list[tuple[AliasRow, RevisionRow]]:
        """Aliases with their current revision (the `limit` most recently changed)."""
        with self.session() as s:
            rows = s.execute(CURRENT.order_by(RevisionRow.created_at.desc()).limit(limit)).all()
        return [(a, r) for a, r in rows]

    def table(self) -> list[dict[str, Any]]:
        """Every alias's current routing, for the gateways."""
        with self.session() as s:
            rows = s.execute(CURRENT).all()
        return [
            {
                "id": a.id,
                "owner": a.owner,
                "name": a.name,
                "revision": r.number,
                "created": int(a.created_at),
                "routes": r.config["routes"],
                "sticky": r.config["sticky"],
            }
            for a, r in rows
        ]

    def revisions(self, owner: str, name: str, q: PageQuery) -> dict[str, Any]:
        """Every revision, as OpenAI lists (newest first by default, `after` a revision's id)."""
        with self.session() as s:
            row, _ = self._get(s, owner, name)
            revs = s.scalars(
                select(RevisionRow)
                .where(RevisionRow.alias_id == row.id)
                .order_by(RevisionRow.number)
            ).all()
        return page_of([revision_object(r) for r in revs], q)

    def revision(self, alias_id: str, number: int) -> RevisionRow | None:
        with self.session() as s:
            found: RevisionRow | None = s.scalars(
                select(RevisionRow).where(
                    RevisionRow.alias_id == alias_id, RevisionRow.number == number
                )
            ).first()
            return found

    # --- changing -------------------------------------------------------------------------

    def create(
        self, owner: str, name: str, config: dict[str, Any], actor: str, reason: str | None
    ) -> dict[str, Any]:
        now = time.time()
        row = AliasRow(
            id=f"alias_{uuid.uuid4().hex[:24]}", owner=owner, name=name, created_at=now, revision=1
        )
        rev = RevisionRow(
            alias_id=row.id,
            number=1,
            created_at=now,
            actor=actor,
            action="create",
            reason=reason,
            forced=False,
            config=config,
        )
        try:
            with self.session.begin() as s:
                s.add(row)
                s.flush()
                s.add(rev)
        except IntegrityError:
            raise Conflict(f"A model alias named '{name}' already exists.", param="name") from None
        return alias_object(row, rev)

    def change(
        self,
        row: AliasRow,
        current: RevisionRow,
        config: dict[str, Any],
        actor: str,
        action: str,
        reason: str | None,
        *,
        forced: bool = False,
        restored: int | None = None,
        evidence: dict[str, Any] | None = None,
    ) -> tuple[AliasRow, RevisionRow]:
        """A new revision, if the alias is still at `current` (else 409: it changed meanwhile)."""
        number = current.number + 1
        rev = RevisionRow(
            alias_id=row.id,
            number=number,
            created_at=time.time(),
            actor=actor,
            action=action,
            reason=reason,
            forced=forced,
            config=config,
            restored=restored,
            evidence=evidence,
        )
        try:
            with self.session.begin() as s:
                moved = s.execute(
                    update(AliasRow)
                    .where(AliasRow.id == row.id, AliasRow.revision == current.number)
                    .values(revision=number)
                ).rowcount
                if moved != 1:
                    raise IntegrityError("revision moved", None, Exception())
                s.add(rev)
        except IntegrityError:
            raise Conflict(
                f"The alias '{row.name}' changed meanwhile (now past revision "
                f"{current.number}); read it again and retry.",
                code="revision_conflict",
            ) from None
        row.revision = number
        return row, rev

    def rollback_target(self, row: AliasRow, current: RevisionRow, to: int | None) -> RevisionRow:
        """The revision a rollback restores: `to`, or the one before the current revision's
        own (so rolling back twice goes two steps back, not back and forth)."""
        if to is None:
            base = current.restored if current.action in ROLLBACKS else current.number
            to = (base or current.number) - 1
        target = self.revision(row.id, to) if 1 <= to < current.number else None
        if target is None:
            raise Conflict(
                f"The alias '{row.name}' has no revision {to} to roll back to.",
                param="revision",
                code="no_earlier_revision",
            )
        return target

    def delete(self, owner: str, name: str) -> None:
        with self.session.begin() as s:
            row, _ = self._get(s, owner, name)
            s.execute(delete(RevisionRow).where(RevisionRow.alias_id == row.id))
            s.execute(delete(StatsRow).where(StatsRow.alias_id == row.id))
            s.delete(row)

    # --- what the gateways saw ------------------------------------------------------------

    def ingest(self, records: Sequence[dict[bytes, bytes]]) -> None:
        """One outbox batch of request outcomes, summed per (alias, revision, target). (A batch
        redelivered after a crash counts twice: a guard's window tolerates that.)"""
        sums: dict[tuple[str, int, str], StatsRow] = {}
        now = time.time()
        for record in records:
            try:
                meta = orjson.loads(record[b"meta"])
                k = (str(meta["alias_id"]), int(meta["revision"]), str(meta["target"])[:256])
                status, ms = int(meta["status"]), float(meta["ms"])
            except (KeyError, TypeError, ValueError, orjson.JSONDecodeError):
                continue
            row = sums.get(k)
            if row is None:
                row = sums[k] = StatsRow(
                    alias_id=k[0],
                    revision=k[1],
                    target=k[2],
                    at=now,
                    requests=0,
                    errors=0,
                    unavailable=0,
                    buckets=[0] * (len(BUCKETS_MS) + 1),
                )
            row.requests += 1
            row.errors += status >= 500
            row.unavailable += bool(meta.get("unavailable"))
            row.buckets[bucket_of(ms)] += 1
        if sums:
            with self.session.begin() as s:
                s.add_all(sums.values())

    def observed(self, alias_id: str, revision: int, target: str, since: float) -> dict[str, Any]:
        with self.session() as s:
            rows = s.execute(
                select(
                    StatsRow.requests, StatsRow.errors, StatsRow.unavailable, StatsRow.buckets
                ).where(
                    StatsRow.alias_id == alias_id,
                    StatsRow.revision == revision,
                    StatsRow.target == target,
                    StatsRow.at >= since,
                )
            ).all()
        buckets = [0] * (len(BUCKETS_MS) + 1)
        for *_, b in rows:
            buckets = [x + y for x, y in zip(buckets, b, strict=False)]
        return {
            "requests": sum(r[0] for r in rows),
            "errors": sum(r[1] for r in rows),
            "unavailable": sum(r[2] for r in rows),
            "p95_ms": p95(buckets),
        }

    def prune(self, before: float) -> None:
        with self.session.begin() as s:
            s.execute(delete(StatsRow).where(StatsRow.at < before))

    def guarded(self) -> list[tuple[AliasRow, RevisionRow, RevisionRow | None]]:
        """Aliases with a guard, their current revision and the one before it."""
        out = []
        with self.session() as s:
            rows = s.execute(CURRENT).all()
            for a, r in rows:
                if r.config.get("guard") and r.number > 1:
                    before = s.scalars(
                        select(RevisionRow).where(
                            RevisionRow.alias_id == a.id, RevisionRow.number == r.number - 1
                        )
                    ).first()
                    out.append((a, r, before))
        return out

"""Usage records: the tokens of every request an engine served, kept once each, and the queries
behind OpenAI's Usage API (usage_api.py: `GET /v1/organization/usage/completions`,
`/embeddings`, as the reference schema has them), with storage, runs and costs beside them.

The gateway hands a record per served request to the usage outbox (services/common/outbox.py):
chat, completions and responses with the tokens their answer reported, embeddings with those
the retrieval service counted. This service's consumer stores it under the record's own id, so
a batch delivered twice is kept once. Runs are recorded whole when they end, under their own
ids: an eval run in the transaction that ends it (evals.py), an agent run read from the agent
service's finished runs (`collect_agent_runs`, re-reading an overlap, kept once by id). A run's
model calls are also among the completions (they went through the gateway): a run's record says
what the run as a whole used (steps, tool time), and costs count the calls once.

Buckets are summed in SQL: `(at - start_time) // width` groups a record into its bucket on
SQLite and PostgreSQL alike (whole seconds, never negative).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import orjson
from sqlalchemy import BigInteger, Float, Index, Integer, String, func, select
from sqlalchemy.orm import Mapped, mapped_column

from services.finetune.jobs import Base, JobRow

WIDTHS = {"1m": 60, "1h": 3600, "1d": 86_400}
# The widths each report allows and OpenAI's bounds on `limit` (buckets per page) for each:
# (default, max). Costs come in days only.
_TOKENS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
LIMITS = {
    "completions": _TOKENS,
    "embeddings": _TOKENS,
    "vector_stores": _TOKENS,
    "agent_runs": _TOKENS,
    "eval_runs": _TOKENS,
    "costs": {"1d": (7, 180)},
}
# What each may be grouped by (OpenAI's enums); a record has project_id, api_key_id and model.
_COMMON = ("project_id", "user_id", "api_key_id", "model")
GROUPS = {
    "completions": (*_COMMON, "batch", "service_tier", "api_source"),
    "embeddings": _COMMON,
    "vector_stores": ("project_id",),
    "agent_runs": ("project_id", "api_key_id", "model"),
    "eval_runs": ("project_id", "api_key_id", "model"),
    "costs": ("project_id", "line_item"),
}
# The records an engine's time and a request's tokens are in (a run's record repeats its calls').
SERVED = ("completions", "embeddings")
COLUMNS = ("project_id", "api_key_id", "model")
PAGE_RE = re.compile(r"^page_(\d{1,12})$")
LATEST = 10**12  # seconds since the epoch a query may name (beyond: a typo, or milliseconds)


class UsageRow(Base):
    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_records_kind_at", "kind", "at"),)  # what a query reads

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the gateway's, per request
    at: Mapped[int] = mapped_column(BigInteger)  # when it finished, epoch seconds
    # completions | embeddings | vector_stores | agent_runs | eval_runs
    kind: Mapped[str] = mapped_column(String(16))
    project_id: Mapped[str] = mapped_column(String(128), index=True)
    api_key_id: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(256))
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    input_cached_tokens: Mapped[int] = mapped_column(Integer)
    # Its share of the engine's busy time (the gateway's processor-sharing clock; embeddings:
    # the seconds the model took): what the cost model prices.
    engine_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    # A storage snapshot (kind "vector_stores"): the bytes the project's vector stores held.
    usage_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # A run's: its model calls (an agent's steps, an eval's invocations), its tool calls, and
    # the seconds its tools took.
    requests: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    tool_calls: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    tool_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


class UsageStore:
    def __init__(self, sessions: Any) -> None:
        self.sessions = sessions

    def ingest(self, records: Sequence[dict[bytes, bytes]]) -> int:
        """One outbox batch; returns how many records were new (a redelivered one is not)."""
        found = []
        for record in records:
            try:
                found.append(orjson.loads(record[b"meta"]))
            except (KeyError, orjson.JSONDecodeError):
                continue  # not a usage record: nothing to keep
        return self.keep(found)

    def keep(self, records: Sequence[dict[str, Any]]) -> int:
        """Records as dicts (the outbox's, or runs'); returns how many were new."""
        rows: dict[str, UsageRow] = {}
        for m in records:
            try:
                row = UsageRow(
                    id=str(m["id"])[:40],
                    at=int(m["at"]),
                    kind=str(m.get("kind") or "completions")[:16],
                    project_id=str(m["project_id"])[:128],
                    api_key_id=str(m["api_key_id"])[:32],
                    model=str(m["model"])[:256],
                    input_tokens=max(int(m["input_tokens"]), 0),
                    output_tokens=max(int(m["output_tokens"]), 0),
                    input_cached_tokens=max(int(m.get("input_cached_tokens") or 0), 0),
                    engine_seconds=max(float(m.get("engine_s") or 0.0), 0.0),
                    requests=max(int(m.get("requests") or 0), 0),
                    tool_calls=max(int(m.get("tool_calls") or 0), 0),
                    tool_seconds=max(float(m.get("tool_seconds") or 0.0), 0.0),
                )
            except (KeyError, TypeError, ValueError):
                continue  # not a usage record: nothing to keep
            rows[row.id] = row
        if not rows:
            return 0
        with self.sessions.begin() as s:
            seen = set(s.scalars(select(UsageRow.id).where(UsageRow.id.in_(list(rows)))))
            new = [r for i, r in rows.items() if i not in seen]
            s.add_all(new)
        return len(new)

    def last(self, kind: str) -> int:
        """When the latest record of `kind` was made (0: none yet)."""
        with self.sessions() as s:
            return int(s.scalar(select(func.max(UsageRow.at)).where(UsageRow.kind == kind)) or 0)

    def buckets(
        self,
        kind: str,
        start: int,
        end: int,
        width: int,
        limit: int,
        group_by: Sequence[str],
        filters: dict[str, list[str]],
    ) -> dict[str, Any]:
        """OpenAI's UsageResponse: `limit` buckets of `width` seconds from `start` (before
        `end`), each with one result per group (an empty list for a bucket without use)."""
        page = Page(start, end, width, limit)
        bucket = ((UsageRow.at - start) // width).label("bucket")
        groups = [getattr(UsageRow, g) for g in group_by if g in COLUMNS]
        summed = (
            UsageRow.input_tokens,
            UsageRow.output_tokens,
            UsageRow.input_cached_tokens,
            UsageRow.engine_seconds,
            UsageRow.requests,
            UsageRow.tool_calls,
            UsageRow.tool_seconds,
        )
        stmt = (
            select(bucket, *groups, *(func.sum(c) for c in summed), func.count())
            .where(UsageRow.at >= start, UsageRow.at < page.stop, UsageRow.kind == kind)
            .group_by(bucket, *groups)
            .order_by(bucket, *groups)
        )
        for field, values in filters.items():
            stmt = stmt.where(getattr(UsageRow, field).in_(values))
        results: dict[int, list[dict[str, Any]]] = {}
        with self.sessions() as s:
            for row in s.execute(stmt):
                named = dict(zip([g.key for g in groups], row[1 : 1 + len(groups)], strict=True))
                sums = dict(zip((c.key for c in summed), row[1 + len(groups) : -1], strict=True))
                result = _result(kind, {k: v or 0 for k, v in sums.items()}, int(row[-1]), group_by)
                result |= {g: named.get(g) for g in GROUPS[kind]}
                results.setdefault(int(row[0]), []).append(result)
        return page.response(results)

    def costs(
        self,
        start: int,
        end: int,
        limit: int,
        group_by: Sequence[str],
        filters: dict[str, list[str]],
        usd_per_second: float,
        hosted: dict[str, dict[str, float]],
    ) -> dict[str, Any]:
        """OpenAI's costs page: day buckets, each with the cost of its engine time (fine-tuning
        jobs: their training time) at `usd_per_second`, per project and/or line item (`<model>,
        <kind>`, `<model>, fine-tuning`), and beside it what the same tokens would have cost at
        the `hosted` prices (USD per million tokens; trained tokens at "training")."""
        page = Page(start, end, 86_400, limit)
        bucket = ((UsageRow.at - start) // 86_400).label("bucket")
        cols = (UsageRow.project_id, UsageRow.model, UsageRow.kind)
        stmt = (
            select(
                bucket,
                *cols,
                func.sum(UsageRow.input_tokens),
                func.sum(UsageRow.output_tokens),
                func.sum(UsageRow.engine_seconds),
            )
            .where(UsageRow.at >= start, UsageRow.at < page.stop, UsageRow.kind.in_(SERVED))
            .group_by(bucket, *cols)
        )
        for field, values in filters.items():
            stmt = stmt.where(getattr(UsageRow, field).in_(values))
        # Fine-tuning jobs, on the day they ended: their training seconds, their trained tokens
        # at the hosted price list's "training" price.
        jobs = select(
            ((JobRow.finished_at - start) // 86_400).label("bucket"),
            JobRow.owner,
            JobRow.model,
            JobRow.trained_tokens,
            JobRow.train_seconds,
        ).where(JobRow.finished_at >= start, JobRow.finished_at < page.stop)
        if "project_id" in filters:
            jobs = jobs.where(JobRow.owner.in_(filters["project_id"]))
        sums: dict[tuple[int, str | None, str | None], list[float]] = {}

        def add(b: int, project: str, item: str, seconds: float, equivalent: float) -> None:
            key = (
                b,
                project if "project_id" in group_by else None,
                item if "line_item" in group_by else None,
            )
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0] += seconds
            acc[1] += equivalent

        with self.sessions() as s:
            for b, project, model, kind, tokens_in, tokens_out, seconds in s.execute(stmt):
                price = hosted.get(model) or hosted.get("*") or {}
                equivalent = (
                    int(tokens_in or 0) * price.get("input", 0.0)
                    + int(tokens_out or 0) * price.get("output", 0.0)
                ) / 1e6
                add(int(b), project, f"{model}, {kind}", float(seconds or 0.0), equivalent)
            for b, project, model, trained, seconds in s.execute(jobs):
                price = hosted.get(model) or hosted.get("*") or {}
                equivalent = int(trained or 0) * price.get("training", 0.0) / 1e6
                add(int(b), project, f"{model}, fine-tuning", float(seconds or 0.0), equivalent)
        results: dict[int, list[dict[str, Any]]] = {}
        for (b, project, line_item), (seconds, equivalent) in sorted(
            sums.items(), key=lambda kv: (kv[0][0], kv[0][1] or "", kv[0][2] or "")
        ):
            results.setdefault(b, []).append(
                {
                    "object": "organization.costs.result",
                    "amount": {"value": round(seconds * usd_per_second, 8), "currency": "usd"},
                    "line_item": line_item,
                    "project_id": project,
                    # Crucible's own: the engine time priced, and a hosted API's price for
                    # the same tokens (null without a price list).
                    "engine_seconds": round(seconds, 6),
                    "hosted_equivalent": (
                        {"value": round(equivalent, 8), "currency": "usd"} if hosted else None
                    ),
                }
            )
        return page.response(results)

    def snapshot(self, bytes_by_project: dict[str, int], at: int | None = None) -> int:
        """Record what each project's vector stores hold now; returns how many were recorded."""
        now = int(time.time()) if at is None else at
        rows = [
            UsageRow(
                id="vs-" + uuid.uuid4().hex,
                at=now,
                kind="vector_stores",
                project_id=project,
                api_key_id="",
                model="",
                input_tokens=0,
                output_tokens=0,
                input_cached_tokens=0,
                usage_bytes=max(int(used), 0),
            )
            for project, used in bytes_by_project.items()
        ]
        if rows:
            with self.sessions.begin() as s:
                s.add_all(rows)
        return len(rows)

    def storage(
        self,
        start: int,
        end: int,
        width: int,
        limit: int,
        group_by: Sequence[str],
        filters: dict[str, list[str]],
    ) -> dict[str, Any]:
        """OpenAI's vector-store usage: per bucket, the bytes held (the largest snapshot of each
        project in it), per project or summed."""
        page = Page(start, end, width, limit)
        bucket = ((UsageRow.at - start) // width).label("bucket")
        stmt = (
            select(bucket, UsageRow.project_id, func.max(UsageRow.usage_bytes))
            .where(UsageRow.at >= start, UsageRow.at < page.stop, UsageRow.kind == "vector_stores")
            .group_by(bucket, UsageRow.project_id)
        )
        if "project_id" in filters:
            stmt = stmt.where(UsageRow.project_id.in_(filters["project_id"]))
        held: dict[tuple[int, str | None], int] = {}
        with self.sessions() as s:
            for b, project, used in s.execute(stmt):
                key = (int(b), project if "project_id" in group_by else None)
                held[key] = held.get(key, 0) + int(used or 0)
        results: dict[int, list[dict[str, Any]]] = {}
        for (b, project), used in sorted(held.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
            results.setdefault(b, []).append(
                {
                    "object": "organization.usage.vector_stores.result",
                    "usage_bytes": used,
                    "project_id": project,
                }
            )
        return page.response(results)


# Runs re-read on each round: one that committed late with an earlier end time is still seen.
OVERLAP_S = 60.0


async def collect_agent_runs(
    store: UsageStore, http: httpx.AsyncClient, agent_url: str, token: str, since: float
) -> float:
    """Keep the usage of the agent runs that ended since `since` (each once, by run id), page
    by page; returns where the next round starts (the last end seen, less `OVERLAP_S`)."""
    last = since
    while True:
        r = await http.get(
            f"{agent_url}/internal/ended_runs",
            params={"since": last, "limit": 500},
            headers={"authorization": f"Bearer {token}"},
        )
        r.raise_for_status()
        runs = r.json()["data"]
        await asyncio.to_thread(store.keep, runs)
        ended = max((float(run["ended_at"]) for run in runs), default=last)
        if len(runs) < 500 or ended <= last:
            return max(since, ended - OVERLAP_S)
        last = ended


def _result(kind: str, sums: dict[str, Any], n: int, group_by: Sequence[str]) -> dict[str, Any]:
    """One bucket's result for a group: OpenAI's fields for completions and embeddings (with
    Crucible's `engine_seconds`), Crucible's own for runs."""
    tokens = {
        "input_tokens": int(sums["input_tokens"]),
        "output_tokens": int(sums["output_tokens"]),
    }
    obj = f"organization.usage.{kind}.result"
    if kind == "agent_runs":
        return {
            "object": obj,
            "num_runs": n,
            "steps": int(sums["requests"]),
            "tool_calls": int(sums["tool_calls"]),
            "tool_seconds": round(float(sums["tool_seconds"]), 6),
            **tokens,
        }
    if kind == "eval_runs":
        return {"object": obj, "num_runs": n, "num_model_requests": int(sums["requests"]), **tokens}
    result = {
        "object": obj,
        "input_tokens": tokens["input_tokens"],
        "num_model_requests": n,
        # Crucible's own: the engine time these requests were attributed.
        "engine_seconds": round(float(sums["engine_seconds"]), 6),
    }
    if kind == "completions":
        result |= {
            "output_tokens": tokens["output_tokens"],
            "input_cached_tokens": int(sums["input_cached_tokens"]),
            "input_audio_tokens": 0,
            "output_audio_tokens": 0,
            "batch": False if "batch" in group_by else None,
            "api_source": "unlabeled" if "api_source" in group_by else None,
        }
    return result


class Page:
    """`limit` buckets of `width` seconds from `start`, before `end` (the last may be short)."""

    def __init__(self, start: int, end: int, width: int, limit: int) -> None:
        total = -(-(end - start) // width)
        self.start, self.end, self.width = start, end, width
        self.starts = [start + i * width for i in range(min(limit, total))]
        self.more = total > limit
        self.stop = min(end, self.starts[-1] + width) if self.starts else start

    def response(self, results: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
        """OpenAI's page of buckets; `results` by bucket index (a bucket without: empty)."""
        data = [
            {
                "object": "bucket",
                "start_time": t,
                "end_time": min(t + self.width, self.end),
                "results": results.get((t - self.start) // self.width, []),
            }
            for t in self.starts
        ]
        return {
            "object": "page",
            "data": data,
            "has_more": self.more,
            "next_page": f"page_{self.starts[-1] + self.width}" if self.more else None,
        }


def report(
    store: UsageStore,
    start: int,
    end: int,
    usd_per_second: float,
    hosted: dict[str, dict[str, float]],
) -> list[dict[str, Any]]:
    """Per project, model and kind from `start` to `end` (`crucible usage`): requests (runs, or
    fine-tuning jobs), tokens, engine seconds, what they cost and what a hosted API would have
    charged; largest cost first. Runs are priced within their completions (cost None)."""
    cols = (UsageRow.project_id, UsageRow.model, UsageRow.kind)
    stmt = (
        select(
            *cols,
            func.count(),
            func.sum(UsageRow.input_tokens),
            func.sum(UsageRow.output_tokens),
            func.sum(UsageRow.input_cached_tokens),
        )
        .where(UsageRow.at >= start, UsageRow.at < end, UsageRow.kind != "vector_stores")
        .group_by(*cols)
    )
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    with store.sessions() as s:
        for project, model, kind, n, tin, tout, cached in s.execute(stmt):
            rows[project, f"{model}, {kind}"] = {
                "project_id": project,
                "model": model,
                "kind": kind,
                "requests": int(n),
                "input_tokens": int(tin or 0),
                "output_tokens": int(tout or 0),
                "input_cached_tokens": int(cached or 0),
            }
        jobs = select(JobRow.owner, JobRow.model, func.count(), func.sum(JobRow.trained_tokens))
        jobs = jobs.where(JobRow.finished_at >= start, JobRow.finished_at < end)
        for project, model, n, trained in s.execute(jobs.group_by(JobRow.owner, JobRow.model)):
            rows[project, f"{model}, fine-tuning"] = {
                "project_id": project,
                "model": model,
                "kind": "fine-tuning",
                "requests": int(n),
                "input_tokens": int(trained or 0),  # trained tokens
                "output_tokens": 0,
                "input_cached_tokens": 0,
            }
    for r in rows.values():
        r |= {"engine_seconds": None, "cost_usd": None, "hosted_usd": None}
    days = -(-(end - start) // 86_400)
    for day in range(0, days, 180):  # the costs report's pages
        first = start + day * 86_400
        page = store.costs(
            first,
            min(end, first + 180 * 86_400),
            180,
            ["project_id", "line_item"],
            {},
            usd_per_second,
            hosted,
        )
        for bucket in page["data"]:
            for c in bucket["results"]:
                if (line := rows.get((c["project_id"], c["line_item"]))) is None:
                    continue
                line["engine_seconds"] = (line["engine_seconds"] or 0.0) + c["engine_seconds"]
                line["cost_usd"] = (line["cost_usd"] or 0.0) + c["amount"]["value"]
                if (equivalent := c["hosted_equivalent"]) is not None:
                    line["hosted_usd"] = (line["hosted_usd"] or 0.0) + equivalent["value"]
    return sorted(
        rows.values(),
        key=lambda r: (
            -(r["cost_usd"] or 0.0),
            -(r["input_tokens"] + r["output_tokens"]),
            r["project_id"],
        ),
    )

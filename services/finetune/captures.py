"""Stored completions and their feedback: what the lab asked, what it was answered, what was right.

The gateway hands each stored exchange to the capture outbox (services/common/outbox.py) as the
raw request and response bytes; this module turns them into OpenAI's stored chat completion
(a streamed answer reassembled: content, tool calls, logprobs, finish reason, usage) and keeps
it, owner-scoped, keyed by the completion's id, so a record delivered twice is kept once.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    delete,
    exists,
    func,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from services.common.errors import InvalidRequest, NotFound
from services.common.pagination import PageQuery, listing, page, page_of
from services.finetune import responses
from services.finetune.jobs import Base
from services.finetune.responses import ResponseRow

log = logging.getLogger("crucible.finetune.captures")

# Request fields a stored completion reports (OpenAI's stored completion object).
ECHOED = (
    "seed",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "tools",
    "tool_choice",
    "response_format",
    "service_tier",
)
SETTLE_S = 2.0  # how long feedback waits for its completion to arrive from the outbox
METRIC_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class CompletionRow(Base):
    __tablename__ = "stored_completions"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    key_id: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(256), index=True)
    # When the gateway finished the exchange (to the microsecond: lists keep the order in which
    # completions were made, which the response's `created`, in whole seconds, cannot).
    created_at: Mapped[float] = mapped_column(Float, index=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    trace_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # its request's
    prompt_hash: Mapped[str] = mapped_column(String(64), index=True)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    # The request and response bytes the gateway captured (the owner's stored-data quota).
    stored_bytes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class FeedbackRow(Base):
    __tablename__ = "completion_feedback"
    __table_args__ = (UniqueConstraint("completion_id", "metric", "key_id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    completion_id: Mapped[str] = mapped_column(
        ForeignKey("stored_completions.id", ondelete="CASCADE"), index=True
    )
    owner: Mapped[str] = mapped_column(String(128), index=True)
    key_id: Mapped[str] = mapped_column(String(32))
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[Any] = mapped_column(JSON)
    value_text: Mapped[str] = mapped_column(String(512))  # what `feedback[metric]=` matches
    comment: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    correction: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[int] = mapped_column(Integer)


# --- from the outbox's bytes to a stored completion ----------------------------------------


def reassemble(raw: bytes) -> dict[str, Any] | None:
    """A streamed chat completion (its SSE bytes) as the one object the API would have sent;
    None when the stream carried an error or no chunk."""
    out: dict[str, Any] | None = None
    choices: dict[int, dict[str, Any]] = {}
    for event in raw.split(b"\n\n"):
        line = event.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = orjson.loads(data)
        if not isinstance(chunk, dict) or "error" in chunk:
            return None
        if out is None:
            out = {
                "id": chunk["id"],
                "object": "chat.completion",
                "created": chunk.get("created"),
                "model": chunk.get("model"),
                "system_fingerprint": chunk.get("system_fingerprint"),
                "usage": None,
            }
        if chunk.get("usage"):
            out["usage"] = chunk["usage"]
        for c in chunk.get("choices") or []:
            _merge_choice(choices, c)
    if out is None:
        return None
    out["choices"] = [choices[i] for i in sorted(choices)]
    return out


def _merge_choice(choices: dict[int, dict[str, Any]], c: dict[str, Any]) -> None:
    index = c.get("index", 0)
    choice = choices.setdefault(
        index,
        {
            "index": index,
            "message": {"role": "assistant", "content": None},
            "logprobs": None,
            "finish_reason": None,
        },
    )
    msg, delta = choice["message"], c.get("delta") or {}
    if delta.get("role"):
        msg["role"] = delta["role"]
    for field in ("content", "reasoning_content", "reasoning", "refusal"):
        if delta.get(field):
            msg[field] = (msg.get(field) or "") + delta[field]
    for call in delta.get("tool_calls") or []:
        calls = msg.setdefault("tool_calls", [])
        at = call.get("index", len(calls))
        while len(calls) <= at:
            calls.append(
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
        slot = calls[at]
        if call.get("id"):
            slot["id"] = call["id"]
        fn = call.get("function") or {}
        slot["function"]["name"] += fn.get("name") or ""
        slot["function"]["arguments"] += fn.get("arguments") or ""
    logprobs = c.get("logprobs")
    if isinstance(logprobs, dict) and logprobs.get("content"):
        choice["logprobs"] = choice["logprobs"] or {"content": []}
        choice["logprobs"]["content"].extend(logprobs["content"])
    if c.get("finish_reason"):
        choice["finish_reason"] = c["finish_reason"]


def prompt_hash(messages: list[Any]) -> str:
    """Two prompts that differ only in case or spacing are the same prompt (for datasets)."""

    def norm(value: Any) -> Any:
        if isinstance(value, str):
            return " ".join(value.lower().split())
        if isinstance(value, list):
            return [norm(v) for v in value]
        if isinstance(value, dict):
            return {k: norm(v) for k, v in value.items() if k != "name"}
        return value

    return hashlib.sha256(orjson.dumps(norm(messages), option=orjson.OPT_SORT_KEYS)).hexdigest()


def to_row(fields: dict[bytes, bytes]) -> CompletionRow | ResponseRow | None:
    """One outbox record as a row (a chat completion or a response); None (logged) for a
    record that cannot be one."""
    try:
        meta = orjson.loads(fields[b"meta"])
        request = orjson.loads(fields[b"request"])
        raw = fields[b"response"]
        size = len(fields[b"request"]) + len(raw)
        if meta.get("kind") == "response":
            row = responses.to_row(meta, request, raw)
            if row is None:
                log.warning("capture record without a response; skipped")
            else:
                row.stored_bytes = size
            return row
        response = reassemble(raw) if meta.get("stream") else orjson.loads(raw)
    except (KeyError, ValueError, TypeError):
        log.warning("capture record malformed; skipped")
        return None
    if not isinstance(response, dict) or not isinstance(response.get("id"), str):
        log.warning("capture record without a completion; skipped")
        return None
    if meta.get("strip_usage"):
        request.pop("stream_options", None)  # the gateway's, not the client's
    created = float(meta.get("created") or time.time())
    retention = meta.get("retention_days")
    usage = response.get("usage") or {}
    response["usage"] = usage or None
    return CompletionRow(
        id=response["id"][:200],
        owner=meta["owner"],
        key_id=meta["key_id"],
        model=str(response.get("model") or request.get("model"))[:256],
        created_at=created,
        request=request,
        response=response,
        metadata_=request.get("metadata") or None,
        request_id=meta.get("request_id"),
        trace_id=str(meta["trace_id"])[:32] if meta.get("trace_id") else None,
        prompt_hash=prompt_hash(request.get("messages") or []),
        expires_at=created + retention * 86400 if retention else None,
        stored_bytes=size,
    )


# --- the API's objects -----------------------------------------------------------------------


def feedback_object(f: FeedbackRow) -> dict[str, Any]:
    return {
        "object": "chat.completion.feedback",
        "id": f.id,
        "completion_id": f.completion_id,
        "metric": f.metric,
        "value": f.value,
        "comment": f.comment,
        "correction": f.correction,
        "key_id": f.key_id,  # who gave it (a reviewer's key, say): an id, never a secret
        "created_at": f.created_at,
        "updated_at": f.updated_at,
    }


def completion_object(row: CompletionRow, feedback: Sequence[FeedbackRow] = ()) -> dict[str, Any]:
    request = row.request
    return {
        **row.response,
        "object": "chat.completion",
        "metadata": row.metadata_ or {},
        "request_id": row.request_id,
        "trace_id": row.trace_id,
        "input_user": request.get("user"),
        **{k: request.get(k) for k in ECHOED},
        "feedback": [feedback_object(f) for f in feedback],
    }


def value_text(value: Any) -> str:
    """A feedback value as `feedback[metric]=...` spells it in a query."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class Filter:
    """Which stored completions a list or a dataset takes (all conditions must hold)."""

    model: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    feedback: tuple[tuple[str, str], ...] = ()
    created_after: int | None = None
    created_before: int | None = None

    def where(self, stmt: Any, owner: str) -> Any:
        stmt = stmt.where(CompletionRow.owner == owner)
        if self.model is not None:
            stmt = stmt.where(CompletionRow.model == self.model)
        for k, v in self.metadata:
            stmt = stmt.where(CompletionRow.metadata_[k].as_string() == v)
        for metric, v in self.feedback:
            stmt = stmt.where(
                exists().where(
                    FeedbackRow.completion_id == CompletionRow.id,
                    FeedbackRow.metric == metric,
                    FeedbackRow.value_text == v,
                )
            )
        if self.created_after is not None:
            stmt = stmt.where(CompletionRow.created_at >= self.created_after)
        if self.created_before is not None:
            stmt = stmt.where(CompletionRow.created_at < self.created_before)
        return stmt


class CaptureStore:
    def __init__(self, sessions: Any) -> None:
        self.session = sessions

    def ingest(self, records: Sequence[dict[bytes, bytes]]) -> int:
        """Keep each record once (a redelivered one is already there). Returns how many were new."""
        new = 0
        made = [r for r in map(to_row, records) if r is not None]
        for kind in (CompletionRow, ResponseRow):
            rows = {r.id: r for r in made if isinstance(r, kind)}
            if not rows:
                continue
            with self.session.begin() as s:
                have = set(s.scalars(select(kind.id).where(kind.id.in_(list(rows)))))
                s.add_all(r for i, r in rows.items() if i not in have)
            new += len(rows) - len(have)
        return new

    def owners_over(self, quota: int) -> dict[str, int]:
        """The owners whose stored completions and responses hold `quota` bytes or more."""
        totals: dict[str, int] = {}
        with self.session() as s:
            for kind in (CompletionRow, ResponseRow):
                q = select(kind.owner, func.sum(kind.stored_bytes)).group_by(kind.owner)
                for owner, n in s.execute(q):
                    totals[owner] = totals.get(owner, 0) + int(n or 0)
        return {owner: n for owner, n in totals.items() if n >= quota}

    def get(self, s: Session, completion_id: str, owner: str) -> CompletionRow:
        row = s.get(CompletionRow, completion_id)
        if row is None or row.owner != owner:
            raise NotFound(
                f"No stored chat completion found with id '{completion_id}'.",
                param="completion_id",
            )
        return row

    def _feedback(self, s: Session, ids: Sequence[str]) -> dict[str, list[FeedbackRow]]:
        out: dict[str, list[FeedbackRow]] = {i: [] for i in ids}
        rows = s.scalars(
            select(FeedbackRow)
            .where(FeedbackRow.completion_id.in_(list(ids)))
            .order_by(FeedbackRow.updated_at, FeedbackRow.id)
        )
        for f in rows:
            out[f.completion_id].append(f)
        return out

    def retrieve(self, completion_id: str, owner: str) -> dict[str, Any]:
        with self.session() as s:
            row = self.get(s, completion_id, owner)
            return completion_object(row, self._feedback(s, [row.id])[row.id])

    def list_completions(self, owner: str, f: Filter, q: PageQuery) -> dict[str, Any]:
        with self.session() as s:
            stmt = f.where(select(CompletionRow), owner)
            rows, more = page(s, stmt, CompletionRow.created_at, CompletionRow.id, q)
            fb = self._feedback(s, [r.id for r in rows])
            return listing([completion_object(r, fb[r.id]) for r in rows], more)

    def rows(self, owner: str, f: Filter, limit: int) -> list[tuple[CompletionRow, list[Any]]]:
        """Every matching completion (oldest first) with its feedback, for datasets and evals."""
        with self.session() as s:
            stmt = f.where(select(CompletionRow), owner)
            rows = list(s.scalars(stmt.order_by(CompletionRow.created_at).limit(limit + 1)))
            fb = self._feedback(s, [r.id for r in rows])
        return [(r, fb[r.id]) for r in rows]

    def feedback_share(
        self, owner: str, model: str, since: float, metric: str, negative: list[str]
    ) -> tuple[int, int]:
        """(answers of `model` since `since` with feedback on `metric`, how many negative)."""
        with self.session() as s:
            rows = s.execute(
                select(FeedbackRow.value_text)
                .join(CompletionRow, CompletionRow.id == FeedbackRow.completion_id)
                .where(
                    CompletionRow.owner == owner,
                    CompletionRow.model == model,
                    CompletionRow.created_at >= since,
                    FeedbackRow.metric == metric,
                )
            ).all()
        return len(rows), sum(1 for (v,) in rows if v in negative)

    def messages(self, completion_id: str, owner: str, q: PageQuery) -> dict[str, Any]:
        with self.session() as s:
            row = self.get(s, completion_id, owner)
        messages = row.request.get("messages") or []
        return page_of([_message(row.id, i, m) for i, m in enumerate(messages)], q)

    def update(self, completion_id: str, owner: str, metadata: dict[str, str]) -> dict[str, Any]:
        with self.session.begin() as s:
            row = self.get(s, completion_id, owner)
            row.metadata_ = metadata
        return self.retrieve(completion_id, owner)

    def delete(self, completion_id: str, owner: str) -> None:
        with self.session.begin() as s:
            self.get(s, completion_id, owner)
            s.execute(delete(FeedbackRow).where(FeedbackRow.completion_id == completion_id))
            s.execute(delete(CompletionRow).where(CompletionRow.id == completion_id))

    def give_feedback(
        self, completion_id: str, owner: str, key_id: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """The latest value per (completion, metric, key) wins. Feedback often follows its
        answer at once, while the answer may still be on its way through the outbox (tens of
        milliseconds): an id not found yet is looked for again for up to `SETTLE_S`."""
        self._settle(completion_id, owner)
        now = int(time.time())
        with self.session.begin() as s:
            self.get(s, completion_id, owner)
            row = s.scalar(
                select(FeedbackRow).where(
                    FeedbackRow.completion_id == completion_id,
                    FeedbackRow.metric == body["metric"],
                    FeedbackRow.key_id == key_id,
                )
            )
            if row is None:
                row = FeedbackRow(
                    id="fb_" + secrets.token_hex(12),
                    completion_id=completion_id,
                    owner=owner,
                    key_id=key_id,
                    metric=body["metric"],
                    created_at=now,
                )
                s.add(row)
            row.value, row.value_text = body["value"], value_text(body["value"])[:512]
            row.comment, row.correction = body.get("comment"), body.get("correction")
            row.updated_at = now
            s.flush()
            return feedback_object(row)

    def _settle(self, completion_id: str, owner: str) -> None:
        deadline = time.monotonic() + SETTLE_S
        while True:
            with self.session() as s:
                row = s.get(CompletionRow, completion_id)
            if row is not None or time.monotonic() > deadline:
                return  # found, or the caller's lookup answers 404
            time.sleep(0.05)

    def feedback_by_model(
        self, owner: str, models: list[str], since: float, metric: str
    ) -> list[tuple[str, str, int]]:
        """(model, value, how many) of the feedback on `metric` given to the owner's answers from
        `models` since `since`."""
        with self.session() as s:
            n = func.count().label("n")
            rows = s.execute(
                select(CompletionRow.model, FeedbackRow.value_text, n)
                .join(CompletionRow, CompletionRow.id == FeedbackRow.completion_id)
                .where(
                    CompletionRow.owner == owner,
                    CompletionRow.model.in_(models),
                    CompletionRow.created_at >= since,
                    FeedbackRow.metric == metric,
                )
                .group_by(CompletionRow.model, FeedbackRow.value_text)
            ).all()
        return [(m, v, int(c)) for m, v, c in rows]

    def feedback_counts(self, limit: int) -> list[tuple[str, str, int]]:
        with self.session() as s:
            n = func.count().label("n")
            rows = s.execute(
                select(FeedbackRow.metric, FeedbackRow.value_text, n)
                .group_by(FeedbackRow.metric, FeedbackRow.value_text)
                .order_by(n.desc())
                .limit(limit)
            ).all()
        return [(m, v, int(c)) for m, v, c in rows]

    def export(self, owner: str) -> list[dict[str, Any]]:
        """Every stored completion of an owner with its feedback (admin export)."""
        return [completion_object(r, fb) for r, fb in self.rows(owner, Filter(), 10**9)]

    def purge(self, owner: str | None = None, *, expired_before: float | None = None) -> int:
        """Delete an owner's stored completions and responses (admin purge), or those past their
        retention."""
        cutoff = expired_before or time.time()
        deleted = 0
        with self.session.begin() as s:
            for kind in (CompletionRow, ResponseRow):
                where = kind.owner == owner if owner is not None else kind.expires_at < cutoff
                ids = list(s.scalars(select(kind.id).where(where)))
                for start in range(0, len(ids), 500):
                    part = ids[start : start + 500]
                    if kind is CompletionRow:
                        s.execute(delete(FeedbackRow).where(FeedbackRow.completion_id.in_(part)))
                    s.execute(delete(kind).where(kind.id.in_(part)))
                deleted += len(ids)
        return deleted


def _message(completion_id: str, index: int, m: Any) -> dict[str, Any]:
    m = m if isinstance(m, dict) else {"role": "user", "content": str(m)}
    content = m.get("content")
    parts = content if isinstance(content, list) else None
    if parts is not None:
        content = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
    return {
        "id": f"{completion_id}-{index}",
        "role": m.get("role"),
        "content": content,
        "content_parts": parts,
        "name": m.get("name"),
        "tool_calls": m.get("tool_calls"),
        "tool_call_id": m.get("tool_call_id"),
    }


def query_filter(params: Any, model: str | None) -> Filter:
    """`metadata[k]=v` and `feedback[metric]=v` from a query string (deep-object style, as the
    openai SDK sends `metadata={...}`)."""
    meta: list[tuple[str, str]] = []
    fb: list[tuple[str, str]] = []
    for name, value in params.multi_items():
        m = re.fullmatch(r"(metadata|feedback)\[(.{1,64})\]", name)
        if m is None:
            if name.startswith(("metadata", "feedback")):
                raise InvalidRequest(f"unsupported filter {name[:80]!r}", param=name[:80])
            continue
        (meta if m.group(1) == "metadata" else fb).append((m.group(2), value))
    if len(meta) + len(fb) > 16:
        raise InvalidRequest("at most 16 metadata and feedback filters", param="metadata")
    return Filter(model=model, metadata=tuple(meta), feedback=tuple(fb))

"""OpenAI-style cursor pagination (`limit`, `order`, `after`, `before`) over SQL rows.

Rows are ordered by (created_at, id), so a page is stable even when many rows share a second.
A cursor is an object id the caller saw; an unknown or foreign cursor is a 400, not a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, Query
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from services.common.errors import InvalidRequest

Order = Literal["asc", "desc"]
Cursor = Annotated[str | None, Query(min_length=1, max_length=128)]
"""An `after` or `before` query parameter: an id the caller saw."""


@dataclass(frozen=True)
class PageQuery:
    limit: int
    order: Order
    after: str | None
    before: str | None


def _page_query(
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Order = "desc",
    after: Cursor = None,
    before: Cursor = None,
) -> PageQuery:
    return PageQuery(limit, order, after, before)


PageParams = Annotated[PageQuery, Depends(_page_query)]
"""The list routes' query parameters, as OpenAI names them."""


def _asc_page_query(
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Order = "asc",
    after: Cursor = None,
) -> PageQuery:
    return PageQuery(limit, order, after, None)


AscPageParams = Annotated[PageQuery, Depends(_asc_page_query)]
"""The same for the lists OpenAI gives oldest first by default (stored completions, evals)."""


def page(
    session: Session,
    stmt: Select[Any],
    created: InstrumentedAttribute[Any],
    ident: InstrumentedAttribute[Any],
    q: PageQuery,
) -> tuple[Sequence[Any], bool]:
    """One page of `stmt` (already scoped to its owner) and whether more follow."""
    limit, order, after, before = q.limit, q.order, q.after, q.before
    for name, cursor in (("after", after), ("before", before)):
        if cursor is None:
            continue
        at = session.execute(stmt.with_only_columns(created).where(ident == cursor)).scalar()
        if at is None:
            raise InvalidRequest(f"unknown cursor {name}={cursor!r}", param=name)
        forward = (name == "after") == (order == "desc")
        # desc + after, or asc + before: older rows; otherwise newer ones.
        if forward:
            stmt = stmt.where(or_(created < at, and_(created == at, ident < cursor)))
        else:
            stmt = stmt.where(or_(created > at, and_(created == at, ident > cursor)))
    # Paging back (`before`) reads away from the cursor in reverse, then restores the order, so
    # the page is the one just before the cursor.
    descending = (order == "desc") != (before is not None and after is None)
    if descending:
        stmt = stmt.order_by(created.desc(), ident.desc())
    else:
        stmt = stmt.order_by(created.asc(), ident.asc())
    rows = list(session.execute(stmt.limit(limit + 1)).scalars().all())
    more = len(rows) > limit
    rows = rows[:limit]
    if before is not None and after is None:
        rows.reverse()
    return rows, more


def listing(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def page_of(items: list[dict[str, Any]], q: PageQuery) -> dict[str, Any]:
    """A page of a short list held whole (a completion's messages, a response's input items):
    the same `order`, `after` and `limit` as the SQL lists."""
    if q.order == "desc":
        items = items[::-1]
    if q.after is not None:
        at = next((n for n, item in enumerate(items) if item["id"] == q.after), None)
        if at is None:
            raise InvalidRequest(f"unknown cursor after={q.after!r}", param="after")
        items = items[at + 1 :]
    return listing(items[: q.limit], len(items) > q.limit)

"""Outbound HTTP: one pooled client per upstream, always with timeouts."""

from __future__ import annotations

import httpx

from services.common.logging import request_id


def make_client(
    base_url: str = "",
    *,
    connect: float = 1.0,
    read: float = 60.0,
    write: float = 10.0,
    pool: float = 1.0,
    max_connections: int = 256,
    headers: dict[str, str] | None = None,
) -> httpx.AsyncClient:
    """A long-lived client for one upstream (create it in the app's lifespan, close it there)."""
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(connect=connect, read=read, write=write, pool=pool),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=64),
        headers=headers,
        event_hooks={"request": [_propagate_request_id]},
    )


async def _propagate_request_id(request: httpx.Request) -> None:
    rid = request_id.get()
    if rid and "x-request-id" not in request.headers:
        request.headers["x-request-id"] = rid

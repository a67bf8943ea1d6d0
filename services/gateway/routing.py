"""Which backend serves a request: a routing table learnt from each backend's `/v1/models`, and a
pure choice function (fewest outstanding requests among healthy backends)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from services.common.upstream import Pool, UpstreamBusy, UpstreamConnectError, UpstreamProtocolError

log = logging.getLogger("crucible.gateway.routing")


@dataclass(eq=False)
class Backend:
    """One engine. Its time is shared out among the requests it serves as a processor-sharing
    clock: while n requests are in flight, each is attributed 1/n of every second, so what the
    requests are attributed sums to the time it was busy (`busy_s`, as this process saw it)."""

    url: str
    pool: Pool
    outstanding: int = 0
    healthy: bool = True
    down_since: float = 0.0
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    busy_s: float = 0.0  # seconds with at least one of this process's requests in flight
    shared_s: float = 0.0  # the integral of 1/outstanding over time: a request's share is its
    _since: float = 0.0  # difference between its end and its start

    def _advance(self) -> None:
        now = time.monotonic()
        if self.outstanding > 0:
            elapsed = now - self._since
            self.busy_s += elapsed
            self.shared_s += elapsed / self.outstanding
        self._since = now

    def request_started(self) -> float:
        """Count a request in; returns its mark on the shared clock."""
        self._advance()
        self.outstanding += 1
        return self.shared_s

    def request_done(self) -> None:
        self._advance()
        self.outstanding -= 1

    def mark_down(self) -> None:
        if self.healthy:
            log.warning("backend down", extra={"backend": self.url})
        self.healthy = False
        self.down_since = time.monotonic()


def choose(candidates: Sequence[Backend], exclude: Sequence[Backend] = ()) -> Backend | None:
    """The healthy backend with the fewest outstanding requests; earlier in the list wins ties.

    Pure: depends only on its arguments, so it is tested with properties, not a running fleet.
    """
    best: Backend | None = None
    for b in candidates:
        if not b.healthy or b in exclude:
            continue
        if best is None or b.outstanding < best.outstanding:
            best = b
    return best


class Router:
    """Backends and the models each serves, refreshed in the background."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        refresh_interval: float = 5.0,
        on_probe: Callable[[Backend], None] | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        self.backends = [Backend(u.rstrip("/"), Pool(u)) for u in urls]
        self.headers = list(headers)  # vLLM's API key, where it has one
        self.on_probe = on_probe
        self.refresh_interval = refresh_interval
        self._table: dict[str, list[Backend]] = {}
        self._task: asyncio.Task[None] | None = None
        self._last_refresh = 0.0
        self._refresh_lock = asyncio.Lock()

    def backends_for(self, model: str) -> list[Backend]:
        return self._table.get(model, [])

    def models(self) -> list[dict[str, Any]]:
        """Every model any backend serves, each once (the first backend's description)."""
        seen: dict[str, dict[str, Any]] = {}
        for b in self.backends:
            for mid, card in b.models.items():
                seen.setdefault(mid, card)
        return list(seen.values())

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        for b in self.backends:
            await b.pool.aclose()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                await self.refresh()
            except Exception:  # the loop must survive anything one refresh does
                log.exception("routing refresh failed")

    @property
    def last_refresh(self) -> float:
        """When the last probe round ended (monotonic)."""
        return self._last_refresh

    async def refresh_soon(self, min_age: float = 1.0) -> None:
        """Refresh now unless one ran within `min_age` s (an unknown model may be brand new)."""
        await self.refresh(min_age)

    async def refresh(self, min_age: float = 0.0) -> None:
        async with self._refresh_lock:
            # Checked under the lock: a burst of requests for an unknown model that queued here
            # behind one refresh must not each run another.
            if min_age and time.monotonic() - self._last_refresh < min_age:
                return
            await asyncio.gather(*(self._probe(b) for b in self.backends))
            if self.on_probe:
                for b in self.backends:
                    self.on_probe(b)
            table: dict[str, list[Backend]] = {}
            for b in self.backends:
                for mid in b.models:
                    table.setdefault(mid, []).append(b)
            self._table = table
            self._last_refresh = time.monotonic()

    async def _probe(self, b: Backend) -> None:
        """List the backend's models; this is also how a down backend is probed back up."""
        try:
            async with asyncio.timeout(2.0):
                resp = await b.pool.request(
                    b"GET", b"/v1/models", b"", self.headers, connect_timeout=1.0
                )
                try:
                    body = await resp.read()
                finally:
                    resp.release()  # also when the read timed out: its slot and connection
            if resp.status != 200:
                raise UpstreamProtocolError(f"/v1/models answered {resp.status}")
            data = orjson.loads(body).get("data", [])
            b.models = {m["id"]: m for m in data if isinstance(m, dict) and "id" in m}
            if not b.healthy:
                log.info("backend up", extra={"backend": b.url})
            b.healthy = True
        except UpstreamBusy:
            return  # up, but every connection is taken: no news either way
        except (UpstreamConnectError, UpstreamProtocolError, TimeoutError, ValueError) as exc:
            # Keep its models in the table: requests then get 503 (backend down), not 404.
            log.debug("probe failed", extra={"backend": b.url, "error": str(exc)})
            b.mark_down()

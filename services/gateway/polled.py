"""Tables the gateway copies from the finetune service (aliases, owners past a quota): fetched
every `refresh_s` with a conditional GET (an unchanged table is a 304), and the last copy kept in
force while the finetune service is away, so the request path reads a dict and never waits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx
from pydantic import SecretStr

from services.common import tracing

log = logging.getLogger("crucible.gateway.polled")


class Polled:
    path = ""  # the finetune service's internal route

    def __init__(self, finetune_url: str, token: SecretStr, refresh_s: float = 1.0) -> None:
        self.url = f"{finetune_url.rstrip('/')}{self.path}"
        self.headers = {"authorization": f"Bearer {token.get_secret_value()}"}
        self.refresh_s = refresh_s
        self.etag: str | None = None
        self._client = httpx.AsyncClient(timeout=2.0)
        self._task: asyncio.Task[None] | None = None

    def load(self, body: Any) -> None:
        """Take a fetched table (raise KeyError, ValueError or TypeError to keep the old one)."""
        raise NotImplementedError

    async def refresh(self) -> None:
        headers = dict(self.headers)
        if self.etag:
            headers["if-none-match"] = self.etag
        try:
            with tracing.untraced():
                r = await self._client.get(self.url, headers=headers)
            if r.status_code == 304:
                return
            r.raise_for_status()
            self.load(r.json())
        except (httpx.HTTPError, KeyError, ValueError, TypeError, ZeroDivisionError) as exc:
            # Keep what we knew: an outage of the finetune service must not change routing.
            log.warning("not refreshed", extra={"url": self.path, "error": str(exc)[:200]})
            return
        self.etag = r.headers.get("etag")

    async def start(self) -> None:
        await self.refresh()

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.refresh_s)
                await self.refresh()

        self._task = asyncio.create_task(loop())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

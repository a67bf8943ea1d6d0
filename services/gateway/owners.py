"""Who owns each fine-tuned model: an `ft:` model is visible and usable by its owner's keys
(and admin keys) only. The finetune service is the source; a short-lived cache keeps the hot
path to a dict lookup."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
from pydantic import SecretStr

from services.common import tracing
from services.gateway.keys import ApiKey

log = logging.getLogger("crucible.gateway.owners")
PREFIX = "ft:"


class ModelOwners:
    def __init__(self, finetune_url: str, token: SecretStr, ttl: float = 5.0) -> None:
        self.url = f"{finetune_url.rstrip('/')}/internal/adapters"
        self.headers = {"authorization": f"Bearer {token.get_secret_value()}"}
        self.ttl = ttl
        self.owners: dict[str, str] = {}
        self.fetched = 0.0
        self._lock = asyncio.Lock()
        self._client = httpx.AsyncClient(timeout=2.0)

    async def may_use(self, key: ApiKey, model: str) -> bool:
        if not key.may_use(model):
            return False
        if not model.startswith(PREFIX) or key.is_admin:
            return True
        owner = self.owners.get(model)
        if owner is None or time.monotonic() - self.fetched > self.ttl:
            await self.refresh(min_age=1.0)  # a new model, or a stale map
            owner = self.owners.get(model)
        return owner == key.owner

    def visible(self, key: ApiKey, model: str) -> bool:
        """For listings: from the cache, no I/O."""
        if not key.may_use(model):
            return False
        return not model.startswith(PREFIX) or key.is_admin or self.owners.get(model) == key.owner

    async def refresh(self, min_age: float = 0.0) -> None:
        async with self._lock:
            if time.monotonic() - self.fetched < min_age:
                return
            try:
                with tracing.untraced():  # a cache refresh, not the request's own work
                    r = await self._client.get(self.url, headers=self.headers)
                r.raise_for_status()
                self.owners = {a["model"]: a["owner"] for a in r.json()["data"]}
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                # Keep what we knew: a finetune outage must not hide models from their owners.
                log.warning("adapter owners not refreshed", extra={"error": str(exc)[:200]})
            self.fetched = time.monotonic()

    async def aclose(self) -> None:
        await self._client.aclose()

"""The agent's outbound calls: the model through the gateway, documents through retrieval.

Model calls go through the gateway as the user's own key (the gateway passes its id along with
the run), so the key's model allow-list, rate limit and concurrency apply to every step.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from pydantic import SecretStr

from services.common.http import make_client
from services.common.tenancy import internal_headers

KEY_HEADER = "x-crucible-key-id"
RETRYABLE = (429, 503)


class ModelCallError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ModelClient:
    def __init__(self, gateway_url: str, token: SecretStr) -> None:
        self.http = make_client(gateway_url, read=600.0)
        self.token = token

    async def chat(
        self, key_id: str, owner: str, body: dict[str, Any], deadline: float
    ) -> dict[str, Any]:
        """One chat completion; retries a 429/503 while the run's deadline allows."""
        headers = internal_headers(self.token, owner) | {KEY_HEADER: key_id}
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            try:
                resp = await self.http.post(
                    "/v1/chat/completions", json=body, headers=headers, timeout=left
                )
            except httpx.TimeoutException:
                raise TimeoutError from None
            except httpx.HTTPError as exc:
                msg = f"the gateway is unreachable ({type(exc).__name__})"
                raise ModelCallError(503, msg) from None
            if resp.status_code == 200:
                answer: dict[str, Any] = resp.json()
                return answer
            wait = float(resp.headers.get("retry-after", "1") or 1)
            if resp.status_code in RETRYABLE and time.monotonic() + wait < deadline:
                await asyncio.sleep(wait)
                continue
            raise ModelCallError(resp.status_code, _message(resp))

    async def models(self, key_id: str, owner: str) -> set[str]:
        """The model ids the key may use."""
        headers = internal_headers(self.token, owner) | {KEY_HEADER: key_id}
        resp = await self.http.get("/v1/models", headers=headers, timeout=10)
        resp.raise_for_status()
        return {m["id"] for m in resp.json()["data"]}

    async def aclose(self) -> None:
        await self.http.aclose()


class RetrievalClient:
    def __init__(self, retrieval_url: str, token: SecretStr) -> None:
        self.http = make_client(retrieval_url, read=60.0)
        self.token = token

    async def store_exists(self, owner: str, store_id: str) -> bool:
        resp = await self.http.get(
            f"/v1/vector_stores/{store_id}", headers=internal_headers(self.token, owner)
        )
        if resp.status_code == 404:
            return False
        resp.raise_for_status()
        return True

    async def search(self, owner: str, store_id: str, query: str, k: int) -> list[dict[str, Any]]:
        resp = await self.http.post(
            f"/v1/vector_stores/{store_id}/search",
            json={"query": query, "max_num_results": k},
            headers=internal_headers(self.token, owner),
        )
        resp.raise_for_status()
        data: list[dict[str, Any]] = resp.json()["data"]
        return data

    async def aclose(self) -> None:
        await self.http.aclose()


def _message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {resp.status_code}"

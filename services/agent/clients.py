"""The agent's outbound calls: the model through the gateway, documents through retrieval.

Model calls go through the gateway as the user's own key (the gateway passes its id along with
the run), so the key's model allow-list, rate limit and concurrency apply to every step.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote

import orjson
from pydantic import SecretStr

from services.common import tracing
from services.common.http import make_client
from services.common.logging import request_id
from services.common.tenancy import internal_headers
from services.common.upstream import (
    Pool,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamProtocolError,
)

KEY_HEADER = "x-crucible-key-id"
RETRYABLE = (429, 503)


class ModelCallError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ModelClient:
    def __init__(self, gateway_url: str, token: SecretStr) -> None:
        # Each step's call is on the lean keep-alive client (the gateway's own): httpx costs
        # more per request than the loop's whole overhead budget. Cold calls use httpx.
        self.pool = Pool(gateway_url)
        self.http = make_client(gateway_url, read=60.0)
        self.token = token

    async def chat(
        self, key_id: str, owner: str, body: dict[str, Any], deadline: float
    ) -> dict[str, Any]:
        """One chat completion; retries a 429/503 while the run's deadline allows."""
        headers = internal_headers(self.token, owner) | {KEY_HEADER: key_id}
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        raw += [(b"content-type", b"application/json")]
        if rid := request_id.get():
            raw.append((b"x-request-id", rid.encode()))
        if (parent := tracing.current_header()) is not None:
            raw.append((tracing.TRACEPARENT, parent))
        payload = orjson.dumps(body)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            try:
                async with asyncio.timeout(left):
                    resp = await self.pool.request(
                        b"POST", b"/v1/chat/completions", payload, raw, connect_timeout=1.0
                    )
                    try:
                        data = await resp.read()
                    finally:
                        resp.release()
            except (UpstreamConnectError, UpstreamBusy):
                raise ModelCallError(503, "the gateway is unreachable or saturated") from None
            except UpstreamProtocolError:
                raise ModelCallError(502, "the gateway broke the connection") from None
            if resp.status == 200:
                answer: dict[str, Any] = orjson.loads(data)
                return answer
            wait = _retry_after(resp.headers)
            if resp.status in RETRYABLE and time.monotonic() + wait < deadline:
                await asyncio.sleep(wait)
                continue
            raise ModelCallError(resp.status, _message(data, resp.status))

    async def models(self, key_id: str, owner: str) -> set[str]:
        """The model ids the key may use."""
        headers = internal_headers(self.token, owner) | {KEY_HEADER: key_id}
        resp = await self.http.get("/v1/models", headers=headers, timeout=10)
        resp.raise_for_status()
        return {m["id"] for m in resp.json()["data"]}

    async def aclose(self) -> None:
        await self.pool.aclose()
        await self.http.aclose()


class RetrievalClient:
    def __init__(self, retrieval_url: str, token: SecretStr) -> None:
        self.http = make_client(retrieval_url, read=60.0)
        self.token = token

    async def store_exists(self, owner: str, store_id: str) -> bool:
        resp = await self.http.get(
            f"/v1/vector_stores/{quote(store_id, safe='')}",
            headers=internal_headers(self.token, owner),
        )
        if resp.status_code == 404:
            return False
        resp.raise_for_status()
        return True

    async def search(self, owner: str, store_id: str, query: str, k: int) -> list[dict[str, Any]]:
        resp = await self.http.post(
            f"/v1/vector_stores/{quote(store_id, safe='')}/search",
            json={"query": query, "max_num_results": k},
            headers=internal_headers(self.token, owner),
        )
        resp.raise_for_status()
        data: list[dict[str, Any]] = resp.json()["data"]
        return data

    async def aclose(self) -> None:
        await self.http.aclose()


def _message(body: bytes, status: int) -> str:
    try:
        return str(orjson.loads(body)["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}"


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float:
    for name, value in headers:
        if name.lower() == b"retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                break
    return 1.0

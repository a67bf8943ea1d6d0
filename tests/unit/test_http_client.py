"""The shared outbound client: timeouts always set, the request id carried to the upstream."""

import asyncio

import httpx

from services.common.http import make_client
from services.common.logging import request_id


def test_client_has_timeouts_and_forwards_the_request_id() -> None:
    seen: list[str | None] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("x-request-id"))
        return httpx.Response(200, json={})

    async def go() -> None:
        client = make_client("http://upstream", connect=0.5, read=3)
        client._transport = httpx.MockTransport(upstream)
        assert client.timeout.connect == 0.5 and client.timeout.read == 3
        token = request_id.set("rid-42")
        try:
            await client.get("/x")
        finally:
            request_id.reset(token)
        await client.get("/y")  # outside a request: no header invented
        await client.aclose()

    asyncio.run(go())
    assert seen == ["rid-42", None]

"""The reference point for the gateway's overhead: a plain FastAPI route forwarding to the
upstream with a pooled httpx client, nothing else (no auth, limits, metrics or logs).

    python bench/naive_proxy.py --port 9200 --upstream http://127.0.0.1:9100
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response


def create_app(upstream: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(base_url=upstream, timeout=60) as client:
            app.state.client = client
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/chat/completions")
    async def forward(request: Request) -> Response:
        r = await request.app.state.client.post(
            "/v1/chat/completions",
            content=await request.body(),
            headers={"content-type": "application/json"},
        )
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    return app


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    a = p.parse_args()
    uvicorn.run(
        create_app(a.upstream),
        host="127.0.0.1",
        port=a.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )

"""The agent service: runs stored in SQL, executed as tasks, tools in their sandboxes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.agent.clients import ModelClient, RetrievalClient
from services.agent.config import AgentSettings
from services.agent.metrics import AgentMetrics
from services.agent.routes import router
from services.agent.runner import Runner, Services
from services.agent.runs import RunStore
from services.agent.tools.sandbox import ToolSandbox
from services.common.app import build_app, serve

INTERRUPTED = {
    "code": "interrupted",
    "message": "the agent service restarted during this run; the steps so far are kept",
}


def create_app(settings: AgentSettings | None = None) -> FastAPI:
    s = settings or AgentSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = RunStore(s.db_url())
        for run_id in await asyncio.to_thread(store.interrupted):
            await asyncio.to_thread(store.finish, run_id, "failed", error=INTERRUPTED)
        sandbox = ToolSandbox(s.chem_workers, s.chem_timeout_s, s.chem_memory_mb, s.chem_max_atoms)
        await sandbox.start()
        model = ModelClient(s.gateway_url, s.internal_token)
        retrieval = RetrievalClient(s.retrieval_url, s.internal_token)
        services = Services(s, store, model, retrieval, sandbox, AgentMetrics(app.state.registry))
        runner = Runner(services)
        app.state.store, app.state.runner = store, runner
        app.state.model, app.state.retrieval, app.state.sandbox = model, retrieval, sandbox
        try:
            yield
        finally:
            await runner.close()
            await sandbox.close()
            await model.aclose()
            await retrieval.aclose()
            store.engine.dispose()

    async def sandbox_ready() -> None:
        await api.state.sandbox.ready()

    async def gateway_ready() -> None:
        # Every model call goes through the gateway: without it no run can make a step.
        resp = await api.state.model.http.get("/health", timeout=2)
        resp.raise_for_status()

    api = build_app(
        "agent",
        settings=s,
        lifespan=lifespan,
        ready_checks=[("sandbox", sandbox_ready), ("gateway", gateway_ready)],
        body_limit=s.max_body_bytes,
        title="Crucible agent",
        version="0.1.0",
    )
    api.include_router(router())
    return api


def main() -> None:
    s = AgentSettings()
    serve("agent", create_app(s), s)


if __name__ == "__main__":
    main()

"""The eval worker: runs evaluation runs, apart from GPU training (its own process and queue).

The runs table is the queue: a worker claims a run with one conditional UPDATE (a queued run, or
one whose worker has been silent for `eval_stale_after_s`), beats every `eval_heartbeat_s`, and
writes one output item per item, unique per (run, item). Killed mid-run, it is replaced and the
run resumes where the output items stop: no item is graded twice. A cancel is seen at the next
beat. Every model call (sampling and judges) goes through the gateway as the run's key, so the
key's allow-list and limits apply; a 429 waits as the gateway says and tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
from opentelemetry import trace
from prometheus_client import Counter, Gauge, start_http_server

from services.common import tracing
from services.common.logging import configure_logging
from services.common.tenancy import OWNER_HEADER, internal_headers
from services.finetune import samplers
from services.finetune.config import FinetuneSettings
from services.finetune.evals import EvalStore, OutputRow, RunRow, new_id
from services.finetune.graders import GradeError, grade
from services.finetune.jobs import JobStore
from services.finetune.samplers import PostEvents, PostJson

_TRACER = trace.get_tracer("crucible.eval-worker")
log = logging.getLogger("crucible.finetune.evals")

ITEMS = Counter("crucible_eval_items_total", "Eval output items written, by status", ["status"])
CALLS = Counter(
    "crucible_eval_model_calls_total", "Model calls by eval runs, by outcome", ["outcome"]
)
RUNNING = Gauge("crucible_eval_runs_in_progress", "Eval runs this worker is running")


class Runner:
    def __init__(self, s: FinetuneSettings, store: EvalStore) -> None:
        self.s = s
        self.store = store
        self.worker = f"{socket.gethostname()}-{os.getpid()}"
        self.http = httpx.AsyncClient(base_url=s.gateway_url, timeout=s.eval_call_timeout_s)
        self._sandbox: Any = None
        self._sandbox_lock = asyncio.Lock()

    # --- model calls, as the run's key ---------------------------------------------------

    async def send(
        self, run: RunRow, path: str, body: dict[str, Any], stream: bool = False
    ) -> httpx.Response:
        """A POST through the gateway as the run's key; a 429 waits as the gateway says and
        tries again. Anything but a 200 is the item's error."""
        headers = {
            "authorization": f"Bearer {self.s.internal_token.get_secret_value()}",
            "x-crucible-key-id": run.key_id,
            # The project the run was made in (an admin's may be another than its key's own).
            OWNER_HEADER: run.owner,
        }
        model = body.get("model")
        for _ in range(20):
            request = self.http.build_request("POST", path, json=body, headers=headers)
            try:
                r = await self.http.send(request, stream=stream)
            except httpx.HTTPError as exc:
                CALLS.labels("unreachable").inc()
                raise GradeError(f"the gateway was unreachable: {type(exc).__name__}") from None
            if r.status_code == 200:
                CALLS.labels("ok").inc()
                return r
            await r.aread()
            await r.aclose()
            if r.status_code != 429:
                break
            CALLS.labels("rate_limited").inc()
            await asyncio.sleep(min(float(r.headers.get("retry-after") or 1), 10.0))
        CALLS.labels(f"status_{r.status_code // 100}xx").inc()
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        raise GradeError(f"{model} answered {r.status_code}: {message[:300]}")

    def calls(self, run: RunRow, usage: dict[str, dict[str, int]]) -> tuple[PostJson, PostEvents]:
        """The run's two ways to call: a JSON answer (its tokens counted per model into
        `usage`), or a stream of server-sent events (the caller counts)."""

        async def post_json(path: str, body: dict[str, Any]) -> dict[str, Any]:
            r = await self.send(run, path, body)
            out: dict[str, Any] = r.json()
            _count(usage, str(body.get("model")), out.get("usage"))
            return out

        async def post_events(path: str, body: dict[str, Any]) -> AsyncIterator[tuple[str, str]]:
            r = await self.send(run, path, body, stream=True)
            name = ""
            try:
                async for line in r.aiter_lines():
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:") and name:
                        data = line[5:].strip()
                        yield name, data
            except httpx.HTTPError as exc:
                raise GradeError(f"the stream broke: {type(exc).__name__}") from None
            finally:
                await r.aclose()

        return post_json, post_events

    async def search(self, run: RunRow, store_id: str, query: str, k: int) -> list[dict[str, Any]]:
        """A vector-store search as the run's owner (the retrieval service, directly)."""
        try:
            r = await self.http.post(
                f"{self.s.retrieval_url}/v1/vector_stores/{quote(store_id, safe='')}/search",
                json={"query": query[:4000], "max_num_results": k},
                headers=internal_headers(self.s.internal_token, run.owner),
            )
        except httpx.HTTPError as exc:
            raise GradeError(
                f"the retrieval service was unreachable: {type(exc).__name__}"
            ) from None
        if r.status_code != 200:
            raise GradeError(f"the search answered {r.status_code}: {r.text[:200]}")
        data: list[dict[str, Any]] = r.json().get("data") or []
        return data

    async def canonical(self, smiles: str) -> str | None:
        """RDKit's canonical SMILES, computed in the agent's capped sandbox (None: no molecule)."""
        from services.agent.tools.base import ToolError
        from services.agent.tools.sandbox import ToolSandbox

        async with self._sandbox_lock:
            if self._sandbox is None:
                sandbox = ToolSandbox(workers=1)
                await sandbox.start()
                self._sandbox = sandbox
        try:
            info = await self._sandbox.call(
                "molecule_info", {"smiles": smiles[:20_000]}, time.monotonic() + 10
            )
        except ToolError:
            return None
        return str(info.get("canonical_smiles")) if info.get("canonical_smiles") else None

    # --- a run ----------------------------------------------------------------------------

    async def sample(
        self, run: RunRow, usage: dict[str, dict[str, int]], entry: dict[str, Any]
    ) -> dict[str, Any] | None:
        ds = run.data_source
        post, events = self.calls(run, usage)
        if not ds.get("model"):
            return samplers.given(entry)
        if ds.get("agent") is not None:
            out = await samplers.agent(events, ds, entry["item"])
            _count(usage, ds["model"], out.get("usage"))
            return out
        if ds.get("type") == "responses":
            return await samplers.responses(post, ds, entry["item"])
        return await samplers.chat(post, ds, entry["item"])

    async def item(
        self,
        run: RunRow,
        criteria: list[dict[str, Any]],
        usage: dict[str, dict[str, int]],
        index: int,
        entry: dict[str, Any],
    ) -> None:
        results: list[dict[str, Any]] = []
        sample = None
        status = "pass"
        post, _ = self.calls(run, usage)
        try:
            sample = await self.sample(run, usage, entry)

            async def judge(
                model: str, msgs: list[dict[str, Any]], p: dict[str, Any]
            ) -> dict[str, Any]:
                body = {"model": model, "messages": msgs, "store": False}
                return await post("/v1/chat/completions", {**body, **_chat_params(p)})

            async def search(store_id: str, query: str, k: int) -> list[dict[str, Any]]:
                return await self.search(run, store_id, query, k)

            for c in criteria:
                try:
                    results.append(
                        await grade(c, entry["item"], sample, judge, self.canonical, search)
                    )
                except GradeError as exc:
                    status = "error"
                    results.append(
                        {
                            "name": c["name"],
                            "type": c["type"],
                            "score": 0.0,
                            "passed": False,
                            "sample": {"error": str(exc)},
                        }
                    )
        except GradeError as exc:
            status = "error"
            results = [
                {
                    "name": "sampling",
                    "type": "sample",
                    "score": 0.0,
                    "passed": False,
                    "sample": {"error": str(exc)},
                }
            ]
        if status == "pass" and not all(r["passed"] for r in results):
            status = "fail"
        row = OutputRow(
            id=new_id("outputitem_"),
            run_id=run.id,
            eval_id=run.eval_id,
            item_index=index,
            created_at=time.time(),
            status=status,
            item=entry["item"],
            sample=sample,
            results=results,
        )
        if await asyncio.to_thread(self.store.add_output, row):
            ITEMS.labels(status).inc()

    async def run(self, run: RunRow) -> None:
        """One run, in a span that continues the trace of the request that made it (its
        samples' and graders' model calls are under it)."""
        with _TRACER.start_as_current_span(
            "eval.run",
            context=tracing.continued(run.traceparent),
            attributes={"crucible.eval_run_id": run.id, "crucible.attempt": run.attempts},
        ):
            await self._run(run)

    async def _run(self, run: RunRow) -> None:
        RUNNING.inc()
        usage: dict[str, dict[str, int]] = {}
        try:
            criteria = (
                await asyncio.to_thread(self.store.get_eval, run.eval_id, run.owner)
            ).testing_criteria
            done = await asyncio.to_thread(self.store.done_indexes, run.id)
            slots = asyncio.Semaphore(self.s.eval_concurrency)

            async def bounded(i: int, entry: dict[str, Any]) -> None:
                async with slots:
                    await self.item(run, criteria, usage, i, entry)

            tasks = {
                asyncio.create_task(bounded(i, e)) for i, e in enumerate(run.items) if i not in done
            }
            go_on = True
            while tasks and go_on:
                finished, tasks = await asyncio.wait(tasks, timeout=self.s.eval_heartbeat_s)
                for t in finished:
                    if t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                go_on = await asyncio.to_thread(self.store.heartbeat, run.id, self.worker)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(self.store.add_usage, run.id, usage)
            if go_on:
                await asyncio.to_thread(self.store.finish, run.id, self.worker, "completed", None)
            else:  # cancelled (or deleted, or another worker took it over after a long stall)
                await asyncio.to_thread(self.store.finish, run.id, self.worker, "canceled", None)
        except Exception as exc:
            log.exception("eval run failed", extra={"run": run.id})
            error = {"code": "run_failed", "message": str(exc)[:500]}
            await asyncio.to_thread(self.store.finish, run.id, self.worker, "failed", error)
        finally:
            RUNNING.dec()

    async def serve(self) -> None:
        running: set[asyncio.Task[None]] = set()
        while True:
            if len(running) < self.s.eval_runs:
                try:
                    claimed = await asyncio.to_thread(
                        self.store.claim, self.worker, self.s.eval_stale_after_s
                    )
                except Exception:
                    log.warning("claiming an eval run failed", exc_info=True)
                    claimed = None
                if claimed is not None:
                    log.info("eval run started", extra={"run": claimed.id})
                    task = asyncio.create_task(self.run(claimed))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    continue
            await asyncio.sleep(self.s.eval_poll_s)

    async def aclose(self) -> None:
        await self.http.aclose()
        if self._sandbox is not None:
            with contextlib.suppress(Exception):
                await self._sandbox.close()


def _chat_params(p: dict[str, Any]) -> dict[str, Any]:
    return {k: p[k] for k in samplers.CHAT_PARAMS if k in p}


def _count(usage: dict[str, dict[str, int]], model: str, u: Any) -> None:
    """One more call of `model` and its tokens (the Responses API's names counted as chat's)."""
    slot = usage.setdefault(model, {})
    slot["invocation_count"] = slot.get("invocation_count", 0) + 1
    if not isinstance(u, dict):
        return
    prompt = u.get("prompt_tokens", u.get("input_tokens"))
    completion = u.get("completion_tokens", u.get("output_tokens"))
    for k, v in (("prompt_tokens", prompt), ("completion_tokens", completion)):
        slot[k] = slot.get(k, 0) + int(v or 0)
    slot["total_tokens"] = slot.get("prompt_tokens", 0) + slot.get("completion_tokens", 0)


def main() -> None:
    s = FinetuneSettings()
    configure_logging("eval-worker", s.log_level)
    tracing.instrument_httpx(tracing.setup("eval-worker", s.otlp_endpoint, s.trace_sample_ratio))
    start_http_server(s.eval_worker_metrics_port, addr=s.host)
    jobs = JobStore(s.db_url())
    runner = Runner(s, EvalStore(jobs.session))
    asyncio.run(runner.serve())


if __name__ == "__main__":
    main()

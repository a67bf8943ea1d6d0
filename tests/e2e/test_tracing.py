"""One trace across the platform, on the shared stack with the real vLLM: an agent run that
searches a vector store is one trace whose spans go gateway → agent → gateway → vLLM and
agent → retrieval, each under the right parent; `crucible trace` prints it; the trace id is in
every response and in the services' log lines."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
import uuid
from typing import Any

import httpx
import openai
import pytest

from services.common import tracing
from services.stack import Stack
from tests.conftest import DENSE, ROOT
from tests.e2e.test_evals import CUSTOM, SAID_SOMETHING, items, sampled
from tests.spans import ancestors, spans_when


def _spans(stack: Stack, trace_id: str, ready: Any, timeout: float = 30) -> list[dict[str, Any]]:
    return spans_when(stack.config.var_dir / "traces.db", trace_id, ready, timeout)


def _one(spans: list[dict[str, Any]], service: str, name: str) -> dict[str, Any]:
    found = [s for s in spans if s["service"] == service and s["name"] == name]
    assert found, f"no {service}: {name} in {[(s['service'], s['name']) for s in spans]}"
    return found[0]


def test_an_agent_run_is_one_trace_from_the_gateway_to_vllm_and_retrieval(
    stack: Stack, gateway_url: str, client: openai.OpenAI
) -> None:
    made = client.files.create(
        file=("aspirin.txt", b"Aspirin is acetylsalicylic acid, CC(=O)Oc1ccccc1C(=O)O."),
        purpose="assistants",
    )
    vs = client.vector_stores.create(name=f"traced {uuid.uuid4().hex[:6]}", file_ids=[made.id])
    deadline = time.monotonic() + 60
    while client.vector_stores.retrieve(vs.id).file_counts.completed < 1:
        assert time.monotonic() < deadline, "the file was never indexed"
        time.sleep(0.2)

    parent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"  # the caller's own trace
    r = httpx.post(
        f"{gateway_url}/v1/agent/runs",
        headers={"authorization": f"Bearer {client.api_key}", "traceparent": parent},
        json={
            "model": DENSE,
            "mode": "structured",
            "tool_choice": "required",  # the first step searches the store
            "tools": ["search_documents"],
            "vector_store_ids": [vs.id],
            "messages": [{"role": "user", "content": "What is aspirin?"}],
            "budgets": {"max_steps": 2, "max_tokens": 3000, "max_seconds": 90},
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    trace_id = parent[3:35]
    assert r.headers["x-trace-id"] == trace_id  # the caller's trace, continued
    run: Any = r.json()
    while run["status"] in ("queued", "in_progress"):
        assert time.monotonic() < deadline + 120, run
        time.sleep(0.3)
        run = client.get(f"/agent/runs/{run['id']}", cast_to=object)
    assert run["usage"]["tool_calls"] >= 1 and run["usage"]["model_calls"] >= 1, run

    def whole(spans: list[dict[str, Any]]) -> bool:
        """Every span has arrived (each process exports on its own, every half second)."""
        named = [(s["service"], s["name"]) for s in spans]
        calls = run["usage"]["model_calls"]
        return (
            ("agent", "agent.run") in named
            and named.count(("vllm", "llm_request")) == calls
            and named.count(("gateway", "POST /v1/chat/completions")) == calls
            and any(s["service"] == "retrieval" for s in spans)
        )

    spans = _spans(stack, trace_id, whole)
    by_id = {s["span_id"]: s for s in spans}

    def parent_of(span: dict[str, Any]) -> dict[str, Any]:
        assert span["parent_span_id"] in by_id, f"{span['name']}'s parent was not recorded"
        return by_id[span["parent_span_id"]]

    # The caller's span is the gateway's parent; the gateway's, the agent's request's.
    front = _one(spans, "gateway", "POST /v1/agent")
    assert front["attributes"]["url.path"] == "/v1/agent/runs"
    assert front["parent_span_id"] == parent[36:52]
    assert front["attributes"]["crucible.project_id"]
    accepted = [
        s for s in spans if s["service"] == "agent" and s["parent_span_id"] == front["span_id"]
    ]
    assert len(accepted) == 1 and accepted[0]["kind"] == 2  # a server span
    run_span = _one(spans, "agent", "agent.run")
    assert parent_of(run_span) is accepted[0]
    assert run_span["attributes"]["crucible.run_id"] == run["id"]

    # Each model call: agent → gateway → vLLM, one under the other.
    calls = [s for s in spans if s["name"] == "agent.model_call"]
    assert len(calls) == run["usage"]["model_calls"]
    for call in calls:
        assert parent_of(call) is run_span
        (hop,) = [s for s in spans if s["parent_span_id"] == call["span_id"]]
        assert (hop["service"], hop["name"]) == ("gateway", "POST /v1/chat/completions")
        engine = [s for s in spans if s["parent_span_id"] == hop["span_id"]]
        assert [(s["service"], s["name"]) for s in engine] == [("vllm", "llm_request")]

    # The search: agent's tool span → its call to retrieval → retrieval's own request span.
    tool = _one(spans, "agent", "agent.tool search_documents")
    assert parent_of(tool) is run_span
    below = [s for s in spans if parent_of_id(s, tool["span_id"], spans)]
    assert any(s["service"] == "retrieval" and s["kind"] == 2 for s in below), below

    # `crucible trace` prints the same tree, indented by depth.
    printed = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "crucible"), "trace", trace_id],
        env={**os.environ, "CRUCIBLE_VAR_DIR": str(stack.config.var_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    print(printed)
    lines = printed.splitlines()
    assert lines[1].endswith("gateway: POST /v1/agent")  # the root: its parent was the caller's

    def indent(text: str) -> int:
        tail = next(line for line in lines if line.endswith(text)).split(" | ", 1)[1]
        return len(tail) - len(tail.lstrip())

    assert indent("agent: agent.run") == 4  # gateway, the agent's request, the run
    assert indent("vllm: llm_request") == 10  # ... a model call, the gateway, vLLM

    # Its trace id is in the log lines of the services it went through.
    logged = {
        name: [
            json.loads(line)
            for line in stack.log_path(name).read_text().splitlines()
            if trace_id in line
        ]
        for name in ("gateway", "agent", "retrieval")
    }
    assert all(logged.values()), {k: len(v) for k, v in logged.items()}
    assert all(e["trace_id"] == trace_id for v in logged.values() for e in v)
    client.vector_stores.delete(vs.id)
    client.files.delete(made.id)


def parent_of_id(span: dict[str, Any], ancestor: str, spans: list[dict[str, Any]]) -> bool:
    """Whether `ancestor` is above `span`."""
    return any(s["span_id"] == ancestor for s in ancestors(span, spans))


def test_every_response_names_its_trace_and_a_bad_traceparent_starts_a_new_one(
    gateway_url: str, client: openai.OpenAI
) -> None:
    chat = client.chat.completions.with_raw_response.create(
        model=DENSE, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    minted = chat.headers["x-trace-id"]
    assert len(minted) == 32 and int(minted, 16)
    listed = client.models.with_raw_response.list()  # the gateway's own routes
    assert len(listed.headers["x-trace-id"]) == 32 and listed.headers["x-trace-id"] != minted
    for bad in ("00-" + "0" * 32 + "-" + "1" * 16 + "-01", "garbage", "01-zz"):
        r = httpx.get(
            f"{gateway_url}/v1/files",
            headers={"authorization": f"Bearer {client.api_key}", "traceparent": bad},
            timeout=10,
        )
        assert r.status_code == 200 and len(r.headers["x-trace-id"]) == 32
        assert r.headers["x-trace-id"] != "0" * 32
    refused = httpx.get(f"{gateway_url}/v1/files", headers={"traceparent": "x"}, timeout=10)
    assert refused.status_code == 401 and len(refused.headers["x-trace-id"]) == 32
    assert tracing.parse(b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01") is not None


def test_stored_completions_and_eval_runs_keep_the_trace_that_made_them(
    stack: Stack, client: openai.OpenAI
) -> None:
    chat = client.chat.completions.with_raw_response.create(
        model=DENSE, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, store=True
    )
    made = chat.parse()
    deadline = time.monotonic() + 20
    while True:  # stored through the capture outbox within moments
        try:
            stored = client.chat.completions.retrieve(made.id)
            break
        except openai.NotFoundError:
            assert time.monotonic() < deadline, "never stored"
            time.sleep(0.2)
    assert (stored.model_extra or {}).get("trace_id") == chat.headers["x-trace-id"]

    ev = client.evals.create(data_source_config=CUSTOM, testing_criteria=[SAID_SOMETHING])
    created = client.evals.runs.with_raw_response.create(
        ev.id, data_source=sampled(DENSE, items(1), max_tokens=2)
    )
    run = created.parse()
    trace_id = created.headers["x-trace-id"]
    assert (run.model_extra or {}).get("trace_id") == trace_id

    def engine_reached(spans: list[dict[str, Any]]) -> bool:
        return any(s["service"] == "vllm" for s in spans)

    # The eval worker (another process) records its run; its sample reaches vLLM.
    spans = _spans(stack, trace_id, engine_reached, timeout=120)
    (worker,) = [s for s in spans if s["name"] == "eval.run"]
    assert worker["service"] == "eval-worker"
    assert worker["attributes"]["crucible.eval_run_id"] == run.id
    engine = next(s for s in spans if s["service"] == "vllm")
    assert parent_of_id(engine, worker["span_id"], spans)  # its sample, under its run


def test_the_gateways_background_refreshes_are_not_traces(
    stack: Stack, client: openai.OpenAI
) -> None:
    """Its alias and quota tables are fetched every second: each would be a trace of its own."""
    db = stack.config.var_dir / "traces.db"
    chat = client.chat.completions.with_raw_response.create(
        model=DENSE, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    # The gateway's own spans do arrive (its batches leave every half second).
    spans_when(db, chat.headers["x-trace-id"], lambda s: any(x["service"] == "gateway" for x in s))
    with sqlite3.connect(db) as conn:
        refreshes = conn.execute(
            "SELECT count(*) FROM spans WHERE service = 'gateway' AND kind = 3"
            " AND parent_span_id = '' AND attributes LIKE '%/internal/%'"
        ).fetchone()[0]
        served = conn.execute(
            "SELECT count(*) FROM spans WHERE service = 'gateway' AND kind = 2"
        ).fetchone()[0]
    assert served >= 1 and refreshes == 0, (served, refreshes)


@pytest.fixture(autouse=True)
def _sink_up(stack: Stack, gateway_url: str) -> None:
    assert (stack.config.var_dir / "traces.db").exists(), "the trace sink is not running"

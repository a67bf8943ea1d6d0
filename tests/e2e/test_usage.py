"""OpenAI's Usage API through the gateway with the official `openai` client: every request an
engine served (chat, completions, a stream whose client did not ask for usage, embeddings) is
counted once, with the tokens its answer reported, in its key's project only; an admin sees
every project."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import DENSE
from tests.e2e.test_evals import CUSTOM, SAID_SOMETHING, finished, items, sampled

EMBEDDER = "all-MiniLM-L6-v2"


def _admin(gateway_url: str, admin_key: str, path: str, body: dict[str, Any]) -> Any:
    r = httpx.post(
        f"{gateway_url}{path}",
        headers={"authorization": f"Bearer {admin_key}"},
        json=body,
        timeout=30,
    )
    assert r.status_code < 300, r.text
    return r.json()


def _sdk(gateway_url: str, secret: str) -> openai.OpenAI:
    """The official client as the Usage API is called: with the key as its admin key."""
    return openai.OpenAI(
        base_url=f"{gateway_url}/v1", api_key=secret, admin_api_key=secret, max_retries=0
    )


def _usage(client: openai.OpenAI, **params: Any) -> Any:
    return client.admin.organization.usage.completions(**params).model_dump()


def _embedded(client: openai.OpenAI, **params: Any) -> Any:
    return client.admin.organization.usage.embeddings(**params).model_dump()


def test_each_served_request_is_counted_once_in_its_project(
    gateway_url: str, admin_key: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    project = _admin(gateway_url, admin_key, "/admin/projects", {"name": f"usage {tag}"})
    member = _admin(gateway_url, admin_key, "/admin/keys", {"project_id": project["id"], "rpm": 0})
    outsider = _admin(gateway_url, admin_key, "/admin/keys", {"owner": f"elsewhere-{tag}"})
    c, other = _sdk(gateway_url, member["key"]), _sdk(gateway_url, outsider["key"])
    start = int(time.time())
    same = {"X-Request-Id": f"reused-{tag}"}  # one id twice: still two requests counted
    chat = c.chat.completions.create(
        model=DENSE,
        messages=[{"role": "user", "content": "Name a metal."}],
        max_tokens=5,
        extra_headers=same,
    )
    text = c.completions.create(model=DENSE, prompt="Benzene is", max_tokens=4, extra_headers=same)
    stream = c.chat.completions.create(
        model=DENSE,
        messages=[{"role": "user", "content": "Name a gas."}],
        max_tokens=6,
        stream=True,  # no include_usage: the gateway counts it all the same
    )
    streamed = sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content)
    assert chat.usage is not None and text.usage is not None and streamed > 0
    known_in = chat.usage.prompt_tokens + text.usage.prompt_tokens
    known_out = chat.usage.completion_tokens + text.usage.completion_tokens

    deadline = time.monotonic() + 20
    while True:  # the usage outbox delivers to the finetune service within moments
        page = _usage(c, start_time=start, bucket_width="1d", group_by=["model", "api_key_id"])
        results = page["data"][0]["results"]
        if sum(r["num_model_requests"] for r in results) >= 3:
            break
        assert time.monotonic() < deadline, f"usage never arrived: {page}"
        time.sleep(0.2)
    assert len(results) == 1, results
    got = results[0]
    assert (got["model"], got["api_key_id"], got["project_id"]) == (DENSE, member["id"], None)
    assert got["num_model_requests"] == 3  # once each
    # The stream's own tokens (the client never saw them) on top of what the others reported.
    assert got["input_tokens"] > known_in and got["output_tokens"] >= known_out + streamed
    assert got["object"] == "organization.usage.completions.result"

    theirs = _usage(other, start_time=start, bucket_width="1d")
    assert theirs["data"][0]["results"] == []  # another project's usage is not theirs
    peek = _usage(other, start_time=start, project_ids=[project["id"]])
    assert peek["data"][0]["results"] == []

    every = _usage(
        _sdk(gateway_url, admin_key),  # an admin key sees any project
        start_time=start,
        project_ids=[project["id"]],
        group_by=["project_id"],
    )
    assert [(r["project_id"], r["num_model_requests"]) for r in every["data"][0]["results"]] == [
        (project["id"], 3)
    ]
    vectors = c.embeddings.create(model=EMBEDDER, input=["benzene", "toluene", "xylene"])
    deadline = time.monotonic() + 20
    while True:
        embedded = _embedded(c, start_time=start, group_by=["model"])
        if embedded["data"][0]["results"]:
            break
        assert time.monotonic() < deadline, f"embedding usage never arrived: {embedded}"
        time.sleep(0.2)
    assert embedded["data"][0]["results"] == [
        {
            "object": "organization.usage.embeddings.result",
            "input_tokens": vectors.usage.prompt_tokens,
            "num_model_requests": 1,
            "project_id": None,
            "user_id": None,
            "api_key_id": None,
            "model": EMBEDDER,
            "engine_seconds": embedded["data"][0]["results"][0]["engine_seconds"],
        }
    ]
    assert embedded["data"][0]["results"][0]["engine_seconds"] > 0
    # Embeddings are not completions.
    assert _usage(c, start_time=start)["data"][0]["results"][0]["num_model_requests"] == 3

    for bad in ({"bucket_width": "1w"}, {"limit": 32}, {"group_by": ["colour"]}):
        with pytest.raises(openai.BadRequestError) as refused:
            _usage(c, start_time=start, **bad)
        assert refused.value.param in bad
    with pytest.raises(openai.BadRequestError):
        c.get("/organization/usage/completions", cast_to=object)  # no start_time
    c.close()
    other.close()


def test_engine_time_attributed_to_requests_is_the_time_the_engine_was_busy_and_is_priced(
    gateway_url: str, admin_key: str
) -> None:
    """Requests overlap (three clients); the engine time the gateway attributes to them sums to
    the time at least one of them was in flight as the clients saw it (within 10%, less the
    clients' own trip per request), and the costs are that time at the test stack's $1 per
    engine-second (tests/conftest.py)."""
    tag = uuid.uuid4().hex[:8]
    project = _admin(gateway_url, admin_key, "/admin/projects", {"name": f"cost {tag}"})
    member = _admin(gateway_url, admin_key, "/admin/keys", {"project_id": project["id"], "rpm": 0})
    c = _sdk(gateway_url, member["key"])
    start = int(time.time())
    spans: list[tuple[float, float]] = []

    def client(n: int) -> None:
        for i in range(4):
            began = time.monotonic()
            c.chat.completions.create(
                model=DENSE,
                messages=[{"role": "user", "content": f"Name element {n * 4 + i}."}],
                max_tokens=40 + 8 * ((n + i) % 4),
                extra_body={"ignore_eos": True},  # long enough that the engine's time dominates
            )
            spans.append((began, time.monotonic()))
            time.sleep(0.05 * ((n + i) % 3))  # gaps, so the engine is idle at times

    threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy, end = 0.0, 0.0
    for began, ended in sorted(spans):  # the union of the spans
        busy += max(0.0, ended - max(began, end))
        end = max(end, ended)

    deadline = time.monotonic() + 20
    while True:
        results = _usage(c, start_time=start)["data"][0]["results"]
        if results and results[0]["num_model_requests"] >= 12:
            break
        assert time.monotonic() < deadline, f"usage never arrived: {results}"
        time.sleep(0.2)
    (got,) = results
    assert got["num_model_requests"] == 12
    attributed = got["engine_seconds"]
    # The clients' spans hold the gateway's and, beyond them, each request's own trip through
    # the SDK and the loopback: timed here on a call that does no engine work. On a loaded
    # host that trip made the clients' union 10.4% longer than the gateway's (CI-like run).
    trips = []
    for _ in range(5):
        began = time.monotonic()
        c.models.list()
        trips.append(time.monotonic() - began)
    trip = sorted(trips)[2]
    print(
        f"engine time attributed: {attributed:.3f} s; busy as the clients saw it: {busy:.3f} s;"
        f" a trip without the engine: {trip * 1000:.1f} ms"
    )
    assert attributed <= 1.05 * busy, (attributed, busy)  # never more than the engine was busy
    assert busy - attributed <= 0.10 * busy + 12 * trip, (attributed, busy, trip)

    costs = c.admin.organization.usage.costs(start_time=start, group_by=["line_item"])
    (line,) = costs.model_dump()["data"][0]["results"]
    assert line["line_item"] == f"{DENSE}, completions"
    assert line["amount"]["value"] == pytest.approx(attributed, abs=1e-5)  # $1 a second
    tokens = got["input_tokens"] + 2 * got["output_tokens"]  # at $1 and $2 a token
    assert line["hosted_equivalent"]["value"] == pytest.approx(tokens)
    c.close()


def test_vector_store_storage_is_reported_per_project(gateway_url: str, admin_key: str) -> None:
    tag = uuid.uuid4().hex[:8]
    project = _admin(gateway_url, admin_key, "/admin/projects", {"name": f"storage {tag}"})
    member = _admin(gateway_url, admin_key, "/admin/keys", {"project_id": project["id"], "rpm": 0})
    c = _sdk(gateway_url, member["key"])
    start = int(time.time())
    made = c.files.create(file=("notes.txt", b"Benzene is aromatic. " * 200), purpose="assistants")
    vs = c.vector_stores.create(name="storage", file_ids=[made.id])
    deadline = time.monotonic() + 60
    while (vs := c.vector_stores.retrieve(vs.id)).file_counts.completed < 1:
        assert time.monotonic() < deadline, "the file was never indexed"
        time.sleep(0.2)
    assert vs.usage_bytes > 0
    while True:  # recorded at the next snapshot (every 3 s in the test stack)
        page = c.admin.organization.usage.vector_stores(
            start_time=start, bucket_width="1d", group_by=["project_id"]
        ).model_dump()
        results = page["data"][0]["results"]
        if results and results[0]["usage_bytes"] == vs.usage_bytes:
            break
        assert time.monotonic() < deadline, f"storage never reported: {results}"
        time.sleep(0.5)
    assert [(r["project_id"], r["object"]) for r in results] == [
        (project["id"], "organization.usage.vector_stores.result")
    ]
    c.vector_stores.delete(vs.id)
    c.files.delete(made.id)
    c.close()


def _until(fetch: Any, ready: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not ready(got := fetch()):
        assert time.monotonic() < deadline, f"{what} never arrived: {got}"
        time.sleep(0.3)
    return got


def test_agent_and_eval_runs_are_each_recorded_once_whole(gateway_url: str, admin_key: str) -> None:
    """A run's record says what the run as a whole used: the agent's steps, tool calls and tool
    seconds, an eval's model calls, and their tokens, as the run object itself reports them;
    their calls stay among the completions, and the costs count them once."""
    tag = uuid.uuid4().hex[:8]
    project = _admin(gateway_url, admin_key, "/admin/projects", {"name": f"runs {tag}"})
    member = _admin(gateway_url, admin_key, "/admin/keys", {"project_id": project["id"], "rpm": 0})
    c = _sdk(gateway_url, member["key"])
    start = int(time.time())
    body = {
        "model": DENSE,
        "mode": "structured",
        "tool_choice": "required",  # a tool is called: its time is counted
        "messages": [{"role": "user", "content": "What is 18.015 * 3?"}],
        "tools": ["calculator"],
        "budgets": {"max_steps": 2, "max_tokens": 2000, "max_seconds": 90},
    }
    run: Any = c.post("/agent/runs", body=body, cast_to=object)
    run = _until(
        lambda: c.get(f"/agent/runs/{run['id']}", cast_to=object),
        lambda r: r["status"] not in ("queued", "in_progress"),
        "the agent run's end",
        120,
    )
    assert run["usage"]["model_calls"] >= 1 and run["usage"]["tool_calls"] >= 1, run

    def agent_usage() -> list[dict[str, Any]]:
        page: Any = c.get(
            "/organization/usage/agent_runs",
            options={"params": {"start_time": start, "group_by": ["model"]}},
            cast_to=object,
        )
        return page["data"][0]["results"]

    (agent,) = _until(agent_usage, bool, "the agent run's usage")  # read every 2 s in tests
    assert agent["object"] == "organization.usage.agent_runs.result"
    assert (agent["num_runs"], agent["model"]) == (1, DENSE)
    assert agent["steps"] == run["usage"]["model_calls"]
    assert agent["tool_calls"] == run["usage"]["tool_calls"]
    assert agent["input_tokens"] == run["usage"]["prompt_tokens"]
    assert agent["output_tokens"] == run["usage"]["completion_tokens"]
    assert agent["tool_seconds"] == pytest.approx(run["timings"]["tools_ms"] / 1000, abs=1e-5)

    ev = c.evals.create(data_source_config=CUSTOM, testing_criteria=[SAID_SOMETHING])
    eval_run = c.evals.runs.create(ev.id, data_source=sampled(DENSE, items(3)))
    done = finished(c, ev.id, eval_run.id)
    (per_model,) = done.per_model_usage

    def eval_usage() -> list[dict[str, Any]]:
        page: Any = c.get(
            "/organization/usage/eval_runs",
            options={"params": {"start_time": start, "group_by": ["model", "api_key_id"]}},
            cast_to=object,
        )
        return page["data"][0]["results"]

    (evaluated,) = _until(eval_usage, bool, "the eval run's usage")  # kept as it ended
    assert evaluated["num_runs"] == 1 and evaluated["api_key_id"] == member["id"]
    assert evaluated["num_model_requests"] == per_model.invocation_count == 3
    assert evaluated["input_tokens"] == per_model.prompt_tokens
    assert evaluated["output_tokens"] == per_model.completion_tokens

    # Every model call of both runs is a completion of the project, and is priced once.
    calls = 3 + run["usage"]["model_calls"]
    completions = _until(
        lambda: _usage(c, start_time=start)["data"][0]["results"],
        lambda r: r and r[0]["num_model_requests"] >= calls,
        "the runs' completions",
    )
    assert completions[0]["num_model_requests"] == calls
    costs = c.admin.organization.usage.costs(start_time=start, group_by=["line_item"])
    line_items = [r["line_item"] for r in costs.model_dump()["data"][0]["results"]]
    assert line_items == [f"{DENSE}, completions"]
    c.close()


def test_embeddings_count_against_a_token_budget(gateway_url: str, admin_key: str) -> None:
    """An embedding request reserves a token per byte it sends and is settled to the tokens
    the model counted; one that could pass the budget is refused before it is embedded."""
    tag = uuid.uuid4().hex[:8]
    project = _admin(gateway_url, admin_key, "/admin/projects", {"name": f"embed budget {tag}"})
    member = _admin(
        gateway_url,
        admin_key,
        "/admin/keys",
        {"project_id": project["id"], "rpm": 0, "budget_tokens": 400, "budget_period": "day"},
    )
    c = _sdk(gateway_url, member["key"])
    vectors = c.embeddings.create(model=EMBEDDER, input=["benzene", "toluene"])
    got = httpx.get(
        f"{gateway_url}/admin/keys/{member['id']}",
        headers={"authorization": f"Bearer {admin_key}"},
        timeout=10,
    ).json()
    assert got["budget_used"] == vectors.usage.prompt_tokens > 0  # settled to what was used
    with pytest.raises(openai.RateLimitError) as refused:  # 400 bytes could be 400 tokens
        c.embeddings.create(model=EMBEDDER, input="aromatic " * 45)
    assert refused.value.code == "insufficient_quota"
    after = httpx.get(
        f"{gateway_url}/admin/keys/{member['id']}",
        headers={"authorization": f"Bearer {admin_key}"},
        timeout=10,
    ).json()
    assert after["budget_used"] == got["budget_used"]  # nothing held for the refused one
    c.close()

"""A real Prometheus scraping the real native stack: after traffic through the gateway, every
target is up, every dashboard query returns data, and a stopped service fires its alert."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

import httpx
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from services.monitoring import JOBS, NATIVE_JOBS
from services.stack import Stack
from tests.conftest import DENSE, ROOT

DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
# Panels that need hardware this machine does not have: listed, with the reason, not run.
NEEDS_HARDWARE = {"gpu.json": "no GPU here: the DCGM exporter runs in compose on GPU hosts"}
CODEWORDS = ROOT / "tests" / "data" / "codewords.jsonl"


@pytest.fixture(scope="module")
def prom(stack: Stack, gateway_url: str) -> str:
    assert stack.pid("prometheus"), "Prometheus did not start: `make setup` installs it"
    return f"http://127.0.0.1:{stack.config.ports.prometheus}"


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert resp["status"] == "success", (expr, resp)
    result: list[dict[str, Any]] = resp["data"]["result"]
    return result


def wait_for(prom: str, expr: str, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not (result := query(prom, expr)):
        assert time.monotonic() < deadline, f"no data for {expr} after {timeout}s"
        time.sleep(0.5)
    return result


def one_round(client: openai.OpenAI, store_id: str, alias: str) -> None:
    """What a busy lab does in a minute, through the gateway."""
    hi: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
    client.chat.completions.create(model=DENSE, messages=hi, max_tokens=8)
    aliased = client.chat.completions.create(model=alias, messages=hi, max_tokens=2, store=True)
    client.post(
        f"/chat/completions/{aliased.id}/feedback",
        cast_to=cast(Any, object),
        body={"metric": "rating", "value": "good"},
    )
    stream = client.chat.completions.create(
        model=DENSE, messages=hi, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    assert [c for c in stream if c.usage]
    client.completions.create(model=DENSE, prompt="The reaction", max_tokens=8)
    doc = (ROOT / "bench/data/chemistry/caffeine.md").read_bytes()
    ok = client.vector_stores.files.upload_and_poll(
        vector_store_id=store_id, file=("caffeine.md", doc), poll_interval_ms=200
    )
    empty = client.vector_stores.files.upload_and_poll(
        vector_store_id=store_id, file=("empty.txt", b"   "), poll_interval_ms=200
    )
    assert ok.status == "completed" and empty.status == "failed"
    client.vector_stores.search(store_id, query="caffeine")
    client.vector_stores.search(store_id, query="caffeine", ranking_options={"ranker": "none"})
    client.embeddings.create(model="all-MiniLM-L6-v2", input=["a", "b"])
    upload = client.files.create(file=CODEWORDS.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=DENSE,
        training_file=upload.id,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}},
        },
    )
    # The learning loop: a stored completion with feedback, and an eval run.
    stored = client.chat.completions.create(
        model=DENSE, messages=[{"role": "user", "content": "hi"}], max_tokens=2, store=True
    )
    client.post(
        f"/chat/completions/{stored.id}/feedback",
        cast_to=cast(Any, object),
        body={"metric": "rating", "value": "good"},
    )
    ev = client.evals.create(
        name="observed",
        data_source_config={"type": "custom", "item_schema": {"type": "object"}},
        testing_criteria=[
            {
                "type": "string_check",
                "name": "same",
                "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}",
                "operation": "eq",
            }
        ],
    )
    graded = client.evals.runs.create(
        ev.id,
        data_source={
            "type": "jsonl",
            "source": {
                "type": "file_content",
                "content": [{"item": {"answer": "a"}, "sample": {"output_text": "a"}}],
            },
        },
    )
    # The dev model's random weights would as soon answer at once: its first step must call a tool.
    ask: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the molecular weight of aspirin?"}
    ]
    run = client.post(
        "/agent/runs",
        cast_to=cast(Any, object),
        body={
            "model": DENSE,
            "messages": ask,
            "tools": ["molecule_info"],
            "tool_choice": "required",
            "budgets": {"max_steps": 2, "max_seconds": 60},
        },
    )
    deadline = time.monotonic() + 120
    while client.fine_tuning.jobs.retrieve(job.id).status not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    while (done := client.get(f"/agent/runs/{run['id']}", cast_to=cast(Any, object)))["status"] in (
        "queued",
        "in_progress",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    while client.evals.runs.retrieve(graded.id, eval_id=ev.id).status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    print("agent steps:", [(s["type"], s.get("tool"), s.get("status")) for s in done["steps"]])


@pytest.fixture(scope="module")
def traffic(prom: str, client: openai.OpenAI) -> Iterator[None]:
    """Two rounds of traffic: a series born with its first observation shows no increase to
    `rate()`, so the second round, scraped after the first, is what the panels see (as in a
    platform that has been running)."""
    store = client.vector_stores.create(name="observed")
    alias = f"observed-{uuid.uuid4().hex[:8]}"
    route = [{"model": DENSE, "weight": 1}]
    client.post("/model_aliases", cast_to=object, body={"name": alias, "routes": route})
    deadline = time.monotonic() + 5
    while alias not in {m.id for m in client.models.list()}:
        assert time.monotonic() < deadline, "the alias was not routed within 5 s"
        time.sleep(0.1)
    one_round(client, store.id, alias)
    wait_for(prom, 'crucible_agent_runs_total{status=~"completed|incomplete"} > 0')
    time.sleep(2)
    one_round(client, store.id, alias)
    wait_for(prom, 'sum(crucible_agent_runs_total{status=~"completed|incomplete"}) > 1')
    wait_for(prom, 'sum(crucible_finetune_jobs{status="succeeded"}) > 1')
    time.sleep(3)  # the last of it scraped (1 s interval) before the queries
    yield
    client.vector_stores.delete(store.id)


def test_every_target_is_up(prom: str, traffic: None) -> None:
    targets = httpx.get(f"{prom}/api/v1/targets").json()["data"]["activeTargets"]
    health = {t["labels"]["job"]: t["health"] for t in targets}
    assert health == dict.fromkeys({**JOBS, **NATIVE_JOBS}, "up")


def panel_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        if path.name in NEEDS_HARDWARE:
            continue
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out.append((path.name, panel["title"], target["expr"]))
    return out


def test_every_dashboard_query_returns_data(prom: str, traffic: None) -> None:
    checked, empty = 0, []
    for board, title, expr in panel_queries():
        result = query(prom, expr)
        values = [float(r["value"][1]) for r in result]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{board} / {title}: {expr} -> {values}")
        checked += 1
    for board, reason in NEEDS_HARDWARE.items():
        print(f"skipped {board}: {reason}")
    print(f"{checked} dashboard queries evaluated against Prometheus")
    assert not empty, "\n".join(empty)
    assert checked >= 40


def test_a_stopped_service_turns_its_target_down_and_its_alert_true(
    prom: str, stack: Stack, traffic: None
) -> None:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    [down] = [r for g in rules["groups"] for r in g["rules"] if r["alert"] == "CrucibleTargetDown"]
    assert not [r for r in query(prom, down["expr"]) if r["metric"]["job"] == "agent"]
    stack.down_one("agent")
    try:
        fired = wait_for(prom, f'({down["expr"]}) and on(job) up{{job="agent"}}', timeout=20)
        assert fired[0]["metric"]["job"] == "agent"
        # Prometheus itself evaluates the rule: the alert is pending (it fires after `for`).
        deadline = time.monotonic() + 20
        while True:
            alerts = httpx.get(f"{prom}/api/v1/alerts").json()["data"]["alerts"]
            mine = [a for a in alerts if a["labels"]["alertname"] == "CrucibleTargetDown"]
            if any(a["labels"]["job"] == "agent" for a in mine):
                break
            assert time.monotonic() < deadline, alerts
            time.sleep(0.5)
    finally:
        stack.up(["agent"], echo=lambda _: None)
    wait_for(prom, 'up{job="agent"} == 1', timeout=30)

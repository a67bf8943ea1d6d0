"""Usage records as the finetune service keeps them (SQLite and PostgreSQL): a record delivered
twice is counted once, and OpenAI's usage buckets sum exactly what fell in each, grouped and
filtered as asked, a page at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.finetune.jobs import JobStore
from services.finetune.usage import UsageStore
from tests.processes import postgres_database

T0 = 1_767_225_600  # 2026-01-01 00:00 UTC


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UsageStore]:
    if request.param == "sqlite":
        jobs = JobStore(f"sqlite:///{tmp_path / 'finetune.db'}")
        yield UsageStore(jobs.session)
        return
    with postgres_database() as url:
        jobs = JobStore(url)
        yield UsageStore(jobs.session)
        jobs.engine.dispose()


def record(
    i: str, at: int, project: str, key: str, model: str, tin: int, tout: int, engine_s: float = 0
) -> Any:
    meta = {
        "engine_s": engine_s,
        "id": i,
        "at": at,
        "project_id": project,
        "api_key_id": key,
        "model": model,
        "input_tokens": tin,
        "output_tokens": tout,
        "input_cached_tokens": tin // 2,
    }
    return {b"meta": orjson.dumps(meta), b"request": b"", b"response": b""}


def test_redelivered_records_count_once_and_buckets_sum_what_fell_in_them(
    store: UsageStore,
) -> None:
    batch = [
        record("u1", T0 + 5, "lab", "key_a", "m1", 10, 3),
        record("u2", T0 + 59, "lab", "key_b", "m2", 20, 4),
        record("u3", T0 + 60, "lab", "key_a", "m1", 30, 5),
        record("u4", T0 + 200, "other", "key_c", "m1", 40, 6),
        {b"meta": b"not json"},
    ]
    assert store.ingest(batch) == 4
    assert store.ingest(batch[:3]) == 0  # the outbox delivered it again after a crash

    page = store.buckets("completions", T0, T0 + 240, 60, 10, [], {})
    assert [b["start_time"] for b in page["data"]] == [T0, T0 + 60, T0 + 120, T0 + 180]
    assert page["data"][2]["results"] == []  # a bucket without use is there, empty
    first = page["data"][0]["results"]
    assert len(first) == 1 and first[0]["project_id"] is None  # not grouped: null
    assert (first[0]["input_tokens"], first[0]["output_tokens"]) == (30, 7)
    assert (first[0]["input_cached_tokens"], first[0]["num_model_requests"]) == (15, 2)
    assert page["has_more"] is False and page["next_page"] is None

    grouped = store.buckets("completions", T0, T0 + 240, 60, 10, ["model", "api_key_id"], {})
    assert [
        (r["model"], r["api_key_id"], r["input_tokens"]) for r in grouped["data"][0]["results"]
    ] == [("m1", "key_a", 10), ("m2", "key_b", 20)]

    mine = store.buckets(
        "completions", T0, T0 + 240, 240, 1, ["project_id"], {"project_id": ["lab"]}
    )
    assert [(r["project_id"], r["num_model_requests"]) for r in mine["data"][0]["results"]] == [
        ("lab", 3)
    ]
    nothing = store.buckets("completions", T0, T0 + 240, 240, 1, [], {"project_id": []})
    assert nothing["data"][0]["results"] == []


def test_pages_follow_one_another_until_the_end(store: UsageStore) -> None:
    store.ingest([record(f"u{i}", T0 + 60 * i, "lab", "key_a", "m1", 1, 1) for i in range(5)])
    first = store.buckets("completions", T0, T0 + 300, 60, 2, [], {})
    assert [b["start_time"] for b in first["data"]] == [T0, T0 + 60]
    assert first["has_more"] and first["next_page"] == f"page_{T0 + 120}"
    last = store.buckets("completions", T0 + 240, T0 + 300, 60, 2, [], {})
    assert [b["start_time"] for b in last["data"]] == [T0 + 240]
    assert last["has_more"] is False
    assert last["data"][0]["results"][0]["num_model_requests"] == 1


def test_embeddings_are_their_own_kind(store: UsageStore) -> None:
    chat = record("c1", T0, "lab", "key_a", "m1", 10, 3)
    embed = orjson.loads(record("e1", T0, "lab", "key_a", "embedder", 7, 0, 0.25)[b"meta"])
    store.ingest([chat, {b"meta": orjson.dumps({**embed, "kind": "embeddings"})}])
    got = store.buckets("embeddings", T0, T0 + 60, 60, 1, ["model"], {})["data"][0]["results"]
    assert got == [
        {
            "object": "organization.usage.embeddings.result",
            "input_tokens": 7,
            "num_model_requests": 1,
            "project_id": None,
            "user_id": None,
            "api_key_id": None,
            "model": "embedder",
            "engine_seconds": 0.25,
        }
    ]
    chats = store.buckets("completions", T0, T0 + 60, 60, 1, [], {})["data"][0]["results"]
    assert [r["num_model_requests"] for r in chats] == [1]


def test_costs_price_engine_time_and_compare_with_a_hosted_price_list(store: UsageStore) -> None:
    store.ingest(
        [
            record("c1", T0 + 10, "lab", "key_a", "m1", 1_000, 200, engine_s=2.0),
            record("c2", T0 + 20, "lab", "key_b", "m2", 500, 100, engine_s=1.5),
            record("c3", T0 + 86_400, "other", "key_c", "m1", 10, 10, engine_s=0.5),
        ]
    )
    hosted = {"m1": {"input": 1.0, "output": 4.0}, "*": {"input": 2.0, "output": 8.0}}
    page = store.costs(T0, T0 + 2 * 86_400, 7, ["project_id", "line_item"], {}, 0.01, hosted)
    assert [b["start_time"] for b in page["data"]] == [T0, T0 + 86_400]
    first = page["data"][0]["results"]
    assert [(r["project_id"], r["line_item"], r["engine_seconds"]) for r in first] == [
        ("lab", "m1, completions", 2.0),
        ("lab", "m2, completions", 1.5),
    ]
    assert first[0]["amount"] == {"value": 0.02, "currency": "usd"}  # 2 s at $0.01
    # m1 at its own prices, m2 at the "*" ones: (1000 + 200 x 4) / 1e6, (500 x 2 + 100 x 8) / 1e6
    assert first[0]["hosted_equivalent"]["value"] == pytest.approx(0.0018)
    assert first[1]["hosted_equivalent"]["value"] == pytest.approx(0.0018)
    whole = store.costs(T0, T0 + 86_400, 7, [], {"project_id": ["lab"]}, 0.01, {})
    (total,) = whole["data"][0]["results"]
    assert total["amount"]["value"] == pytest.approx(0.035) and total["project_id"] is None
    assert total["hosted_equivalent"] is None  # no price list


def test_vector_store_storage_is_the_largest_snapshot_in_each_bucket(store: UsageStore) -> None:
    store.snapshot({"lab": 1_000, "other": 50}, at=T0 + 10)
    store.snapshot({"lab": 3_000, "other": 50}, at=T0 + 40)
    store.snapshot({"lab": 2_000}, at=T0 + 70)  # "other" deleted its stores
    per_project = store.storage(T0, T0 + 120, 60, 10, ["project_id"], {})
    assert [
        [(r["project_id"], r["usage_bytes"]) for r in b["results"]] for b in per_project["data"]
    ] == [[("lab", 3_000), ("other", 50)], [("lab", 2_000)]]
    summed = store.storage(T0, T0 + 120, 60, 10, [], {"project_id": ["lab", "other"]})
    assert [[r["usage_bytes"] for r in b["results"]] for b in summed["data"]] == [[3_050], [2_000]]
    assert summed["data"][0]["results"][0]["object"] == "organization.usage.vector_stores.result"
    # Snapshots are neither requests nor costs.
    assert store.buckets("completions", T0, T0 + 120, 120, 1, [], {})["data"][0]["results"] == []
    assert store.costs(T0, T0 + 120, 1, [], {}, 1.0, {})["data"][0]["results"] == []


def test_a_fine_tuning_job_costs_its_training_time(tmp_path: Path) -> None:
    import time

    from services.finetune.jobs import JobRow

    jobs = JobStore(f"sqlite:///{tmp_path / 'finetune.db'}")
    usage = UsageStore(jobs.session)
    now = time.time()
    with jobs.session.begin() as s:
        s.add(
            JobRow(
                id="ftjob-1",
                owner="lab",
                model="m1",
                training_file="file-1",
                seed=0,
                hyperparameters={},
                lora={},
                status="running",
                created_at=int(now) - 60,
                worker="w1",
                heartbeat_at=now - 5,  # trained 5 s since its last beat
            )
        )
    assert not jobs.heartbeat("ftjob-1", "w1")
    with jobs.session() as s:
        assert 5 <= s.get(JobRow, "ftjob-1").train_seconds < 6
    jobs.transition("ftjob-1", "succeeded", only_from=("running",), trained_tokens=4_000)
    start = int(now) - 10
    hosted = {"*": {"input": 1.0, "output": 1.0, "training": 25.0}}
    page = usage.costs(start, start + 86_400, 1, ["project_id", "line_item"], {}, 0.5, hosted)
    (job,) = page["data"][0]["results"]
    assert (job["project_id"], job["line_item"]) == ("lab", "m1, fine-tuning")
    assert 5 <= job["engine_seconds"] < 6 and job["amount"]["value"] == pytest.approx(
        job["engine_seconds"] * 0.5
    )
    assert job["hosted_equivalent"]["value"] == pytest.approx(0.1)  # 4,000 tokens at $25/M
    other = usage.costs(start, start + 86_400, 1, [], {"project_id": ["other"]}, 0.5, hosted)
    assert other["data"][0]["results"] == []
    jobs.engine.dispose()


def test_runs_are_kept_once_each_apart_from_the_costs(store: UsageStore) -> None:
    """An agent run read twice (the collector re-reads an overlap) is one run; runs are their
    own kinds, and the costs count their model calls once, as the completions they were."""
    run = {
        "id": "run_1",
        "at": T0 + 30,
        "kind": "agent_runs",
        "project_id": "lab",
        "api_key_id": "key_a",
        "model": "m1",
        "input_tokens": 900,
        "output_tokens": 90,
        "requests": 3,
        "tool_calls": 2,
        "tool_seconds": 0.25,
    }
    assert store.keep([run, {**run, "id": "run_2", "tool_seconds": 0.5}]) == 2
    assert store.keep([run]) == 0  # read again: kept once
    assert store.keep([{"id": "bad"}, {**run, "id": "run_3", "at": "soon"}]) == 0
    store.keep([{**run, "id": "evalrun_1", "kind": "eval_runs", "tool_calls": 0}])
    store.ingest([record("c1", T0 + 31, "lab", "key_a", "m1", 900, 90, engine_s=2.0)])
    assert store.last("agent_runs") == T0 + 30 and store.last("costs") == 0

    (agent,) = store.buckets("agent_runs", T0, T0 + 60, 60, 1, ["model"], {})["data"][0]["results"]
    assert agent == {
        "object": "organization.usage.agent_runs.result",
        "num_runs": 2,
        "steps": 6,
        "tool_calls": 4,
        "tool_seconds": 0.75,
        "input_tokens": 1_800,
        "output_tokens": 180,
        "project_id": None,
        "api_key_id": None,
        "model": "m1",
    }
    (evaluated,) = store.buckets("eval_runs", T0, T0 + 60, 60, 1, [], {})["data"][0]["results"]
    assert (evaluated["num_runs"], evaluated["num_model_requests"]) == (1, 3)
    elsewhere = store.buckets("agent_runs", T0, T0 + 60, 60, 1, [], {"project_id": ["other"]})
    assert elsewhere["data"][0]["results"] == []

    (cost,) = store.costs(T0, T0 + 60, 1, ["line_item"], {}, 1.0, {})["data"][0]["results"]
    assert (cost["line_item"], cost["amount"]["value"]) == ("m1, completions", 2.0)


def test_the_monthly_report_prices_what_was_used(tmp_path: Path) -> None:
    from services.finetune.usage import report

    jobs = JobStore(f"sqlite:///{tmp_path / 'finetune.db'}")
    store = UsageStore(jobs.session)
    store.ingest(
        [
            record("c1", T0 + 10, "lab", "key_a", "m1", 1_000, 200, engine_s=3.0),
            record("c2", T0 + 86_400 * 40, "lab", "key_a", "m1", 10, 10, engine_s=1.0),  # later
            record("c3", T0 + 20, "other", "key_b", "m1", 100, 10, engine_s=0.5),
        ]
    )
    store.keep(
        [
            {
                **orjson.loads(record("r1", T0 + 30, "lab", "k", "m1", 5, 5)[b"meta"]),
                "kind": "agent_runs",
                "requests": 2,
            }
        ]
    )
    rows = report(store, T0, T0 + 31 * 86_400, 0.5, {"*": {"input": 1.0, "output": 2.0}})
    assert [(r["project_id"], r["kind"], r["requests"], r["cost_usd"]) for r in rows] == [
        ("lab", "completions", 1, 1.5),  # 3 s at $0.5: largest first
        ("other", "completions", 1, 0.25),
        ("lab", "agent_runs", 1, None),  # its calls are priced as completions
    ]
    assert rows[0]["hosted_usd"] == pytest.approx((1_000 + 2 * 200) / 1e6)
    assert rows[0]["engine_seconds"] == 3.0
    jobs.engine.dispose()

"""The alias store's judges on a real SQLite database: the gate's bars (a pass rate, no worse than
the incumbent by more than δ) and the guard's (error ratio, p95 latency, negative feedback),
each read from what the gateways reported, within the window and the current revision only."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.common.errors import Conflict
from services.finetune.aliases import AliasStore, RevisionRow
from services.finetune.aliasgate import check_gate, guard_round, verdict
from services.finetune.captures import CaptureStore, CompletionRow, FeedbackRow
from services.finetune.evals import EvalRow, EvalStore, OutputRow, RunRow
from services.finetune.jobs import JobStore


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[JobStore]:
    store = JobStore(f"sqlite:///{tmp_path / 'finetune.db'}")
    yield store
    store.engine.dispose()


def config(routes: dict[str, float], **more: Any) -> dict[str, Any]:
    return {
        "routes": [{"model": m, "weight": w} for m, w in routes.items()],
        "sticky": "user",
        "gate": None,
        "guard": None,
        **more,
    }


GUARD = {
    "window_s": 60,
    "min_requests": 10,
    "max_error_ratio": 0.2,
    "max_p95_ms": 1000,
    "max_negative_feedback_ratio": 0.5,
    "feedback_metric": "rating",
    "negative_values": ["bad"],
}


def canary(store: AliasStore, guard: dict[str, Any] = GUARD) -> tuple[Any, RevisionRow]:
    """An alias on `base`, then a revision that raises `cand` to 10%."""
    store.create("lab", "chem", config({"base": 100}, guard=guard), "key_a", None)
    row, rev = store.get("lab", "chem")
    return store.change(
        row, rev, config({"base": 90, "cand": 10}, guard=guard), "key_a", "promote", None
    )


def report(
    store: AliasStore, row: Any, rev: int, target: str, n: int, status: int, ms: float
) -> None:
    meta = {"alias_id": row.id, "revision": rev, "target": target, "status": status, "ms": ms}
    store.ingest([{b"meta": orjson.dumps(meta)}] * n)


def test_the_guard_judges_error_ratio_only_past_min_requests(jobs: JobStore) -> None:
    store, captures = AliasStore(jobs.session), CaptureStore(jobs.session)
    row, rev = canary(store)
    before = store.revision(row.id, 1)
    report(store, row, 2, "cand", 5, 500, 10)  # all failed, but fewer than min_requests
    assert verdict(store, captures, row, rev, before, time.time()) is None
    report(store, row, 1, "cand", 50, 500, 10)  # an older revision's traffic does not count
    report(store, row, 2, "base", 50, 500, 10)  # nor another target's
    assert verdict(store, captures, row, rev, before, time.time()) is None
    report(store, row, 2, "cand", 5, 200, 10)
    bar, seen = verdict(store, captures, row, rev, before, time.time())  # type: ignore[misc]
    assert bar == "error_ratio" and seen["requests"] == 10 and seen["error_ratio"] == 0.5
    told: list[tuple[str, str]] = []
    assert guard_round(store, captures, lambda a, b: told.append((a, b))) == 1
    assert told == [("lab/chem", "error_ratio")]
    row, now = store.get("lab", "chem")
    assert (now.number, now.action, now.restored, now.actor) == (3, "auto_rollback", 1, "guard")
    assert guard_round(store, captures, lambda a, b: None) == 0  # the rollback raised nothing


def test_the_guard_reads_p95_from_the_reported_buckets(jobs: JobStore) -> None:
    store, captures = AliasStore(jobs.session), CaptureStore(jobs.session)
    row, rev = canary(store)
    before = store.revision(row.id, 1)
    report(store, row, 2, "cand", 19, 200, 40)
    report(store, row, 2, "cand", 1, 200, 4000)  # the slowest 5%: p95 still in the 50 ms bucket
    assert verdict(store, captures, row, rev, before, time.time()) is None
    report(store, row, 2, "cand", 2, 200, 4000)
    bar, seen = verdict(store, captures, row, rev, before, time.time())  # type: ignore[misc]
    assert bar == "p95_ms" and seen["p95_ms"] == 5000


def test_the_guard_counts_negative_feedback_on_the_candidates_answers(jobs: JobStore) -> None:
    store, captures = AliasStore(jobs.session), CaptureStore(jobs.session)
    row, rev = canary(store)
    before = store.revision(row.id, 1)
    now = time.time()
    with jobs.session.begin() as s:
        for i in range(12):
            model = "cand" if i < 10 else "base"
            s.add(
                CompletionRow(
                    id=f"c{i}",
                    owner="lab",
                    key_id="k",
                    model=model,
                    created_at=now,
                    request={},
                    response={},
                    prompt_hash="h",
                )
            )
            value = "bad" if i < 6 or i >= 10 else "good"
            s.add(
                FeedbackRow(
                    id=f"f{i}",
                    completion_id=f"c{i}",
                    owner="lab",
                    key_id="k",
                    metric="rating",
                    value=value,
                    value_text=value,
                    created_at=int(now),
                    updated_at=int(now),
                )
            )
    bar, seen = verdict(store, captures, row, rev, before, now + 1)  # type: ignore[misc]
    assert bar == "negative_feedback_ratio" and seen["feedback"] == 10
    assert seen["negative_feedback_ratio"] == 0.6
    # Outside the window (and before the revision), the same feedback does not count.
    assert verdict(store, captures, row, rev, before, now + 3600) is None


def add_run(jobs: JobStore, eval_id: str, model: str, passed: int, total: int) -> str:
    run_id = f"run_{model}_{passed}"
    with jobs.session.begin() as s:
        s.add(
            RunRow(
                id=run_id,
                eval_id=eval_id,
                owner="lab",
                key_id="k",
                name="r",
                model=model,
                status="completed",
                created_at=time.time(),
                data_source={},
                items=[],
                usage={},
                attempts=1,
                cancel_requested=False,
            )
        )
        s.flush()
        for i in range(total):
            s.add(
                OutputRow(
                    id=f"{run_id}_{i}",
                    run_id=run_id,
                    eval_id=eval_id,
                    item_index=i,
                    created_at=time.time(),
                    status="pass" if i < passed else "fail",
                    item={},
                    sample=None,
                    results=[],
                )
            )
    return run_id


def test_the_gate_holds_a_candidate_to_the_incumbent(jobs: JobStore) -> None:
    evals = EvalStore(jobs.session)
    with jobs.session.begin() as s:
        s.add(
            EvalRow(
                id="eval_1",
                owner="lab",
                name="qa",
                created_at=time.time(),
                data_source_config={},
                testing_criteria=[],
            )
        )
    gate = {"eval_id": "eval_1", "min_pass_rate": 0.5, "max_regression": 0.05}
    before = config({"base": 100}, gate=gate)
    after = config({"base": 90, "cand": 10}, gate=gate)
    add_run(jobs, "eval_1", "cand", 8, 10)
    with pytest.raises(Conflict) as err:
        check_gate(evals, "lab", "chem", before, after)
    assert err.value.code == "gate_run_missing" and "on base" in err.value.message
    base_run = add_run(jobs, "eval_1", "base", 9, 10)
    with pytest.raises(Conflict) as err:
        check_gate(evals, "lab", "chem", before, after)
    assert err.value.code == "gate_failed" and base_run in err.value.message
    add_run(jobs, "eval_1", "chem@cand", 9, 10)  # a later run, pinned through the alias
    evidence = check_gate(evals, "lab", "chem", before, after)
    assert evidence == {
        "cand": {
            "run_id": "run_chem@cand_9",
            "pass_rate": 0.9,
            "incumbent": {"model": "base", "run_id": base_run, "pass_rate": 0.9},
        }
    }
    # Lowering a share raises nothing: no run is needed to shrink a canary.
    assert check_gate(evals, "lab", "chem", after, before) == {}


def test_a_hand_off_whose_model_misses_the_gate_is_refused_and_says_why(jobs: JobStore) -> None:
    from types import SimpleNamespace

    from services.finetune.handoff import HandoffRow, HandoffStore, handoff_round
    from services.finetune.jobs import JobRow

    evals, aliases = EvalStore(jobs.session), AliasStore(jobs.session)
    state = SimpleNamespace(
        jobs=jobs, evals=evals, aliases=aliases, handoffs=HandoffStore(jobs.session)
    )
    with jobs.session.begin() as s:
        s.add(
            EvalRow(
                id="eval_1",
                owner="lab",
                name="qa",
                created_at=time.time(),
                data_source_config={},
                testing_criteria=[],
            )
        )
    gate = {"eval_id": "eval_1", "min_pass_rate": 0.8}
    aliases.create("lab", "chem", config({"base": 100}, gate=gate), "key_a", None)
    for job_id, model in (("ftjob-a", "ft:weak"), ("ftjob-b", "ft:orphan")):
        with jobs.session.begin() as s:
            s.add(
                JobRow(
                    id=job_id,
                    owner="lab",
                    model="base",
                    training_file="file-x",
                    seed=1,
                    hyperparameters={},
                    lora={},
                    status="succeeded",
                    fine_tuned_model=model,
                    created_at=int(time.time()),
                    attempts=1,
                    cancel_requested=False,
                )
            )
    weak = add_run(jobs, "eval_1", "ft:weak", 3, 10)
    orphan = add_run(jobs, "eval_1", "ft:orphan", 10, 10)
    for job_id, alias, run_id in (("ftjob-a", "chem", weak), ("ftjob-b", "gone", orphan)):
        state.handoffs.add(
            HandoffRow(
                job_id=job_id,
                owner="lab",
                key_id="key_a",
                alias=alias,
                weight=10,
                data_source={},
                status="evaluating",
                run_id=run_id,
                updated_at=time.time(),
            )
        )
    handoff_round(state)
    refused, failed = state.handoffs.get("ftjob-a"), state.handoffs.get("ftjob-b")
    assert refused is not None and refused.status == "refused" and weak in (refused.detail or "")
    assert failed is not None and failed.status == "failed" and "gone" in (failed.detail or "")
    assert aliases.get("lab", "chem")[1].number == 1  # the alias did not move
    events = [e["message"] for e in jobs.events("ftjob-a", "lab", 10, None)["data"]]
    assert any("Not promoted" in m and "30.0%" in m for m in events), events
    assert state.handoffs.open() == []  # nothing left to retry


def test_a_due_schedule_is_claimed_once(jobs: JobStore) -> None:
    from services.finetune.schedules import ScheduleRow, ScheduleStore, next_run

    store = ScheduleStore(jobs.session)
    now = time.time()
    store.add(
        ScheduleRow(
            id="ftsched_1",
            owner="lab",
            key_id="k",
            name="weekly",
            cron="0 3 * * 1",
            dataset={},
            window_days=None,
            job={},
            enabled=True,
            next_run_at=now - 1,
            created_at=now,
        )
    )
    [due] = store.due(now)
    first, second = store.claim(due, now), store.claim(due, now)  # two replicas, one stale read
    assert (first, second) == (True, False)
    assert store.due(now) == []
    assert store.get("ftsched_1").next_run_at == next_run("0 3 * * 1", now) > now

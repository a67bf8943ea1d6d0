"""The two judges of an alias's change: the gate (before: a raised target must have passed the
alias's evaluation) and the guard (after: a raised target that errs, slows or displeases is
rolled back by itself, with the numbers that crossed the bar as the revision's evidence)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from services.common.errors import Conflict
from services.finetune.aliases import PIN, AliasRow, AliasStore, RevisionRow, raised, shares
from services.finetune.captures import CaptureStore
from services.finetune.evals import EvalStore

log = logging.getLogger("crucible.finetune.aliases")


def check_gate(
    evals: EvalStore,
    owner: str,
    name: str,
    before: dict[str, Any] | None,
    after: dict[str, Any],
) -> dict[str, Any] | None:
    """Each target the change raises has a completed run of the gate's eval that clears its
    bars; else 409 naming the run that is missing or short. Returns the evidence."""
    gate = (before or after).get("gate")
    if not gate:
        return None
    eval_id = gate["eval_id"]
    evidence: dict[str, Any] = {}

    def rate_of(model: str) -> tuple[str, float]:
        found = evals.latest_completed(eval_id, owner, [model, f"{name}{PIN}{model}"])
        if found is None:
            raise Conflict(
                f"The gate of '{name}' needs a completed run of eval {eval_id} on {model}, "
                "and there is none: run it (client.evals.runs.create) and promote again.",
                param="model",
                code="gate_run_missing",
            )
        return found

    current = shares(before["routes"]) if before else {}
    for model in raised(before, after):
        run_id, rate = rate_of(model)
        seen: dict[str, Any] = {"run_id": run_id, "pass_rate": round(rate, 4)}
        bar = gate.get("min_pass_rate")
        if bar is not None and rate < bar:
            raise Conflict(
                f"{model} passed {rate:.1%} of eval {eval_id} (run {run_id}); "
                f"the gate of '{name}' needs {bar:.1%}.",
                param="model",
                code="gate_failed",
            )
        delta = gate.get("max_regression")
        incumbents = [m for m, v in sorted(current.items(), key=lambda kv: -kv[1]) if m != model]
        if delta is not None and incumbents and current[incumbents[0]] > 0:
            incumbent = incumbents[0]
            base_run, base = rate_of(incumbent)
            seen["incumbent"] = {
                "model": incumbent,
                "run_id": base_run,
                "pass_rate": round(base, 4),
            }
            if rate < base - delta:
                raise Conflict(
                    f"{model} passed {rate:.1%} of eval {eval_id} (run {run_id}), worse than "
                    f"{incumbent}'s {base:.1%} (run {base_run}) by more than {delta:.1%}.",
                    param="model",
                    code="gate_failed",
                )
        evidence[model] = seen
    return evidence


def verdict(
    store: AliasStore,
    captures: CaptureStore,
    row: AliasRow,
    rev: RevisionRow,
    before: RevisionRow | None,
    now: float,
) -> tuple[str, dict[str, Any]] | None:
    """The bar a raised target of the current revision crossed, with what was seen; or None."""
    guard = rev.config["guard"]
    since = max(rev.created_at, now - guard["window_s"])
    enough = guard["min_requests"]
    for target in raised(before.config if before else None, rev.config):
        seen = store.observed(row.id, rev.number, target, since)
        seen["target"] = target
        n = seen["requests"]
        if n >= enough:
            ratio = (seen["errors"] + seen["unavailable"]) / n
            seen["error_ratio"] = round(ratio, 4)
            bar = guard.get("max_error_ratio")
            if bar is not None and ratio > bar:
                return "error_ratio", seen
            bar = guard.get("max_p95_ms")
            if bar is not None and seen["p95_ms"] is not None and seen["p95_ms"] > bar:
                return "p95_ms", seen
        bar = guard.get("max_negative_feedback_ratio")
        if bar is not None:
            judged, negative = captures.feedback_share(
                row.owner, target, since, guard["feedback_metric"], guard["negative_values"]
            )
            if judged >= enough and negative / judged > bar:
                seen |= {"feedback": judged, "negative_feedback_ratio": round(negative / judged, 4)}
                return "negative_feedback_ratio", seen
    return None


def alias_feedback(
    store: AliasStore, captures: CaptureStore, limit: int
) -> list[tuple[str, str, str, int]]:
    """(alias, target, value, how many): the feedback on each target's answers since the current
    revision, on the guard's feedback metric ("rating" without a guard)."""
    out = []
    for row, rev in store.current(limit):
        metric = (rev.config.get("guard") or {}).get("feedback_metric", "rating")
        models = [r["model"] for r in rev.config["routes"]]
        for model, value, n in captures.feedback_by_model(
            row.owner, models, rev.created_at, metric
        ):
            out.append((f"{row.owner}/{row.name}", model, value, n))
    return out


def guard_round(
    store: AliasStore,
    captures: CaptureStore,
    rolled_back: Callable[[str, str], None],
    now: float | None = None,
) -> int:
    """Every guarded alias judged once; `rolled_back(alias, bar)` is told of each rollback."""
    now = now or time.time()
    rolled = 0
    for row, rev, before in store.guarded():
        found = verdict(store, captures, row, rev, before, now)
        if found is None or before is None:
            continue
        bar, seen = found
        target = store.rollback_target(row, rev, None)
        reason = f"{seen['target']} crossed the guard's {bar} bar"
        try:
            store.change(
                row,
                rev,
                target.config,
                "guard",
                "auto_rollback",
                reason,
                restored=target.number,
                evidence={"bar": bar, **seen},
            )
        except Conflict:
            continue  # a person changed it meanwhile: their revision stands, judged next round
        rolled_back(f"{row.owner}/{row.name}", bar)
        log.warning(
            "alias rolled back by its guard",
            extra={"alias": row.name, "owner": row.owner, "bar": bar, "revision": rev.number},
        )
        rolled += 1
    return rolled

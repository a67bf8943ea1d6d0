"""Evaluations in OpenAI's Evals wire format: evals (what data, which graders), runs (a model or
an answer set over that data) and their output items, kept in SQL.

A run is created `queued` with its items resolved (a file, inline content or stored
completions); the eval worker (evalworker.py) claims it, samples and grades each item, and
writes one output item per item, which is unique per (run, item): a worker killed mid-run is
replaced, the run resumes from what was written, and no item is graded twice.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any

import jsonschema
from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    and_,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from services.common.errors import InvalidRequest, NotFound
from services.common.metadata import check_metadata
from services.common.pagination import PageQuery, listing, page
from services.finetune.jobs import Base

MAX_CRITERIA = 20
MAX_ITEMS = 10_000
MAX_TEMPLATE = 64 << 10
MAX_DEPTH = 8
RUN_FINAL = ("completed", "failed", "canceled")
TEMPLATE_RE = re.compile(r"\{\{\s*(item|sample)((?:\.[A-Za-z0-9_]+)*)\s*\}\}")
SAMPLE_FIELDS = {"output_text", "output_json", "output_tools", "choices", "model", "finish_reason"}
GRADERS = {
    "string_check",
    "text_similarity",
    "label_model",
    "score_model",
    "json_schema",
    "smiles_match",
    "retrieval",
}
SIMILARITY = {"fuzzy_match", "bleu", "rouge_1", "rouge_2", "rouge_l"}
STORED_ITEM = {  # what an item from stored completions holds (logs / stored_completions evals)
    "type": "object",
    "properties": {
        "input": {"type": "array"},
        "output_text": {"type": ["string", "null"]},
        "completion_id": {"type": "string"},
        "model": {"type": "string"},
        "metadata": {"type": "object"},
    },
}
SAMPLE_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "choices": {"type": "array"},
        "output_text": {"type": "string"},
        "output_json": {},
        "output_tools": {"type": "array"},
        "finish_reason": {"type": "string"},
    },
}


class EvalRow(Base):
    __tablename__ = "evals"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[float] = mapped_column(Float, index=True)
    data_source_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    testing_criteria: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)


class RunRow(Base):
    __tablename__ = "eval_runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    eval_id: Mapped[str] = mapped_column(ForeignKey("evals.id"), index=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    key_id: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(256))
    model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    data_source: Mapped[dict[str, Any]] = mapped_column(JSON)
    items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    usage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)


class OutputRow(Base):
    __tablename__ = "eval_output_items"
    __table_args__ = (UniqueConstraint("run_id", "item_index"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("eval_runs.id"), index=True)
    eval_id: Mapped[str] = mapped_column(String(40))
    item_index: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    status: Mapped[str] = mapped_column(String(8), index=True)  # pass, fail, error
    item: Mapped[dict[str, Any]] = mapped_column(JSON)
    sample: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    results: Mapped[list[dict[str, Any]]] = mapped_column(JSON)


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# --- checking what a client sends -----------------------------------------------------------


def _depth(value: Any, level: int = 0) -> int:
    if isinstance(value, dict):
        return max([_depth(v, level + 1) for v in value.values()], default=level + 1)
    if isinstance(value, list):
        return max([_depth(v, level + 1) for v in value], default=level + 1)
    return level


def templates_in(value: Any) -> list[tuple[str, str]]:
    """Every {{namespace.path}} reference in a grader or an input template."""
    if isinstance(value, str):
        return [(m.group(1), m.group(2).lstrip(".")) for m in TEMPLATE_RE.finditer(value)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in templates_in(v)]
    if isinstance(value, list):
        return [t for v in value for t in templates_in(v)]
    return []


def check_references(value: Any, item_schema: dict[str, Any], param: str) -> None:
    """A reference to a field the items cannot have is a 400 naming it."""
    if len(json.dumps(value)) > MAX_TEMPLATE:
        raise InvalidRequest(f"{param} is over {MAX_TEMPLATE} bytes of template", param=param)
    known = set((item_schema.get("properties") or {}).keys())
    open_schema = not known  # an item schema without properties says nothing of its fields
    for namespace, path in templates_in(value):
        head = path.split(".")[0] if path else ""
        if namespace == "item" and not open_schema and head not in known:
            raise InvalidRequest(
                f"{param} refers to item.{path}, which the item schema does not have "
                f"(it has: {', '.join(sorted(known))})",
                param=param,
            )
        if namespace == "sample" and head not in SAMPLE_FIELDS:
            raise InvalidRequest(
                f"{param} refers to sample.{path}; a sample has {', '.join(sorted(SAMPLE_FIELDS))}",
                param=param,
            )


def check_criteria(criteria: Any, item_schema: dict[str, Any]) -> list[dict[str, Any]]:
    if not isinstance(criteria, list) or not criteria:
        raise InvalidRequest("testing_criteria must be a non-empty array", param="testing_criteria")
    if len(criteria) > MAX_CRITERIA:
        raise InvalidRequest(
            f"{len(criteria)} testing criteria; at most {MAX_CRITERIA}", param="testing_criteria"
        )
    names = set()
    for i, c in enumerate(criteria):
        param = f"testing_criteria[{i}]"
        if not isinstance(c, dict):
            raise InvalidRequest(f"{param} must be an object", param=param)
        kind = c.get("type")
        if kind == "python":
            raise InvalidRequest(
                "the python grader is not offered: it would run code from the request on the "
                "server. Use string_check, text_similarity, json_schema, smiles_match, "
                "label_model or score_model",
                param=f"{param}.type",
            )
        if kind not in GRADERS:
            raise InvalidRequest(
                f"{param}.type {kind!r} is not a grader; one of {', '.join(sorted(GRADERS))}",
                param=f"{param}.type",
            )
        c.setdefault("name", f"{kind}-{i}")
        if c["name"] in names:
            raise InvalidRequest(f"two testing criteria are named {c['name']!r}", param=param)
        names.add(c["name"])
        _check_grader(c, param)
        check_references(c, item_schema, param)
    return criteria


def _need(c: dict[str, Any], field: str, param: str, kind: type | tuple[type, ...] = str) -> Any:
    value = c.get(field)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidRequest(f"{param}.{field} is required ({c['type']})", param=f"{param}.{field}")
    return value


def _check_grader(c: dict[str, Any], param: str) -> None:
    kind = c["type"]
    if kind in ("string_check", "text_similarity", "smiles_match"):
        _need(c, "input", param)
        _need(c, "reference", param)
    if kind == "string_check" and c.get("operation") not in ("eq", "ne", "like", "ilike"):
        raise InvalidRequest(
            f"{param}.operation must be eq, ne, like or ilike", param=f"{param}.operation"
        )
    if kind == "text_similarity":
        if c.get("evaluation_metric") not in SIMILARITY:
            raise InvalidRequest(
                f"{param}.evaluation_metric must be one of {', '.join(sorted(SIMILARITY))}",
                param=f"{param}.evaluation_metric",
            )
        _need(c, "pass_threshold", param, (int, float))
    if kind == "json_schema":
        _need(c, "input", param)
        schema = _need(c, "schema", param, dict)
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise InvalidRequest(
                f"{param}.schema: {exc.message}", param=f"{param}.schema"
            ) from None
    if kind == "retrieval":
        _need(c, "vector_store_id", param)
        _need(c, "query", param)
        _need(c, "expected", param)
        if c.get("metric", "hit") not in ("hit", "mrr"):
            raise InvalidRequest(f"{param}.metric must be hit or mrr", param=f"{param}.metric")
        k = c.get("k", 5)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 50:
            raise InvalidRequest(f"{param}.k must be an integer from 1 to 50", param=f"{param}.k")
    if kind in ("label_model", "score_model"):
        _need(c, "model", param)
        messages = _need(c, "input", param, list)
        if not messages or not all(isinstance(m, dict) for m in messages):
            raise InvalidRequest(f"{param}.input must be messages", param=f"{param}.input")
    if kind == "label_model":
        labels = _need(c, "labels", param, list)
        passing = _need(c, "passing_labels", param, list)
        if not labels or not set(passing) <= set(labels):
            raise InvalidRequest(
                f"{param}.passing_labels must be a subset of labels",
                param=f"{param}.passing_labels",
            )


def config_object(config: Any) -> dict[str, Any]:
    """The eval's data_source_config as stored and returned (with its `schema`)."""
    if not isinstance(config, dict):
        raise InvalidRequest("data_source_config must be an object", param="data_source_config")
    kind = config.get("type")
    if kind == "custom":
        item_schema = config.get("item_schema")
        if not isinstance(item_schema, dict):
            raise InvalidRequest(
                "data_source_config.item_schema must be a JSON schema",
                param="data_source_config.item_schema",
            )
        try:
            jsonschema.Draft202012Validator.check_schema(item_schema)
        except jsonschema.SchemaError as exc:
            raise InvalidRequest(
                f"data_source_config.item_schema: {exc.message}",
                param="data_source_config.item_schema",
            ) from None
        with_sample = bool(config.get("include_sample_schema"))
        return {
            "type": "custom",
            "item_schema": item_schema,
            "include_sample_schema": with_sample,
            "schema": _schema(item_schema, with_sample),
        }
    if kind in ("logs", "stored_completions"):  # stored_completions: OpenAI's deprecated name
        metadata = config.get("metadata") or {}
        check_metadata(metadata, "data_source_config.metadata")
        return {"type": kind, "metadata": metadata, "schema": _schema(STORED_ITEM, True)}
    raise InvalidRequest(
        f"data_source_config.type {kind!r}: one of custom, logs, stored_completions",
        param="data_source_config.type",
    )


def _schema(item: dict[str, Any], with_sample: bool) -> dict[str, Any]:
    properties = {"item": item, **({"sample": SAMPLE_SCHEMA} if with_sample else {})}
    return {"type": "object", "properties": properties, "required": list(properties)}


def item_schema_of(config: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = config.get("item_schema") or STORED_ITEM
    return schema


def check_items(items: list[dict[str, Any]], schema: dict[str, Any], where: str) -> None:
    """Each item against the eval's item schema; an error names its line (or index)."""
    if len(items) > MAX_ITEMS:
        raise InvalidRequest(
            f"{len(items)} items; at most {MAX_ITEMS} per run", param="data_source"
        )
    if not items:
        raise InvalidRequest("the data source has no items", param="data_source")
    validator = jsonschema.Draft202012Validator(schema)
    for n, entry in enumerate(items, start=1):
        error = jsonschema.exceptions.best_match(validator.iter_errors(entry["item"]))
        if error is not None:
            at = "/".join(str(p) for p in error.absolute_path) or "item"
            raise InvalidRequest(
                f"{where} {n}: {at}: {error.message[:300]}", param="data_source.source"
            )
        if _depth(entry) > MAX_DEPTH + 2:
            raise InvalidRequest(f"{where} {n} is nested deeper than {MAX_DEPTH}")


# --- the API's objects -----------------------------------------------------------------------


def eval_object(row: EvalRow) -> dict[str, Any]:
    return {
        "object": "eval",
        "id": row.id,
        "name": row.name,
        "data_source_config": row.data_source_config,
        "testing_criteria": row.testing_criteria,
        "created_at": int(row.created_at),
        "metadata": row.metadata_ or {},
    }


def run_object(row: RunRow, counts: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "eval.run",
        "id": row.id,
        "eval_id": row.eval_id,
        "name": row.name,
        "model": row.model,
        "status": row.status,
        "created_at": int(row.created_at),
        "data_source": row.data_source,
        "metadata": row.metadata_ or {},
        "error": row.error,
        "report_url": f"/v1/evals/{row.eval_id}/runs/{row.id}/output_items",
        "result_counts": counts["result_counts"],
        "per_testing_criteria_results": counts["per_testing_criteria_results"],
        "per_model_usage": [
            {"model_name": model, "cached_tokens": 0, **usage}
            for model, usage in sorted((row.usage or {}).items())
        ],
    }


def output_object(row: OutputRow) -> dict[str, Any]:
    return {
        "object": "eval.run.output_item",
        "id": row.id,
        "run_id": row.run_id,
        "eval_id": row.eval_id,
        "created_at": int(row.created_at),
        "status": row.status,
        "datasource_item_id": row.item_index,
        "datasource_item": row.item,
        "results": row.results,
        "sample": row.sample,
    }


class EvalStore:
    def __init__(self, sessions: Any) -> None:
        self.session = sessions

    # evals

    def add_eval(self, row: EvalRow) -> dict[str, Any]:
        with self.session.begin() as s:
            s.add(row)
        return eval_object(row)

    def get_eval(self, eval_id: str, owner: str) -> EvalRow:
        with self.session() as s:
            row = s.get(EvalRow, eval_id)
        if row is None or row.owner != owner:
            raise NotFound(f"No such eval: {eval_id}", param="eval_id")
        return row

    def list_evals(self, owner: str, q: PageQuery) -> dict[str, Any]:
        with self.session() as s:
            stmt = select(EvalRow).where(EvalRow.owner == owner)
            rows, more = page(s, stmt, EvalRow.created_at, EvalRow.id, q)
        return listing([eval_object(r) for r in rows], more)

    def update_eval(self, eval_id: str, owner: str, changes: dict[str, Any]) -> dict[str, Any]:
        self.get_eval(eval_id, owner)
        with self.session.begin() as s:
            row = s.get(EvalRow, eval_id)
            assert row is not None
            if "name" in changes:
                row.name = changes["name"]
            if "metadata" in changes:
                row.metadata_ = changes["metadata"]
        return eval_object(self.get_eval(eval_id, owner))

    def delete_eval(self, eval_id: str, owner: str) -> None:
        self.get_eval(eval_id, owner)
        with self.session.begin() as s:
            runs = list(s.scalars(select(RunRow.id).where(RunRow.eval_id == eval_id)))
            s.execute(delete(OutputRow).where(OutputRow.run_id.in_(runs)))
            s.execute(delete(RunRow).where(RunRow.eval_id == eval_id))
            s.execute(delete(EvalRow).where(EvalRow.id == eval_id))

    # runs

    def add_run(self, row: RunRow) -> dict[str, Any]:
        with self.session.begin() as s:
            s.add(row)
        return self.run(row.id, row.owner, row.eval_id)

    def get_run(self, run_id: str, owner: str | None = None, eval_id: str | None = None) -> RunRow:
        with self.session() as s:
            row = s.get(RunRow, run_id)
        if (
            row is None
            or (owner is not None and row.owner != owner)
            or (eval_id is not None and row.eval_id != eval_id)
        ):
            raise NotFound(f"No such eval run: {run_id}", param="run_id")
        return row

    def run(self, run_id: str, owner: str, eval_id: str) -> dict[str, Any]:
        row = self.get_run(run_id, owner, eval_id)
        return run_object(row, self.counts(row))

    def list_runs(
        self, eval_id: str, owner: str, q: PageQuery, status: str | None
    ) -> dict[str, Any]:
        self.get_eval(eval_id, owner)
        with self.session() as s:
            stmt = select(RunRow).where(RunRow.eval_id == eval_id, RunRow.owner == owner)
            if status:
                stmt = stmt.where(RunRow.status == status)
            rows, more = page(s, stmt, RunRow.created_at, RunRow.id, q)
        return listing([run_object(r, self.counts(r)) for r in rows], more)

    def counts(self, row: RunRow) -> dict[str, Any]:
        with self.session() as s:
            by_status = dict(
                s.execute(
                    select(OutputRow.status, func.count())
                    .where(OutputRow.run_id == row.id)
                    .group_by(OutputRow.status)
                ).all()
            )
            results = list(s.scalars(select(OutputRow.results).where(OutputRow.run_id == row.id)))
        per: dict[str, dict[str, int]] = {}
        for item_results in results:
            for r in item_results:
                slot = per.setdefault(r["name"], {"passed": 0, "failed": 0})
                slot["passed" if r.get("passed") else "failed"] += 1
        return {
            "result_counts": {
                "total": sum(by_status.values()),
                "passed": by_status.get("pass", 0),
                "failed": by_status.get("fail", 0),
                "errored": by_status.get("error", 0),
            },
            "per_testing_criteria_results": [
                {"testing_criteria": name, **v} for name, v in per.items()
            ],
        }

    def cancel(self, run_id: str, owner: str, eval_id: str) -> dict[str, Any]:
        row = self.get_run(run_id, owner, eval_id)
        if row.status not in RUN_FINAL:
            with self.session.begin() as s:
                s.execute(update(RunRow).where(RunRow.id == run_id).values(cancel_requested=True))
                # Not started: cancelled now. Running: its worker stops within a heartbeat.
                s.execute(
                    update(RunRow)
                    .where(RunRow.id == run_id, RunRow.status == "queued")
                    .values(status="canceled")
                )
        return self.run(run_id, owner, eval_id)

    def delete_run(self, run_id: str, owner: str, eval_id: str) -> None:
        self.get_run(run_id, owner, eval_id)
        with self.session.begin() as s:
            s.execute(update(RunRow).where(RunRow.id == run_id).values(cancel_requested=True))
            s.execute(delete(OutputRow).where(OutputRow.run_id == run_id))
            s.execute(delete(RunRow).where(RunRow.id == run_id))

    def outputs(
        self, run_id: str, owner: str, eval_id: str, q: PageQuery, status: str | None
    ) -> dict[str, Any]:
        self.get_run(run_id, owner, eval_id)
        with self.session() as s:
            stmt = select(OutputRow).where(OutputRow.run_id == run_id)
            if status:
                stmt = stmt.where(OutputRow.status == status)
            rows, more = page(s, stmt, OutputRow.created_at, OutputRow.id, q)
        return listing([output_object(r) for r in rows], more)

    def output(self, item_id: str, run_id: str, owner: str, eval_id: str) -> dict[str, Any]:
        self.get_run(run_id, owner, eval_id)
        with self.session() as s:
            row = s.get(OutputRow, item_id)
        if row is None or row.run_id != run_id:
            raise NotFound(f"No such output item: {item_id}", param="output_item_id")
        return output_object(row)

    # the worker's side

    def claim(self, worker: str, stale_after: float) -> RunRow | None:
        """Take a queued run, or one whose worker went silent. One conditional UPDATE each."""
        now = time.time()
        runnable = or_(
            RunRow.status == "queued",
            and_(RunRow.status == "in_progress", RunRow.heartbeat_at < now - stale_after),
        )
        with self.session() as s:
            candidates = list(
                s.scalars(
                    select(RunRow.id)
                    .where(runnable, RunRow.cancel_requested.is_(False))
                    .order_by(RunRow.created_at)
                    .limit(5)
                )
            )
        for run_id in candidates:
            with self.session.begin() as s:
                took = s.execute(
                    update(RunRow)
                    .where(RunRow.id == run_id, runnable, RunRow.cancel_requested.is_(False))
                    .values(
                        status="in_progress",
                        worker=worker,
                        heartbeat_at=now,
                        attempts=RunRow.attempts + 1,
                    )
                ).rowcount
            if took:
                return self.get_run(run_id)
        return None

    def heartbeat(self, run_id: str, worker: str) -> bool:
        """Beat; whether the run should go on (not cancelled, deleted, or taken over)."""
        with self.session.begin() as s:
            s.execute(
                update(RunRow)
                .where(RunRow.id == run_id, RunRow.worker == worker)
                .values(heartbeat_at=time.time())
            )
            row = s.get(RunRow, run_id)
            return row is not None and not row.cancel_requested and row.worker == worker

    def done_indexes(self, run_id: str) -> set[int]:
        with self.session() as s:
            return set(s.scalars(select(OutputRow.item_index).where(OutputRow.run_id == run_id)))

    def add_output(self, row: OutputRow) -> bool:
        """Write an item's result once; False if it was already written."""
        from sqlalchemy.exc import IntegrityError

        try:
            with self.session.begin() as s:
                s.add(row)
        except IntegrityError:
            return False
        return True

    def add_usage(self, run_id: str, usage: dict[str, dict[str, int]]) -> None:
        with self.session.begin() as s:
            row = s.get(RunRow, run_id)
            if row is None:
                return
            merged = {m: dict(v) for m, v in (row.usage or {}).items()}
            for model, u in usage.items():
                slot = merged.setdefault(
                    model,
                    {
                        "invocation_count": 0,
                        "prompt_tokens": 0,
                        "completion_tokens": 0,
                        "total_tokens": 0,
                    },
                )
                for k, v in u.items():
                    slot[k] = slot.get(k, 0) + v
            row.usage = merged

    def finish(self, run_id: str, worker: str, status: str, error: dict[str, Any] | None) -> None:
        with self.session.begin() as s:
            s.execute(
                update(RunRow)
                .where(RunRow.id == run_id, RunRow.worker == worker)
                .values(status=status, error=error)
            )

    def cancel_requested_in_progress(self, worker: str) -> list[str]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(RunRow.id).where(
                        RunRow.worker == worker,
                        RunRow.status == "in_progress",
                        RunRow.cancel_requested.is_(True),
                    )
                )
            )

    def pass_rates(self, limit: int) -> list[tuple[str, str, float]]:
        """(eval name, model, share passed) of each eval's latest completed run per model."""
        with self.session() as s:
            latest = (
                select(RunRow.eval_id, RunRow.model, func.max(RunRow.created_at).label("at"))
                .where(RunRow.status == "completed")
                .group_by(RunRow.eval_id, RunRow.model)
                .subquery()
            )
            runs = s.execute(
                select(RunRow.id, EvalRow.name, RunRow.model)
                .join(
                    latest,
                    and_(RunRow.eval_id == latest.c.eval_id, RunRow.created_at == latest.c.at),
                )
                .join(EvalRow, EvalRow.id == RunRow.eval_id)
                .order_by(RunRow.created_at.desc())
                .limit(limit)
            ).all()
            out = []
            for run_id, name, model in runs:
                counts = dict(
                    s.execute(
                        select(OutputRow.status, func.count())
                        .where(OutputRow.run_id == run_id)
                        .group_by(OutputRow.status)
                    ).all()
                )
                total = sum(counts.values())
                if total:
                    out.append((name, model or "given", counts.get("pass", 0) / total))
        return out

    def status_counts(self) -> dict[str, int]:
        with self.session() as s:
            return dict(
                s.execute(select(RunRow.status, func.count()).group_by(RunRow.status)).all()
            )

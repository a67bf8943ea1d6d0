"""Datasets: a filter over stored completions, made into fine-tuning files in OpenAI's chat format.

A correction replaces the answer it corrects; completions whose prompts are the same (case and
spacing aside) collapse into one row (a corrected one wins, else the latest); the validation split
is stratified on a metadata key when asked; too few rows is a 400; the dataset remembers which
completions it came from.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from collections import defaultdict
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from sqlalchemy import JSON, Integer, String, select
from sqlalchemy.orm import Mapped, mapped_column

from services.common.errors import InvalidRequest, NotFound
from services.common.metadata import check_metadata
from services.common.pagination import PageQuery, listing, page
from services.finetune.captures import CompletionRow, Filter, value_text
from services.finetune.files import upload_file
from services.finetune.jobs import Base
from services.finetune.validation import TrainingFileError, parse

MAX_ROWS = 100_000
Value = StrictBool | StrictInt | StrictFloat | Annotated[StrictStr, Field(max_length=512)]


class DatasetFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    metadata: Annotated[dict[str, StrictStr], Field(max_length=16)] | None = None
    feedback: Annotated[dict[str, Value], Field(max_length=16)] | None = None
    created_after: Annotated[StrictInt, Field(ge=0, le=2**40)] | None = None  # Unix seconds
    created_before: Annotated[StrictInt, Field(ge=0, le=2**40)] | None = None

    def compile(self) -> Filter:
        check_metadata(self.metadata, "filter.metadata")
        return Filter(
            model=self.model,
            metadata=tuple((self.metadata or {}).items()),
            feedback=tuple((k, value_text(v)) for k, v in (self.feedback or {}).items()),
            created_after=self.created_after,
            created_before=self.created_before,
        )


class DatasetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: DatasetFilter = Field(default_factory=DatasetFilter)
    validation_split: Annotated[float, Field(ge=0, le=0.5)] = 0.0
    stratify_by: Annotated[StrictStr, Field(max_length=64)] | None = None
    min_rows: Annotated[int, Field(ge=1, le=MAX_ROWS)] = 10
    seed: StrictInt = 0
    metadata: dict[str, Any] | None = None


class DatasetRow(Base):
    __tablename__ = "fine_tuning_datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    created_at: Mapped[int] = mapped_column(Integer, index=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    counts: Mapped[dict[str, int]] = mapped_column(JSON)
    completion_ids: Mapped[list[str]] = mapped_column(JSON)


def dataset_object(row: DatasetRow) -> dict[str, Any]:
    return {
        "object": "fine_tuning.dataset",
        "id": row.id,
        "created_at": row.created_at,
        "training_file": row.training_file,
        "validation_file": row.validation_file,
        "filter": row.request.get("filter"),
        "validation_split": row.request.get("validation_split"),
        "stratify_by": row.request.get("stratify_by"),
        "metadata": row.request.get("metadata"),
        "counts": row.counts,
        "completion_ids": row.completion_ids,
    }


class DatasetStore:
    def __init__(self, sessions: Any) -> None:
        self.session = sessions

    def add(self, row: DatasetRow) -> dict[str, Any]:
        with self.session.begin() as s:
            s.add(row)
        return dataset_object(row)

    def retrieve(self, dataset_id: str, owner: str) -> dict[str, Any]:
        with self.session() as s:
            row = s.get(DatasetRow, dataset_id)
        if row is None or row.owner != owner:
            raise NotFound(f"No such dataset: {dataset_id}", param="dataset_id")
        return dataset_object(row)

    def list_datasets(self, owner: str, q: PageQuery) -> dict[str, Any]:
        with self.session() as s:
            stmt = select(DatasetRow).where(DatasetRow.owner == owner)
            rows, more = page(s, stmt, DatasetRow.created_at, DatasetRow.id, q)
        return listing([dataset_object(r) for r in rows], more)


def answer_of(row: CompletionRow, feedback: list[Any]) -> tuple[dict[str, Any] | None, bool]:
    """The assistant message to learn: the latest correction, else what the model said."""
    corrections = [f for f in feedback if f.correction]
    if corrections:
        chosen, corrected = max(corrections, key=lambda f: (f.updated_at, f.id)).correction, True
    else:
        choices = row.response.get("choices") or [{}]
        chosen, corrected = choices[0].get("message") or {}, False
    message = {"role": "assistant"}
    if chosen.get("content"):
        message["content"] = chosen["content"]
    if chosen.get("tool_calls"):
        message["tool_calls"] = chosen["tool_calls"]
    return (message if len(message) > 1 else None), corrected


def select_rows(
    matched: list[tuple[CompletionRow, list[Any]]],
) -> tuple[list[tuple[CompletionRow, dict[str, Any]]], dict[str, int]]:
    """One training row per distinct prompt (a corrected answer wins, else the latest)."""
    by_prompt: dict[str, tuple[CompletionRow, dict[str, Any], bool]] = {}
    empty = 0
    for row, feedback in matched:  # oldest first: a later one replaces an earlier one
        answer, corrected = answer_of(row, feedback)
        if answer is None:
            empty += 1
            continue
        held = by_prompt.get(row.prompt_hash)
        if held is None or corrected or not held[2]:
            by_prompt[row.prompt_hash] = (row, answer, corrected)
    chosen = [(r, a) for r, a, _ in by_prompt.values()]
    counts = {
        "matched": len(matched),
        "duplicates_collapsed": len(matched) - empty - len(chosen),
        "without_answer": empty,
        "corrected": sum(1 for _, _, c in by_prompt.values() if c),
    }
    return chosen, counts


def split(
    rows: list[tuple[CompletionRow, dict[str, Any]]], share: float, key: str | None, seed: int
) -> tuple[list[Any], list[Any]]:
    """Training and validation rows; stratified on metadata[key] (each group split alike)."""
    groups: dict[str, list[Any]] = defaultdict(list)
    for item in rows:
        groups[(item[0].metadata_ or {}).get(key, "") if key else ""].append(item)
    rng = random.Random(seed)  # noqa: S311 (a reproducible split, not a secret)
    train, valid = [], []
    for name in sorted(groups):
        group = groups[name]
        rng.shuffle(group)
        n = round(len(group) * share)
        valid += group[:n]
        train += group[n:]
    return train, valid


def jsonl(rows: list[tuple[CompletionRow, dict[str, Any]]]) -> str:
    lines = []
    for row, answer in rows:
        example: dict[str, Any] = {"messages": [*(row.request.get("messages") or []), answer]}
        if row.request.get("tools"):
            example["tools"] = row.request["tools"]
        lines.append(json.dumps(example, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def make_dataset(state: Any, owner: str, body: DatasetCreate) -> dict[str, Any]:
    check_metadata(body.metadata)
    matched = state.captures.rows(owner, body.filter.compile(), MAX_ROWS)
    if len(matched) > MAX_ROWS:
        raise InvalidRequest(f"the filter matches over {MAX_ROWS} completions", param="filter")
    rows, counts = select_rows(matched)
    if len(rows) < body.min_rows:
        raise InvalidRequest(
            f"the filter gives {len(rows)} rows (of {len(matched)} stored completions); "
            f"at least min_rows={body.min_rows} are needed",
            param="min_rows",
            code="too_few_rows",
        )
    train, valid = split(rows, body.validation_split, body.stratify_by, body.seed)
    if body.validation_split and not valid:
        raise InvalidRequest(
            "the validation split is empty: too few rows", param="validation_split"
        )
    texts = {"train": jsonl(train), "validation": jsonl(valid) if valid else None}
    try:
        parse(jsonl(train), min_examples=1)
    except TrainingFileError as exc:
        raise InvalidRequest(f"the selected completions are not trainable: {exc}") from None
    s = state.settings
    dataset_id = "ftds_" + secrets.token_hex(12)
    ids: dict[str, str | None] = {name: None for name in texts}
    for name, text in texts.items():
        if text is not None:
            ids[name] = upload_file(
                s.retrieval_url, s.internal_token, owner, f"{dataset_id}-{name}.jsonl", text
            )
    counts |= {"training": len(train), "validation": len(valid)}
    return state.datasets.add(
        DatasetRow(
            id=dataset_id,
            owner=owner,
            created_at=int(time.time()),
            request=body.model_dump(),
            training_file=ids["train"] or "",
            validation_file=ids["validation"],
            counts=counts,
            completion_ids=[r.id for r, _ in train + valid],
        )
    )

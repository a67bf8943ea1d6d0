"""Every table of the finetune schema (jobs and the model lifecycle), for migrations to compare."""

from services.finetune import (
    aliases,
    captures,
    datasets,
    evals,
    handoff,
    responses,
    schedules,
    usage,
)
from services.finetune.jobs import Base

__all__ = [
    "Base",
    "aliases",
    "captures",
    "datasets",
    "evals",
    "handoff",
    "responses",
    "schedules",
    "usage",
]

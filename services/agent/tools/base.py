"""What a tool is: a name, a description the model reads, a pydantic schema for its arguments,
and an async function. A `ToolError` is an answer for the model (an observation), not a crash."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel


class ToolError(Exception):
    """A tool could not do what was asked; the message goes back to the model."""


@dataclass
class ToolContext:
    """What a tool call may use: the run's owner and stores, and the service's shared parts."""

    owner: str
    vector_store_ids: list[str]
    deadline: float  # time.monotonic() by which the call must end
    services: Any  # the app's Services (retrieval client, chemistry sandbox)
    # Sources seen by this run, numbered S1, S2, ... for citations.
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    args: type[BaseModel]
    run: Callable[[Any, ToolContext], Awaitable[dict[str, Any]]]

    def parameters(self) -> dict[str, Any]:
        """The arguments' JSON schema, without pydantic's titles (what the model reads)."""
        return _strip_titles(self.args.model_json_schema())


def _strip_titles(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip_titles(v) for k, v in schema.items() if k != "title"}
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema

"""What an eval or a run may ask for, checked before anything is stored: data source configs,
testing criteria (known graders, their fields, templates over fields the items have) and items
against the eval's item schema. Every refusal is a 400 naming the param (and the line)."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

from services.common.errors import InvalidRequest
from services.common.metadata import check_metadata

MAX_CRITERIA = 20
MAX_ITEMS = 10_000
MAX_TEMPLATE = 64 << 10
MAX_DEPTH = 8
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
STORED_ITEM = {  # an item from stored completions or responses (logs / stored_completions evals)
    "type": "object",
    "properties": {
        "input": {"type": "array"},
        "output_text": {"type": ["string", "null"]},
        "completion_id": {"type": "string"},
        "response_id": {"type": "string"},
        "instructions": {"type": ["string", "null"]},
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


AGENT_FIELDS = {"tools", "vector_store_ids", "instructions", "budgets", "mode", "tool_choice"}
BUDGETS = {"max_steps", "max_tokens", "max_seconds"}


def check_agent(ds: dict[str, Any]) -> dict[str, Any]:
    """A run's agent configuration (Crucible's extension of a `completions` data source: the
    item is answered by an agent run with these tools, stores and budgets). The agent checks it
    again per call; this makes a typo a 400 at create, not 10,000 errored items."""
    from services.agent.tools import TOOLS

    agent, param = ds["agent"], "data_source.agent"
    if ds.get("type") != "completions" or not isinstance(ds.get("model"), str):
        raise InvalidRequest(
            "an agent samples a completions data source with a model", param="data_source.model"
        )
    if not isinstance(agent, dict):
        raise InvalidRequest(f"{param} must be an object", param=param)
    if unknown := set(agent) - AGENT_FIELDS:
        raise InvalidRequest(
            f"{param} has unknown fields {sorted(unknown)}; it may have {sorted(AGENT_FIELDS)}",
            param=f"{param}.{sorted(unknown)[0]}",
        )
    tools = agent.get("tools", [])
    if not isinstance(tools, list) or not all(t in TOOLS for t in tools):
        raise InvalidRequest(
            f"{param}.tools must be a list of {', '.join(sorted(TOOLS))}", param=f"{param}.tools"
        )
    stores = agent.get("vector_store_ids", [])
    if not isinstance(stores, list) or not all(isinstance(v, str) for v in stores):
        raise InvalidRequest(
            f"{param}.vector_store_ids must be a list of ids", param=f"{param}.vector_store_ids"
        )
    if "search_documents" in tools and not stores:
        raise InvalidRequest(
            "search_documents needs vector_store_ids to search", param=f"{param}.vector_store_ids"
        )
    budgets = agent.get("budgets", {})
    if not isinstance(budgets, dict) or not all(
        k in BUDGETS and isinstance(v, int | float) and not isinstance(v, bool) and v > 0
        for k, v in budgets.items()
    ):
        raise InvalidRequest(
            f"{param}.budgets may set {', '.join(sorted(BUDGETS))}, each a positive number",
            param=f"{param}.budgets",
        )
    if not isinstance(agent.get("instructions", ""), str):
        raise InvalidRequest(
            f"{param}.instructions must be a string", param=f"{param}.instructions"
        )
    if agent.get("mode", "auto") not in ("auto", "structured", "native"):
        raise InvalidRequest(f"{param}.mode: auto, structured or native", param=f"{param}.mode")
    if agent.get("tool_choice", "auto") not in ("auto", "required"):
        raise InvalidRequest(f"{param}.tool_choice: auto or required", param=f"{param}.tool_choice")
    return agent


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

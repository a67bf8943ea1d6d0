"""Training files, checked before a job is queued: every error names its line.

Two formats, as OpenAI's: chat (`{"messages": [...]}`, learning the assistant turns) and
prompt/completion (`{"prompt": ..., "completion": ...}`). One file holds one format.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from services.common import jsonl

ROLES = {"system", "user", "assistant", "tool", "developer"}
MIN_EXAMPLES = 10
MAX_ERRORS = 10


class TrainingFileError(ValueError):
    def __init__(self, errors: list[str]) -> None:
        shown = "; ".join(errors[:MAX_ERRORS])
        more = f" (and {len(errors) - MAX_ERRORS} more)" if len(errors) > MAX_ERRORS else ""
        super().__init__(f"invalid training file: {shown}{more}")
        self.errors = errors


def parse(
    text: str,
    *,
    min_examples: int = MIN_EXAMPLES,
    max_examples: int = 100_000,
    max_chars: int = 64_000,
) -> list[dict[str, Any]]:
    """The examples of a JSONL training file, or TrainingFileError listing what is wrong."""
    numbered = parse_numbered(
        text, min_examples=min_examples, max_examples=max_examples, max_chars=max_chars
    )
    return [example for _, example in numbered]


def parse_numbered(
    text: str,
    *,
    min_examples: int = MIN_EXAMPLES,
    max_examples: int = 100_000,
    max_chars: int = 64_000,
) -> list[tuple[int, dict[str, Any]]]:
    """`parse`, each example with its line number."""
    errors: list[str] = []
    examples: list[tuple[int, dict[str, Any]]] = []
    formats: set[str] = set()
    for number, line in jsonl.lines(text):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"line {number}: not valid JSON ({exc.msg})")
            continue
        problem, kind = _check(value)
        if problem:
            errors.append(f"line {number}: {problem}")
            continue
        if len(line) > max_chars:
            errors.append(f"line {number}: example longer than {max_chars} characters")
            continue
        formats.add(kind)
        examples.append((number, value))
    if len(formats) > 1:
        errors.append("the file mixes the chat and prompt/completion formats")
    if not errors and len(examples) < min_examples:
        errors.append(f"{len(examples)} examples; at least {min_examples} are needed")
    if len(examples) > max_examples:
        errors.append(f"{len(examples)} examples; at most {max_examples}")
    if errors:
        raise TrainingFileError(errors)
    return examples


def _check(value: Any) -> tuple[str | None, str]:
    if not isinstance(value, dict):
        return "expected a JSON object", ""
    if "messages" in value:
        return _check_messages(value["messages"]), "chat"
    if "prompt" in value or "completion" in value:
        for key in ("prompt", "completion"):
            if not isinstance(value.get(key), str) or not value[key]:
                return f"`{key}` must be a non-empty string", "completion"
        return None, "completion"
    return "expected `messages` (chat format) or `prompt` and `completion`", ""


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "`messages` must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object"
        if m.get("role") not in ROLES:
            return f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}"
        if not isinstance(m.get("content"), str):
            return f"messages[{i}].content must be a string"
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        return "an example needs an assistant message with content to learn from"
    return None


def check_lengths(
    numbered: list[tuple[int, dict[str, Any]]], tokenizer: Callable[[], Any], max_tokens: int
) -> None:
    """TrainingFileError naming each example longer than `max_tokens` as training encodes it.
    Only examples that could be that long are tokenized: a token is at least one byte of the
    text, and the chat template adds fewer tokens than the JSON spends on each message, so a
    line of at most `max_tokens // 2` bytes always fits (and the tokenizer, `tokenizer()`, is
    loaded only when some line is longer)."""
    from services.finetune.training import encode_example

    errors: list[str] = []
    for number, example in numbered:
        if len(json.dumps(example, ensure_ascii=False).encode()) <= max_tokens // 2:
            continue
        try:
            ids, _ = encode_example(tokenizer(), example, max_length=1 << 62)
        except ValueError as exc:
            errors.append(f"line {number}: {exc}")
            continue
        if len(ids) > max_tokens:
            errors.append(
                f"line {number}: the example is {len(ids)} tokens long; the limit is {max_tokens}"
            )
    if errors:
        raise TrainingFileError(errors)

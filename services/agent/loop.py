"""The agent loop: model step, tool calls, observations, until a final answer or a budget.

One run is one asyncio task. Each step is stored as it completes (and streamed to a listener):
a model call with its output and tokens, then each tool call with its arguments and its result
or error. Bad output from the model (unparseable, a tool not allowed, invalid arguments) and
tool errors go back to the model as observations; they cost a step, never crash the run.
Budgets (steps, tokens, seconds) end a run as `incomplete` with the reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from services.agent import prompt
from services.agent.clients import ModelCallError
from services.agent.runs import RunRow
from services.agent.tools import TOOLS, Tool, ToolContext, ToolError

_TRACER = trace.get_tracer("crucible.agent")
log = logging.getLogger("crucible.agent")
Emit = Callable[[str, dict[str, Any]], None]
CITATION = re.compile(r"\[(S\d{1,3})\]")
# A conservative guess of tokens per character, to keep a call inside the token budget before
# its prompt has been counted by the engine.
CHARS_PER_TOKEN = 2
MIN_STEP_TOKENS = 32


class StepLog:
    """A run's steps, written behind the loop: each batch in one transaction off the event
    loop, so the loop never waits for SQL. `flush` before the run's end state is written; a
    crash loses at most the steps of the last few milliseconds."""

    def __init__(self, store: Any, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self.pending: list[dict[str, Any]] = []
        self.writing: list[dict[str, Any]] = []
        self.usage: dict[str, int] = {}
        self.cancel_requested = False
        self.error: Exception | None = None
        self._task: asyncio.Task[None] | None = None

    def add(self, step: dict[str, Any], usage: dict[str, int]) -> None:
        if self.error is not None:  # storage failed: the run must not go on unrecorded
            raise self.error
        self.pending.append(step)
        self.usage = dict(usage)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while self.pending and self.error is None:
            self.writing, self.pending = self.pending, []
            try:
                cancel = await asyncio.to_thread(
                    self.store.add_steps, self.run_id, self.writing, self.usage
                )
            except Exception as exc:
                log.exception("storing steps failed", extra={"run_id": self.run_id})
                self.error = exc
                return
            self.cancel_requested |= cancel
            self.writing = []

    def unwritten(self) -> list[dict[str, Any]]:
        return [*self.writing, *self.pending]

    async def flush(self) -> None:
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        if self.error is not None:
            raise self.error


class Finished(Exception):
    """Ends the run with a status and its fields."""

    def __init__(self, status: str, **values: Any) -> None:
        super().__init__(status)
        self.status = status
        self.values = values


@dataclass
class Execution:
    row: RunRow
    services: Any
    emit: Emit
    convo: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("prompt_tokens", "completion_tokens", "total_tokens", "model_calls", "tool_calls"), 0
        )
    )
    index: int = 0
    model_s: float = 0.0
    tool_s: float = 0.0
    last_prompt_tokens: int = 0
    unsent_chars: int = 0

    def __post_init__(self) -> None:
        self.log = StepLog(self.services.store, self.row.id)
        self.tools: list[Tool] = [TOOLS[name] for name in self.row.tools]
        self.allowed = {t.name: t for t in self.tools}
        b = self.row.budgets
        self.deadline = time.monotonic() + b["max_seconds"]
        self.ctx = ToolContext(
            owner=self.row.owner,
            vector_store_ids=list(self.row.vector_store_ids),
            deadline=self.deadline,
            services=self.services,
        )
        self.convo = [{"role": "system", "content": self.row.instructions}, *self.row.messages]
        self.unsent_chars = sum(len(str(m.get("content") or "")) for m in self.convo)
        self.response_format: dict[str, Any] | None = None
        self.native: list[dict[str, Any]] | None = None
        if self.row.mode == "structured":
            self.response_format = _json_schema(prompt.action_schema(self.tools))
            self.required_format = _json_schema(prompt.action_schema(self.tools, False))
        elif self.tools:
            self.native = prompt.native_tools(self.tools)

    async def execute(self) -> Finished:
        b = self.row.budgets
        try:
            async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                for _ in range(b["max_steps"]):
                    await self._step()
                raise Finished("incomplete", incomplete_details={"reason": "max_steps"})
        except Finished as end:
            return end
        except TimeoutError:
            return Finished("incomplete", incomplete_details={"reason": "max_seconds"})

    async def _step(self) -> None:
        sv = self.services
        if self.log.cancel_requested:  # by another process; this one cancels the task itself
            raise Finished("cancelled")
        max_tokens = self._step_allowance()
        body: dict[str, Any] = {
            "model": self.row.model,
            "messages": self.convo,
            "max_tokens": max_tokens,
            "temperature": sv.settings.temperature,
        }
        first_required = self.row.tool_choice == "required" and not self.usage["model_calls"]
        if self.response_format:
            body["response_format"] = (
                self.required_format if first_required else self.response_format
            )
        if self.native:
            body["tools"] = self.native
            if first_required:
                body["tool_choice"] = "required"
        call0 = time.perf_counter()
        try:
            with _TRACER.start_as_current_span(
                "agent.model_call", kind=SpanKind.CLIENT, attributes={"crucible.step": self.index}
            ):
                answer = await sv.model.chat(self.row.key_id, self.row.owner, body, self.deadline)
        except ModelCallError as exc:
            self._record({"type": "model_call", "duration_ms": _ms(call0), "error": exc.message})
            code = "model_unavailable" if exc.status >= 500 else "model_error"
            raise Finished(
                "failed", error={"code": code, "message": exc.message, "status": exc.status}
            ) from None
        model_s = time.perf_counter() - call0
        self.model_s += model_s
        usage = answer.get("usage") or {}
        for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
            self.usage[k] += int(usage.get(k) or 0)
        self.usage["model_calls"] += 1
        self.last_prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.unsent_chars = 0
        choice = answer["choices"][0]
        message = choice["message"]
        step: dict[str, Any] = {
            "type": "model_call",
            "duration_ms": round(model_s * 1000, 2),
            "usage": usage,
            "finish_reason": choice.get("finish_reason"),
            "content": message.get("content"),
        }
        if message.get("tool_calls"):
            step["tool_calls"] = message["tool_calls"]
        calls, final, problem = self._parse(message, choice.get("finish_reason"))
        step["action"] = final or (
            {"tool_calls": [{"tool": c[0], "arguments": _plain(c[1])} for c in calls]}
            if calls
            else None
        )
        if problem:
            step["error"] = problem
        self._record(step)
        if self.usage["total_tokens"] > self.row.budgets["max_tokens"]:
            raise Finished("incomplete", incomplete_details={"reason": "max_tokens"})
        self._remember(message)
        if final is not None:
            raise Finished("completed", output=self._output(final))
        if problem:
            self._observe(None, "model_output", False, problem)
        for tool, args, call_id in calls:
            named = tool if tool in self.allowed else "unknown"
            with _TRACER.start_as_current_span(f"agent.tool {named}", attributes={"tool": named}):
                await self._tool(tool, args, call_id)

    def _step_allowance(self) -> int:
        b = self.row.budgets
        prompt_guess = self.last_prompt_tokens + self.unsent_chars // CHARS_PER_TOKEN + 16
        left = b["max_tokens"] - self.usage["total_tokens"] - prompt_guess
        allowance = min(self.services.settings.step_max_tokens, left)
        if allowance < MIN_STEP_TOKENS:
            raise Finished("incomplete", incomplete_details={"reason": "max_tokens"})
        return allowance

    def _parse(
        self, message: dict[str, Any], finish_reason: str | None
    ) -> tuple[list[tuple[str, Any, str | None]], dict[str, Any] | None, str | None]:
        """(tool calls, final answer, problem) from one model message."""
        if self.row.mode == "native":
            calls = []
            for tc in message.get("tool_calls") or []:
                fn = tc.get("function") or {}
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                except ValueError:
                    args = _Unparsed(fn.get("arguments"))
                calls.append((str(fn.get("name")), args, tc.get("id")))
            if calls:
                return calls, None, None
            text = message.get("content") or ""
            cited = list(dict.fromkeys(CITATION.findall(text)))
            return [], {"action": prompt.FINAL, "answer": text, "citations": cited}, None
        content = message.get("content") or ""
        if finish_reason == "length":
            return [], None, "your output was cut off at the step's token limit; answer shorter"
        try:
            action = json.loads(content)
        except ValueError:
            return [], None, "your output is not JSON; answer with one JSON action"
        if not isinstance(action, dict) or not isinstance(action.get("action"), str):
            return [], None, 'your output has no "action"; answer with one JSON action'
        if action["action"] == prompt.FINAL:
            try:
                final = prompt.FinalAnswer.model_validate(action)
            except ValidationError as exc:
                return [], None, f"invalid final answer: {_errors(exc)}"
            return [], final.model_dump(), None
        try:
            call = prompt.ToolAction.model_validate(action)
        except ValidationError as exc:
            return [], None, f"invalid action: {_errors(exc)}"
        return [(call.action, call.arguments, None)], None, None

    async def _tool(self, name: str, raw_args: Any, call_id: str | None) -> None:
        sv = self.services
        t0 = time.perf_counter()
        step: dict[str, Any] = {"type": "tool_call", "tool": name, "arguments": raw_args}
        if call_id:
            step["call_id"] = call_id
        tool = self.allowed.get(name)
        outcome, result, error = "ok", None, None
        if tool is None:
            outcome = "refused"
            error = f"tool {name!r} is not available in this run; available: " + (
                ", ".join(self.allowed) or "none"
            )
        elif isinstance(raw_args, _Unparsed):
            outcome, error = "invalid", "arguments are not valid JSON"
            step["arguments"] = raw_args.text
        else:
            try:
                args = tool.args.model_validate(raw_args)
            except ValidationError as exc:
                outcome, error = "invalid", f"invalid arguments: {_errors(exc)}"
            else:
                try:
                    result = await tool.run(args, self.ctx)
                except ToolError as exc:
                    outcome, error = "error", str(exc)
        elapsed = time.perf_counter() - t0
        self.tool_s += elapsed
        self.usage["tool_calls"] += 1
        sv.metrics.tool_calls.labels(name if tool else "unknown", outcome).inc()
        if tool is not None:
            sv.metrics.tool_seconds.labels(name).observe(elapsed)
        step |= {"status": "ok" if error is None else "error", "duration_ms": _ms(t0)}
        step |= {"result": result} if error is None else {"error": error}
        self._record(step)
        self._observe(call_id, name, error is None, result if error is None else error)

    def _remember(self, message: dict[str, Any]) -> None:
        kept: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        if self.row.mode == "native" and message.get("tool_calls"):
            kept["tool_calls"] = message["tool_calls"]
        self.convo.append(kept)

    def _observe(self, call_id: str | None, tool: str, ok: bool, payload: Any) -> None:
        text = prompt.observation(self.row.nonce, tool, ok, payload)
        if call_id is not None:
            self.convo.append({"role": "tool", "tool_call_id": call_id, "content": text})
        else:
            self.convo.append({"role": "user", "content": text})
        self.unsent_chars += len(text)

    def _output(self, final: dict[str, Any]) -> dict[str, Any]:
        sources = self.ctx.sources
        cited = [c for c in final.get("citations", []) if c in sources]
        return {
            "answer": final["answer"],
            "citations": [{"id": c, **_excerpt(sources[c])} for c in cited],
            "unresolved_citations": [c for c in final.get("citations", []) if c not in sources],
        }

    def _record(self, step: dict[str, Any]) -> None:
        step = {"index": self.index, **step}
        self.index += 1
        self.log.add(step, self.usage)
        self.emit("run.step", step)


class _Unparsed:
    def __init__(self, text: Any) -> None:
        self.text = str(text)[:2000]


def _json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "agent_action", "schema": schema}}


def _plain(args: Any) -> Any:
    return args.text if isinstance(args, _Unparsed) else args


def _excerpt(source: dict[str, Any]) -> dict[str, Any]:
    return {k: source[k] for k in ("vector_store_id", "file_id", "filename", "score", "text")}


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()[:5]
    )


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)

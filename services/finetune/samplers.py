"""How an eval run samples an item: a chat model (`completions`), the Responses API
(`responses`), an agent configuration (`completions` with `agent`), or no model at all (the
answer the item already carries: a stored completion's or response's, or a jsonl `sample`).

Every call goes through the gateway as the run's key (`Calls`), with `store: false`: an
evaluation's own traffic must not flow back into the stored completions it is built from.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from services.finetune.graders import GradeError, lookup, render_messages

# Sampling params, by where they go: the chat completions API and the Responses API.
CHAT_PARAMS = ("temperature", "top_p", "seed", "max_completion_tokens", "max_tokens", "stop")
RESPONSES_PARAMS = ("temperature", "top_p", "tools", "text", "max_output_tokens")
AGENT_FINAL = ("completed", "incomplete", "failed", "cancelled")

PostJson = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
PostEvents = Callable[[str, dict[str, Any]], AsyncIterator[tuple[str, str]]]


def input_messages(ds: dict[str, Any], item: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages a model is asked: OpenAI's `input_messages` (a template, or a reference to
    a list of messages in the item; by default `item.input`)."""
    spec = ds.get("input_messages") or {"type": "item_reference", "item_reference": "item.input"}
    if spec.get("type") == "template":
        return render_messages(spec.get("template") or [], item, None)
    ref = str(spec.get("item_reference") or "item.input")
    found = lookup(ref, {"item": item})
    if isinstance(found, str):
        return [{"role": "user", "content": found}]
    if not isinstance(found, list):
        raise GradeError(f"{ref} is not a list of messages")
    return found


def _sample(model: Any, messages: Any, text: str, **more: Any) -> dict[str, Any]:
    try:
        output_json = json.loads(text)
    except ValueError:
        output_json = None
    return {
        "model": model,
        "input": messages,
        "output": [{"role": "assistant", "content": text}],
        "output_text": text,
        "output_json": output_json,
        "output_tools": [],
        **more,
    }


async def chat(post: PostJson, ds: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    messages = input_messages(ds, item)
    params = ds.get("sampling_params") or {}
    body = {
        "model": ds["model"],
        "messages": messages,
        "store": False,
        **{k: params[k] for k in CHAT_PARAMS if k in params},
    }
    response = await post("/v1/chat/completions", body)
    choice = (response.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    return _sample(
        response.get("model"),
        messages,
        message.get("content") or "",
        output_tools=message.get("tool_calls") or [],
        choices=response.get("choices"),
        finish_reason=choice.get("finish_reason"),
        usage=response.get("usage"),
    )


def response_text(response: dict[str, Any]) -> str:
    return "".join(
        c.get("text", "")
        for out in response.get("output") or []
        if isinstance(out, dict) and out.get("type") == "message"
        for c in out.get("content") or []
        if isinstance(c, dict) and c.get("type") == "output_text"
    )


async def responses(post: PostJson, ds: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    messages = input_messages(ds, item)
    params = dict(ds.get("sampling_params") or {})
    if "max_completion_tokens" in params:  # the eval's name for it; the Responses API's
        params.setdefault("max_output_tokens", params["max_completion_tokens"])
    body = {
        "model": ds["model"],
        "input": messages,
        "store": False,
        **{k: params[k] for k in RESPONSES_PARAMS if k in params},
    }
    response = await post("/v1/responses", body)
    return _sample(
        response.get("model"),
        messages,
        response_text(response),
        output_tools=[
            o
            for o in response.get("output") or []
            if isinstance(o, dict) and o.get("type") == "function_call"
        ],
        finish_reason=response.get("status"),
        usage=response.get("usage"),
    )


async def agent(events: PostEvents, ds: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """An agent run (its model, tools, stores and budgets) over the item's messages, streamed
    so that a cancelled eval run leaves and thereby cancels the agent run too."""
    messages = [
        {"role": m.get("role"), "content": m.get("content")}
        for m in input_messages(ds, item)
        if m.get("role") in ("user", "assistant")
    ]
    config = ds["agent"]
    body = {"model": ds["model"], "messages": messages, "stream": True, **config}
    steps: list[dict[str, Any]] = []
    run: dict[str, Any] | None = None
    async for name, data in events("/v1/agent/runs", body):
        if name == "run.step":
            steps.append(json.loads(data))
        elif name.removeprefix("run.") in AGENT_FINAL:
            run = json.loads(data)
    if run is None:
        raise GradeError("the agent run ended without a result")
    if run.get("status") != "completed":
        why = run.get("error") or run.get("incomplete_details") or {}
        raise GradeError(f"the agent run was {run.get('status')}: {json.dumps(why)[:300]}")
    output = run.get("output") or {}
    return _sample(
        run.get("model"),
        messages,
        str(output.get("answer") or ""),
        output_tools=[
            {"name": s.get("tool"), "arguments": s.get("arguments")}
            for s in steps
            if s.get("type") == "tool_call"
        ],
        citations=output.get("citations") or [],
        agent_run_id=run.get("id"),
        finish_reason=run.get("status"),
        usage=run.get("usage"),
    )


def given(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The answer an item already carries, for runs that grade what was answered."""
    if entry.get("sample") is not None:
        sample: dict[str, Any] = entry["sample"]
        return sample
    item = entry["item"]
    if "output_text" not in item:
        return None
    return _sample(item.get("model"), item.get("input"), item.get("output_text") or "")

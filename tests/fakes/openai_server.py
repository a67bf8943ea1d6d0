"""An OpenAI-compatible fake upstream, reached over HTTP, for fault injection and overhead
measurement. The model name scripts the behaviour:

| model          | behaviour                                                        |
|----------------|------------------------------------------------------------------|
| fake           | answers at once (chat, completions, streams with usage)          |
| fake-b         | the same: a second healthy model (an alias's other target)       |
| fake-slow      | waits `--slow-s` seconds before answering                        |
| fake-500       | answers 500 with an error body                                   |
| fake-400       | answers 400 with vLLM's error shape, naming a param              |
| fake-garbage   | answers 200 with a body that is not JSON                         |
| fake-drop      | streams two chunks, then drops the connection                    |
| fake-long      | streams a chunk every 50 ms for a minute; `GET /stats` counts the |
|                | streams whose client went away before the end                    |
| fake-paced     | streams like vLLM: a role chunk, then `max_completion_tokens`    |
|                | (or `max_tokens`, default 16) one-token events, one every        |
|                | `--token-interval-ms`, a finish event, usage when asked, [DONE]  |
| fake-split     | like fake-paced, but the usage event comes in two writes 50 ms   |
|                | apart, split inside "completion_tokens" (two reads downstream)   |
| (GET /internal/aliases) | an alias table, as the finetune service serves it:    |
|                | `bench-alias` of owner `bench`, fake 90 / fake-b 10              |
| scripted       | chat answers from a script: `POST /script` sets the replies, each |
|                | `{"content": ...}` or `{"tool_calls": [{"name", "arguments"}]}`, |
|                | optional `"delay_s"`, `"repeat": true` (kept for every later     |
|                | call), `"usage": {"prompt_tokens", "completion_tokens"}` to report |
|                | (else counted from the bytes); `GET /script` returns the requests |
|                | received since                                                   |

    python -m tests.fakes.openai_server --port 9100 [--slow-s 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson
from starlette.types import Message, Receive, Scope, Send

MODELS = [
    "fake",
    "fake-b",
    "fake-slow",
    "fake-500",
    "fake-400",
    "fake-garbage",
    "fake-drop",
    "fake-long",
    "fake-paced",
    "fake-split",
    "scripted",
]
JSON = [(b"content-type", b"application/json")]
SCRIPTED_CONTEXT = 1000
# The alias table a gateway pointed here as its finetune service routes by: `bench-alias`, the
# bench key's, splitting fake 90 / fake-b 10 (the gateway benchmark's alias path).
BENCH_ALIASES = {
    "object": "list",
    "data": [
        {
            "id": "alias_bench",
            "owner": "bench",
            "name": "bench-alias",
            "revision": 1,
            "created": 0,
            "routes": [{"model": "fake", "weight": 90}, {"model": "fake-b", "weight": 10}],
            "sticky": "user",
        }
    ],
}


def _completion(chat: bool, model: str, request_id: bytes | None = None) -> bytes:
    """A whole answer, named like vLLM's after the request's X-Request-Id (the gateway sends
    one; stored completions are kept by that id)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": "ok"}
    else:
        choice["text"] = "ok"
    return orjson.dumps(
        {
            "id": f"chatcmpl-{request_id.decode()}" if request_id else "fake-1",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )


def _chunk(model: str, delta: dict[str, Any] | None, usage: bool = False) -> bytes:
    body: dict[str, Any] = {
        "id": "fake-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [],
    }
    if delta is not None:
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": None}]
    if usage:
        body["usage"] = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    return b"data: " + orjson.dumps(body) + b"\n\n"


class FakeUpstream:
    def __init__(
        self, slow_s: float = 5.0, api_key: str | None = None, token_interval_s: float = 0.02
    ) -> None:
        self.slow_s = slow_s
        self.token_interval_s = token_interval_s
        # Like vLLM's --api-key: every /v1 route needs `Authorization: Bearer <key>`.
        self.auth = f"Bearer {api_key}".encode() if api_key else None
        self.disconnects = 0
        self.script: list[dict[str, Any]] = []
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if (
            self.auth
            and path.startswith("/v1/")
            and dict(scope["headers"]).get(b"authorization") != self.auth
        ):
            await _respond(send, 401, b'{"error": "Unauthorized"}')
            return
        if path == "/stats":
            await _respond(send, 200, orjson.dumps({"disconnects": self.disconnects}))
            return
        if path == "/script":
            await self._script(scope, receive, send)
            return
        if path == "/internal/aliases":  # standing in for the finetune service (bench/gateway.py)
            await _respond(send, 200, orjson.dumps(BENCH_ALIASES))
            return
        if path == "/v1/models":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in MODELS]
            for card in data:  # vLLM's cards carry the served context; the scripted one says 1000
                if card["id"] == "scripted":
                    card["max_model_len"] = SCRIPTED_CONTEXT
            await _respond(send, 200, orjson.dumps({"object": "list", "data": data}))
            return
        req = orjson.loads(await _read_body(receive) or b"{}")
        model = req.get("model", "fake")
        chat = path.endswith("/chat/completions")
        if model == "scripted":
            await self._scripted(send, req)
            return
        if model == "fake-slow":
            await asyncio.sleep(self.slow_s)
        if model == "fake-500":
            await _respond(send, 500, b'{"error": {"message": "engine exploded", "type": "x"}}')
        elif model == "fake-400":
            await _respond(
                send,
                400,
                b'{"object": "error", "message": "bad temperature", '
                b'"type": "BadRequestError", "param": "temperature", '
                b'"code": 400}',
            )
        elif model == "fake-garbage":
            await _respond(send, 200, b"<html>definitely not json")
        elif model == "fake-long":
            await self._long_stream(receive, send)
        elif model in ("fake-paced", "fake-split"):
            await self._paced_stream(send, req, chat, split=model == "fake-split")
        elif req.get("stream"):
            await self._stream(send, model, drop=model == "fake-drop")
        else:
            rid = dict(scope["headers"]).get(b"x-request-id")
            await _respond(send, 200, _completion(chat, model, rid))

    async def _stream(self, send: Send, model: str, drop: bool) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for part in ({"role": "assistant", "content": ""}, {"content": "ok"}):
            await send(
                {"type": "http.response.body", "body": _chunk(model, part), "more_body": True}
            )
        if drop:
            raise ConnectionAbortedError("scripted drop mid-stream")  # uvicorn cuts the socket
        await send(
            {
                "type": "http.response.body",
                "body": _chunk(model, None, usage=True),
                "more_body": True,
            }
        )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    async def _long_stream(self, receive: Receive, send: Send) -> None:
        """Like a long generation: stops, and is counted, when the client goes away."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )

        async def next_message() -> Message:
            return await receive()

        gone = asyncio.create_task(next_message())  # the next message can only be a disconnect
        for _ in range(1200):
            if gone.done():
                self.disconnects += 1
                return
            chunk = _chunk("fake-long", {"content": "x"})
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await asyncio.sleep(0.05)
        gone.cancel()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    async def _paced_stream(
        self, send: Send, req: dict[str, Any], chat: bool, split: bool = False
    ) -> None:
        """A generation at a fixed rate, shaped like vLLM's (one event per token)."""
        n = int(req.get("max_completion_tokens") or req.get("max_tokens") or 16)
        usage = bool((req.get("stream_options") or {}).get("include_usage"))
        prompt = len(orjson.dumps(req.get("messages") or req.get("prompt") or "")) // 4
        head = {"id": "chatcmpl-paced", "created": int(time.time()), "model": req["model"]}
        head["object"] = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict[str, Any] | None, **extra: Any) -> bytes:
            body = {**head, "choices": [] if choice is None else [choice], **extra}
            return b"data: " + orjson.dumps(body) + b"\n\n"

        def token(text: str, finish: str | None = None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": text} if finish is None else {}
            else:
                choice["text"] = text
            return choice

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )

        async def emit(body: bytes) -> None:
            await send({"type": "http.response.body", "body": body, "more_body": True})

        if chat:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}}
            await emit(event({**role, "logprobs": None, "finish_reason": None}))
        loop = asyncio.get_running_loop()
        due = loop.time()
        for i in range(n):
            await emit(event(token(f" tok{i}")))
            due += self.token_interval_s
            await asyncio.sleep(max(0.0, due - loop.time()))
        await emit(event(token("", "length")))
        if usage:
            counts = {"prompt_tokens": prompt, "completion_tokens": n}
            last = event(None, usage={**counts, "total_tokens": prompt + n})
            if split:
                cut = last.index(b'"completion_tokens"') + 8
                await emit(last[:cut])
                await asyncio.sleep(0.05)
                last = last[cut:]
            await emit(last)
        await emit(b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _script(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "POST":
            self.script = list(orjson.loads(await _read_body(receive))["replies"])
            self.seen = []
        await _respond(send, 200, orjson.dumps({"requests": self.seen, "left": len(self.script)}))

    async def _scripted(self, send: Send, req: dict[str, Any]) -> None:
        self.seen.append(req)
        if not self.script:
            await _respond(send, 500, b'{"error": {"message": "script exhausted", "type": "x"}}')
            return
        reply = self.script[0] if self.script[0].get("repeat") else self.script.pop(0)
        await asyncio.sleep(float(reply.get("delay_s", 0)))
        message: dict[str, Any] = {"role": "assistant", "content": reply.get("content")}
        if "tool_calls" in reply:
            message["tool_calls"] = [
                {
                    "id": f"call_{len(self.seen)}_{i}",
                    "type": "function",
                    "function": {
                        "name": c["name"],
                        "arguments": c["arguments"]
                        if isinstance(c["arguments"], str)
                        else orjson.dumps(c["arguments"]).decode(),
                    },
                }
                for i, c in enumerate(reply["tool_calls"])
            ]
        prompt = len(orjson.dumps(req.get("messages", []))) // 4
        completion = len(orjson.dumps(message)) // 4
        if "usage" in reply:  # what the script says the engine used
            prompt, completion = (
                reply["usage"]["prompt_tokens"],
                reply["usage"]["completion_tokens"],
            )
        body = {
            "id": f"scripted-{len(self.seen)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "scripted",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if "tool_calls" in reply else "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
        await _respond(send, 200, orjson.dumps(body))


async def _read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return body


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": JSON})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--slow-s", type=float, default=5.0)
    p.add_argument("--api-key")
    p.add_argument("--token-interval-ms", type=float, default=20.0)
    args = p.parse_args()
    uvicorn.run(
        FakeUpstream(args.slow_s, args.api_key, args.token_interval_ms / 1000),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()

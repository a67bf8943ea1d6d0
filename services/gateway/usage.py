"""Usage in streams: every stream's tokens are counted, whether the client asked for the usage
event or not (the gateway asks the engine for it, and takes it out of the client's stream when
the client did not), found as the reads pass without parsing every event."""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any, Protocol

import orjson

from services.common.outbox import Outbox
from services.gateway.keys import ApiKey
from services.gateway.metrics import GatewayMetrics
from services.gateway.validation import insert_fields


class Counted(Protocol):
    """Where the tokens go (the proxy's Outcome)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


def count(usage: dict[str, Any], out: Counted) -> None:
    """An answer's `usage` into `out`: chat and completions say prompt/completion tokens, the
    Responses API input/output; cached prompt tokens are in their details."""
    out.prompt_tokens = usage.get("prompt_tokens") or usage.get("input_tokens") or 0
    out.completion_tokens = usage.get("completion_tokens") or usage.get("output_tokens") or 0
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    out.cached_tokens = (details.get("cached_tokens") or 0) if isinstance(details, dict) else 0


class UsageSniffer:
    """Finds the stream's usage event in the reads as they pass, for the token metrics. An
    event may straddle two reads: the unfinished end of a read (at most `KEEP` bytes) is kept
    and scanned again with the next one. Per read this is a `bytes.endswith` and a search.

    With `strip` (the gateway asked for usage; the client did not), the usage event is taken
    out of what the client gets, and the unfinished end of a read is held back until its event
    is whole (reads end on an event boundary almost always, so this rarely delays a byte)."""

    KEEP = 4096

    def __init__(self, out: Counted, strip: bool = False, keep: bool = False) -> None:
        self.out = out
        self.strip = strip
        self.tail = b""
        self.kept: list[bytes] | None = [] if keep else None  # every read, to store the answer
        self.marker = b'"completion_tokens"'  # what only the usage event holds

    def feed(self, read: bytes) -> bytes:
        """Sees a read; returns what the client gets of it."""
        if self.kept is not None:
            self.kept.append(read)
        data = self.tail + read if self.tail else read
        self.tail = b""
        if not data.endswith(b"\n\n"):  # an event is cut here
            end = data.rfind(b"\n\n")
            cut = end + 2 if end >= 0 else 0
            if self.strip:  # hold its start back until it is whole
                data, self.tail = data[:cut], data[cut:]
            else:  # pass it on, and scan its start again with the next read
                self.tail = data[cut:][-self.KEEP :]
        if self.marker in data:
            data = _count_usage(data, self.out, self.strip)
        return data if self.strip else read


def _count_usage(chunk: bytes, out: Counted, strip: bool) -> bytes:
    """Counts the usage event in `chunk`; with `strip`, returns `chunk` without it."""
    kept = []
    for event in chunk.split(b"\n\n"):
        line = event.lstrip(b"\n")
        if line.startswith(b"event: response."):  # the Responses API names its events
            line = line[line.find(b"\n") + 1 :]
        if line.startswith(b"data: {") and (
            b'"completion_tokens"' in line or b'"output_tokens"' in line
        ):
            try:
                body = orjson.loads(line[6:])
            except orjson.JSONDecodeError:
                kept.append(event)
                continue  # the unfinished end of a read: seen whole with the next one
            count(body.get("usage") or (body.get("response") or {}).get("usage") or {}, out)
            if strip and body.get("choices") == []:
                continue  # the usage-only event the client did not ask for
        kept.append(event)
    return b"\n\n".join(kept) if strip else chunk


def ask_for_usage(body: bytes, payload: dict[str, Any]) -> bytes | None:
    """A streaming request's body asking the engine for the usage event, or None when the
    client asked for it already (or sent stream_options the engine should judge as they are).
    The usual body (no stream_options) gets the field spliced in, not encoded again."""
    if "stream_options" not in payload:
        return insert_fields(body, b'"stream_options":{"include_usage":true},')
    options = {} if payload["stream_options"] is None else payload["stream_options"]
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return None
    return orjson.dumps({**payload, "stream_options": {**options, "include_usage": True}})


class UsageRecorder:
    """A usage record for each request an engine served, to the usage outbox (the finetune
    service keeps it once, by its own id, for `/v1/organization/usage/...`), and its tokens and
    engine time on the per-project counters."""

    def __init__(self, outbox: Outbox, metrics: GatewayMetrics) -> None:
        self.outbox, self.metrics = outbox, metrics
        # Never the request id (a client may send the same one twice): this process's own
        # random prefix and a counter, unique without the cost of a uuid per request.
        self._prefix, self._ids = uuid.uuid4().hex[:20] + "-", itertools.count()

    def record(
        self,
        key: ApiKey,
        kind: str,
        model: str,
        input_tokens: int,
        output_tokens: int = 0,
        cached_tokens: int = 0,
        engine_s: float = 0.0,
    ) -> None:
        record = {
            "id": f"{self._prefix}{next(self._ids)}",
            "at": int(time.time()),
            "kind": kind,
            "project_id": key.owner,
            "api_key_id": key.id,
            "model": model,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "input_cached_tokens": cached_tokens,
            "engine_s": round(engine_s, 6),
        }
        self.outbox.put(record, b"", b"")
        self.metrics.used(key.owner, model, input_tokens, output_tokens, engine_s)

"""The lifecycle store on its own (SQLite in a temporary directory): outbox records become stored
completions and responses once each, streams are reassembled, retention deletes what expired."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.finetune.captures import CaptureStore, Filter, reassemble
from services.finetune.jobs import JobStore
from services.finetune.responses import ResponseStore


def record(
    completion_id: str, *, retention_days: int | None = None, stream: bool = False, **meta: Any
) -> dict[bytes, bytes]:
    request = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "metadata": {"k": "v"},
    }
    if stream:
        response = sse(
            {
                "id": completion_id,
                "created": 1,
                "model": "m",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}],
            },
            {
                "id": completion_id,
                "created": 1,
                "model": "m",
                "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}],
            },
        )
    else:
        response = orjson.dumps(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": 1,
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hello"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )
    m = {
        "owner": "alice",
        "key_id": "key_1",
        "created": time.time(),
        "stream": stream,
        "retention_days": retention_days,
        **meta,
    }
    return {b"meta": orjson.dumps(m), b"request": orjson.dumps(request), b"response": response}


def sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


@pytest.fixture
def store(tmp_path: Path) -> CaptureStore:
    jobs = JobStore(f"sqlite:///{tmp_path / 'finetune.db'}")
    return CaptureStore(jobs.session)


def test_a_redelivered_record_is_kept_once_and_a_malformed_one_skipped(store: CaptureStore) -> None:
    first = record("chatcmpl-1")
    assert store.ingest([first, record("chatcmpl-2")]) == 2
    assert store.ingest([first, {b"meta": b"{", b"request": b"", b"response": b""}]) == 0
    rows = store.rows("alice", Filter(), 10)
    assert sorted(r.id for r, _ in rows) == ["chatcmpl-1", "chatcmpl-2"]


def test_a_stream_is_stored_as_the_completion_the_client_assembled(store: CaptureStore) -> None:
    store.ingest([record("chatcmpl-s", stream=True)])
    got = store.retrieve("chatcmpl-s", "alice")
    assert got["choices"][0]["message"]["content"] == "Hello"
    assert got["choices"][0]["finish_reason"] == "stop" and got["metadata"] == {"k": "v"}


def test_tool_calls_and_usage_are_reassembled_from_their_pieces() -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "molecule_"}}
    more = {"index": 0, "function": {"name": "info", "arguments": '{"smiles": '}}
    end = {"index": 0, "function": {"arguments": '"CCO"}'}}
    raw = sse(
        {
            "id": "c",
            "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [call]}}],
        },
        {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [more]}}]},
        {
            "id": "c",
            "choices": [
                {"index": 0, "delta": {"tool_calls": [end]}, "finish_reason": "tool_calls"}
            ],
        },
        {"id": "c", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}},
    )
    done = reassemble(raw)
    assert done is not None
    [tool] = done["choices"][0]["message"]["tool_calls"]
    assert tool == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "molecule_info", "arguments": '{"smiles": "CCO"}'},
    }
    assert done["choices"][0]["finish_reason"] == "tool_calls"
    assert done["usage"] == {"prompt_tokens": 5, "completion_tokens": 9}
    assert reassemble(sse({"error": {"message": "engine died"}})) is None


def test_retention_deletes_what_expired_with_its_feedback_and_keeps_the_rest(
    store: CaptureStore, tmp_path: Path
) -> None:
    store.ingest([record("chatcmpl-short", retention_days=1), record("chatcmpl-forever")])
    store.give_feedback("chatcmpl-short", "alice", "key_1", {"metric": "rating", "value": "bad"})
    assert store.purge(expired_before=time.time()) == 0  # not a day old yet
    assert store.purge(expired_before=time.time() + 2 * 86400) == 1
    assert [r.id for r, _ in store.rows("alice", Filter(), 10)] == ["chatcmpl-forever"]
    assert store.feedback_counts(10) == []


def test_responses_are_stored_from_their_final_event(store: CaptureStore) -> None:
    completed = {
        "id": "resp_1",
        "model": "m",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "Hi there"}]}],
    }
    raw = (
        b'event: response.created\ndata: {"type": "response.created"}\n\n'
        b"event: response.completed\ndata: "
        + orjson.dumps({"type": "response.completed", "response": completed})
        + b"\n\n"
    )
    meta = {"owner": "alice", "key_id": "key_1", "kind": "response", "stream": True}
    fields = {
        b"meta": orjson.dumps(meta),
        b"request": orjson.dumps({"model": "m", "input": "Hello"}),
        b"response": raw,
    }
    assert store.ingest([fields, fields]) == 1
    responses = ResponseStore(store.session)
    assert responses.get("resp_1", "alice").response["output"] == completed["output"]
    assert responses.context("resp_1", "alice") == [
        {"type": "message", "role": "user", "content": "Hello"},
        {"type": "message", "role": "assistant", "content": "Hi there"},
    ]
    with pytest.raises(Exception, match="not found"):
        responses.get("resp_1", "mallory")


def test_each_owner_is_charged_the_bytes_of_what_they_stored(store: CaptureStore) -> None:
    """Completions and responses both count, once each (a redelivery is not charged twice)."""
    one = record("chatcmpl-a1")
    size = len(one[b"request"]) + len(one[b"response"])
    response = {
        b"meta": orjson.dumps({"owner": "alice", "key_id": "key_1", "kind": "response"}),
        b"request": orjson.dumps({"model": "m", "input": "Hello"}),
        b"response": orjson.dumps({"id": "resp_a", "model": "m", "output": []}),
    }
    both = size + len(response[b"request"]) + len(response[b"response"])
    store.ingest([one, one, response, record("chatcmpl-b1", owner="bob")])
    assert store.owners_over(both) == {"alice": both}  # at the quota: no more
    assert store.owners_over(both + 1) == {}
    assert store.owners_over(1) == {"alice": both, "bob": size}

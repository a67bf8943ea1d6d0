"""Stored chat completions and feedback through the gateway with the official `openai` client:
`store=True` (streamed and not), list by metadata, messages, update, delete, feedback, the key's
store default, metadata limits, and another owner seeing nothing."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import openai
import pytest

from services.gateway.keys import KeyStore
from tests.conftest import DENSE

HELLO: Any = [{"role": "user", "content": "Name an element."}]


def stored(client: openai.OpenAI, completion_id: str, timeout: float = 15.0) -> Any:
    """The stored completion, once the outbox delivered it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.chat.completions.retrieve(completion_id)
        except openai.NotFoundError:
            assert time.monotonic() < deadline, f"{completion_id} was never stored"
            time.sleep(0.1)


def feedback(client: openai.OpenAI, completion_id: str, **body: Any) -> Any:
    return client.post(f"/chat/completions/{completion_id}/feedback", body=body, cast_to=object)


@pytest.fixture(scope="module")
def tag() -> str:
    return uuid.uuid4().hex[:12]  # this run's metadata value: lists see only this run's rows


def test_a_stored_completion_is_what_the_client_received(client: openai.OpenAI, tag: str) -> None:
    reply = client.chat.completions.create(
        model=DENSE,
        messages=HELLO,
        max_tokens=8,
        store=True,
        metadata={"run": tag, "topic": "plain"},
    )
    got = stored(client, reply.id)
    assert got.choices[0].message.content == reply.choices[0].message.content
    assert got.choices[0].finish_reason == reply.choices[0].finish_reason
    assert got.usage is not None and reply.usage is not None
    assert got.usage.completion_tokens == reply.usage.completion_tokens
    assert got.metadata == {"run": tag, "topic": "plain"}
    assert got.model == DENSE
    messages = client.chat.completions.messages.list(reply.id)
    assert [(m.role, m.content) for m in messages.data] == [("user", HELLO[0]["content"])]
    assert messages.data[0].id == f"{reply.id}-0"


def test_a_streamed_answer_is_reassembled(client: openai.OpenAI, tag: str) -> None:
    stream = client.chat.completions.create(
        model=DENSE,
        messages=HELLO,
        max_tokens=12,
        temperature=0,
        stream=True,
        store=True,
        metadata={"run": tag, "topic": "streamed"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    got = stored(client, chunks[0].id)
    assert got.choices[0].message.content == text and text
    assert got.choices[0].finish_reason == finish
    assert got.usage is not None and got.usage.completion_tokens > 0  # asked for by the gateway


def test_list_filters_by_metadata_and_model_and_pages(client: openai.OpenAI, tag: str) -> None:
    ids = []
    for i in range(3):
        r = client.chat.completions.create(
            model=DENSE,
            messages=HELLO,
            max_tokens=2,
            store=True,
            metadata={"run": tag, "topic": "paged", "n": str(i)},
        )
        ids.append(r.id)
    stored(client, ids[-1])
    paged = client.chat.completions.list(metadata={"run": tag, "topic": "paged"}, limit=2)
    assert [c.id for c in paged.data] == ids[:2] and paged.has_more  # oldest first
    rest = client.chat.completions.list(
        metadata={"run": tag, "topic": "paged"}, limit=2, after=paged.data[-1].id
    )
    assert [c.id for c in rest.data] == ids[2:] and not rest.has_more
    newest = client.chat.completions.list(metadata={"run": tag, "topic": "paged"}, order="desc")
    assert [c.id for c in newest.data] == ids[::-1]
    assert client.chat.completions.list(metadata={"run": tag}, model="no-such-model").data == []


def test_update_and_delete(client: openai.OpenAI, tag: str) -> None:
    r = client.chat.completions.create(
        model=DENSE, messages=HELLO, max_tokens=2, store=True, metadata={"run": tag}
    )
    stored(client, r.id)
    updated = client.chat.completions.update(r.id, metadata={"run": tag, "reviewed": "yes"})
    assert updated.metadata == {"run": tag, "reviewed": "yes"}
    assert [c.id for c in client.chat.completions.list(metadata={"reviewed": "yes"})] == [r.id]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.update(r.id, metadata={"k": "v" * 513})
    assert err.value.param == "metadata"
    gone = client.chat.completions.delete(r.id)
    assert gone.deleted and gone.id == r.id
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(r.id)


def test_feedback_latest_wins_and_filters_the_list(client: openai.OpenAI, tag: str) -> None:
    r = client.chat.completions.create(
        model=DENSE, messages=HELLO, max_tokens=4, store=True, metadata={"run": tag, "fb": "1"}
    )
    stored(client, r.id)
    feedback(client, r.id, metric="rating", value="good")
    fixed = {"role": "assistant", "content": "Carbon."}
    last = feedback(client, r.id, metric="rating", value="bad", comment="no", correction=fixed)
    feedback(client, r.id, metric="score", value=0.25)
    assert last["value"] == "bad" and last["correction"] == fixed
    got = client.chat.completions.retrieve(r.id)
    given = {f["metric"]: f for f in got.feedback}  # type: ignore[attr-defined]
    assert given["rating"]["value"] == "bad" and given["score"]["value"] == 0.25
    assert len(got.feedback) == 2  # type: ignore[attr-defined]
    listed = client.chat.completions.list(
        metadata={"run": tag}, extra_query={"feedback[rating]": "bad"}
    )
    assert [c.id for c in listed.data] == [r.id]
    assert not client.chat.completions.list(
        metadata={"run": tag}, extra_query={"feedback[rating]": "good"}
    ).data
    for bad in ({"metric": "rating"}, {"metric": "x y", "value": 1}, {"metric": "m", "value": []}):
        with pytest.raises(openai.BadRequestError):
            feedback(client, r.id, **bad)
    with pytest.raises(openai.NotFoundError):
        feedback(client, "chatcmpl-unknown", metric="rating", value=True)


@pytest.mark.parametrize(
    "metadata",
    [
        {f"k{i}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 513},
        {"k": 1},
        "not an object",
    ],
)
def test_metadata_over_its_limits_is_refused_before_generating(
    client: openai.OpenAI, metadata: Any
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=DENSE, messages=HELLO, max_tokens=2, store=True, metadata=metadata
        )
    assert err.value.param == "metadata"


def test_the_keys_store_default_decides_and_the_request_overrides_it(
    gateway_url: str, keys: KeyStore, tag: str
) -> None:
    secret, _ = keys.create("store-default-owner", store=True, retention_days=30)
    own = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=secret, max_retries=0)
    silent = own.chat.completions.create(
        model=DENSE, messages=HELLO, max_tokens=2, metadata={"run": tag}
    )
    refused = own.chat.completions.create(
        model=DENSE, messages=HELLO, max_tokens=2, store=False, metadata={"run": tag}
    )
    marker = own.chat.completions.create(
        model=DENSE, messages=HELLO, max_tokens=2, metadata={"run": tag}
    )
    stored(own, marker.id)  # the outbox keeps order: what came before it has arrived too
    listed = [c.id for c in own.chat.completions.list(metadata={"run": tag})]
    assert listed == [silent.id, marker.id] and refused.id not in listed


def test_store_off_by_default_stores_nothing(client: openai.OpenAI, tag: str) -> None:
    plain = client.chat.completions.create(
        model=DENSE, messages=HELLO, max_tokens=2, metadata={"run": tag, "topic": "off"}
    )
    marker = client.chat.completions.create(
        model=DENSE, messages=HELLO, max_tokens=2, store=True, metadata={"run": tag, "topic": "off"}
    )
    stored(client, marker.id)
    assert [c.id for c in client.chat.completions.list(metadata={"topic": "off"})] == [marker.id]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(plain.id)


def test_another_owner_sees_none_of_it(
    client: openai.OpenAI, gateway_url: str, keys: KeyStore, tag: str
) -> None:
    r = client.chat.completions.create(
        model=DENSE, messages=HELLO, max_tokens=2, store=True, metadata={"run": tag}
    )
    stored(client, r.id)
    secret, _ = keys.create("stranger-captures")
    other = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=secret, max_retries=0)
    assert other.chat.completions.list(metadata={"run": tag}).data == []
    for call in (
        lambda: other.chat.completions.retrieve(r.id),
        lambda: other.chat.completions.messages.list(r.id),
        lambda: other.chat.completions.update(r.id, metadata={"mine": "now"}),
        lambda: other.chat.completions.delete(r.id),
        lambda: feedback(other, r.id, metric="rating", value="bad"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert client.chat.completions.retrieve(r.id).metadata == {"run": tag}


def test_admin_exports_and_purges_an_owners_records(
    gateway_url: str, admin_key: str, keys: KeyStore
) -> None:
    secret, _ = keys.create("purged-owner")
    own = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=secret, max_retries=0)
    r = own.chat.completions.create(model=DENSE, messages=HELLO, max_tokens=2, store=True)
    stored(own, r.id)
    admin = {"authorization": f"Bearer {admin_key}"}
    url = f"{gateway_url}/admin/projects/purged-owner/chat_completions"
    exported = httpx.get(url, headers=admin, timeout=30)
    assert exported.status_code == 200 and [c["id"] for c in exported.json()["data"]] == [r.id]
    assert httpx.get(url, headers={"authorization": f"Bearer {secret}"}).status_code == 403
    purged = httpx.delete(url, headers=admin, timeout=30)
    assert purged.status_code == 200 and purged.json()["deleted"] == 1
    with pytest.raises(openai.NotFoundError):
        own.chat.completions.retrieve(r.id)


def test_completions_other_than_post_are_not_the_engines(gateway_url: str, admin_key: str) -> None:
    auth = {"authorization": f"Bearer {admin_key}"}
    assert httpx.get(f"{gateway_url}/v1/completions", headers=auth).status_code == 405
    listed = httpx.get(f"{gateway_url}/v1/chat/completions?limit=1", headers=auth)
    assert listed.status_code == 200 and listed.json()["object"] == "list"

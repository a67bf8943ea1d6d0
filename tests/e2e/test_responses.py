"""The Responses API through the gateway with the official `openai` client: vLLM answers, the
lifecycle store keeps what is stored, and `previous_response_id` works on any engine."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from services.gateway.keys import KeyStore
from tests.conftest import DENSE


def kept(client: openai.OpenAI, response_id: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.responses.retrieve(response_id)
        except openai.NotFoundError:
            assert time.monotonic() < deadline, f"{response_id} was never stored"
            time.sleep(0.1)


def test_a_stored_response_is_what_the_client_received(client: openai.OpenAI) -> None:
    made = client.responses.create(
        model=DENSE, input="Name an element.", max_output_tokens=8, store=True, metadata={"k": "v"}
    )
    assert made.output_text and made.usage is not None and made.usage.output_tokens > 0
    got = kept(client, made.id)
    assert got.output_text == made.output_text and got.model == DENSE
    items = client.responses.input_items.list(made.id)
    assert [i.role for i in items.data] == ["user"]  # type: ignore[union-attr]
    client.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)


def test_a_streamed_response_is_stored_whole(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model=DENSE, input="Name a gas.", max_output_tokens=8, store=True, stream=True
        )
    )
    final = events[-1]
    assert final.type == "response.completed"
    got = kept(client, final.response.id)
    assert got.output_text == final.response.output_text


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model=DENSE, input="One.", max_output_tokens=4, store=True)
    alone = client.responses.create(model=DENSE, input="Two.", max_output_tokens=4)
    # At once: the first may still be on its way to the store (the follow-up waits for it).
    second = client.responses.create(
        model=DENSE, input="Two.", max_output_tokens=4, store=True, previous_response_id=first.id
    )
    assert alone.usage is not None and second.usage is not None
    assert second.usage.input_tokens > alone.usage.input_tokens  # the first turn was sent too
    got = kept(client, second.id)
    assert got.previous_response_id == first.id
    own: Any = client.responses.input_items.list(second.id).data
    assert [(i.role, i.content[0].text) for i in own] == [("user", "Two.")]


def test_unknown_and_foreign_previous_responses_are_404(
    client: openai.OpenAI, gateway_url: str, keys: KeyStore
) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=DENSE, input="x", previous_response_id="resp_unknown")
    assert err.value.param == "previous_response_id"
    mine = client.responses.create(model=DENSE, input="Mine.", max_output_tokens=4, store=True)
    kept(client, mine.id)
    secret, _ = keys.create("stranger-responses")
    other = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=secret, max_retries=0)
    for call in (
        lambda: other.responses.retrieve(mine.id),
        lambda: other.responses.input_items.list(mine.id),
        lambda: other.responses.delete(mine.id),
        lambda: other.responses.create(model=DENSE, input="x", previous_response_id=mine.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert client.responses.retrieve(mine.id).id == mine.id


def test_not_stored_unless_asked_or_the_keys_default(client: openai.OpenAI) -> None:
    """OpenAI stores responses by default; Crucible follows the key's default (off here)."""
    plain = client.responses.create(model=DENSE, input="Plain.", max_output_tokens=2)
    marker = client.responses.create(model=DENSE, input="Kept.", max_output_tokens=2, store=True)
    kept(client, marker.id)  # the outbox keeps order: the plain one would be there by now
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(plain.id)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": DENSE}, "input"),
        ({"model": DENSE, "input": ""}, "input"),
        ({"model": DENSE, "input": [1, 2]}, "input"),
        ({"model": DENSE, "input": "x", "max_output_tokens": 10**9}, "max_output_tokens"),
        ({"model": DENSE, "input": "x", "previous_response_id": 7}, "previous_response_id"),
        ({"model": DENSE, "input": "x", "store": "yes"}, "store"),
    ],
)
def test_bad_requests_name_the_param(
    gateway_url: str, admin_key: str, body: dict[str, Any], param: str
) -> None:
    r = httpx.post(
        f"{gateway_url}/v1/responses", json=body, headers={"authorization": f"Bearer {admin_key}"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == param

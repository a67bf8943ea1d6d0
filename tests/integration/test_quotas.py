"""An owner's stored completions past their quota: the gateway refuses requests that would store
more (429 `insufficient_quota` naming the bytes) and serves the rest; deleting stored ones makes
room again. A real gateway and finetune service (the lifecycle store); a fake model answers."""

from __future__ import annotations

import time
from typing import Any

import openai

from tests.integration.conftest import STORED_QUOTA, Lifecycle
from tests.processes import make_key

BIG = "x" * 300_000  # a third of the quota in each stored request


def _sdk(lifecycle: Lifecycle, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{lifecycle.gw.url}/v1", api_key=key, max_retries=0)


def _chat(client: openai.OpenAI, content: str, **kw: Any) -> Any:
    return client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": content}], **kw
    )


def test_an_owner_past_the_stored_data_quota_can_serve_but_not_store(
    lifecycle: Lifecycle,
) -> None:
    var = lifecycle.gw.log.parent
    hoarder = _sdk(lifecycle, make_key(var, "lab-hoarder", rpm=0, store=True))
    neighbour = _sdk(lifecycle, make_key(var, "lab-neighbour", rpm=0, store=True))
    stored = [_chat(hoarder, BIG).id for _ in range(4)]  # 1.2 MB of a 1 MB quota
    deadline = time.monotonic() + 30  # stored, summed and polled: a second or two
    while True:
        try:
            stored.append(_chat(hoarder, BIG).id)
        except openai.RateLimitError as exc:
            refused = exc
            break
        assert time.monotonic() < deadline, "the owner kept storing past the quota"
        time.sleep(0.1)
    assert refused.code == "insufficient_quota"
    assert f"of {STORED_QUOTA:,} bytes" in refused.message
    assert _chat(hoarder, "hi", store=False).choices  # answered, not stored
    assert _chat(neighbour, BIG).choices  # another owner stores as before

    for completion_id in stored:
        assert hoarder.chat.completions.delete(completion_id).deleted
    deadline = time.monotonic() + 30
    while True:
        try:
            _chat(hoarder, "hi")
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "deleting stored completions made no room"
            time.sleep(0.1)

"""What a streaming client receives through the gateway is what the engine sent: every event, in
order, the usage chunk, the end, under both relays (`stream_relay`: "direct" writes from the
upstream's read callback into the client's socket, "asgi" sends each read through ASGI), and
with a client too slow to keep up."""

from __future__ import annotations

import http.client
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from tests import metrics
from tests.processes import Proc, fake_upstream, gateway, make_key

RELAYS = ["direct", "asgi"]


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    # No pause between tokens: as fast as the upstream can write.
    with fake_upstream(tmp_path_factory.mktemp("fake"), token_interval_ms=0) as f:
        yield f


@pytest.fixture(scope="module", params=RELAYS)
def gw(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    fake: Proc,
    redis_url: str,
) -> Iterator[Proc]:
    with gateway(
        tmp_path_factory.mktemp(f"gw-{request.param}"),
        [fake.url],
        redis_url,
        stream_relay=request.param,
        max_tokens_cap=40_000,
    ) as g:
        yield g


@pytest.fixture(scope="module")
def key(gw: Proc) -> str:
    return make_key(gw.log.parent, rpm=0)


def body(tokens: int, usage: bool = True) -> dict[str, object]:
    return {
        "model": "fake-paced",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens,
        "stream": True,
        **({"stream_options": {"include_usage": True}} if usage else {}),
    }


def events(raw: bytes) -> list[bytes]:
    """The SSE events, with the one field that differs between two requests (`created`)."""
    return [re.sub(rb'"created":\d+', b'"created":0', e) for e in raw.split(b"\n\n") if e]


def counted(gw: Proc, family_name: str, **labels: str) -> float:
    """The sum of a counter family's samples with these labels, read from the gateway."""
    return metrics.counted(gw.url, family_name, **labels)


def completion_tokens(gw: Proc, model: str = "fake-paced") -> float:
    return counted(gw, "crucible_gateway_tokens", kind="completion", model=model)


def test_every_event_arrives_as_the_engine_sent_it(gw: Proc, fake: Proc, key: str) -> None:
    auth = {"authorization": f"Bearer {key}"}
    for tokens, usage in ((1, True), (300, True), (40, False)):
        direct = httpx.post(f"{fake.url}/v1/chat/completions", json=body(tokens, usage))
        before = completion_tokens(gw)
        relayed = httpx.post(
            f"{gw.url}/v1/chat/completions", json=body(tokens, usage), headers=auth
        )
        assert relayed.status_code == 200
        assert relayed.headers["content-type"].startswith("text/event-stream")
        sent = events(direct.content)
        assert len(sent) == tokens + 3 + usage  # role, tokens, finish, [usage], [DONE]
        assert events(relayed.content) == sent
        # Counted from the usage chunk, whichever read it arrived in; when the client did not
        # ask for it, the gateway asked the engine and kept the chunk to itself.
        assert completion_tokens(gw) - before == tokens


@pytest.mark.parametrize(
    "options", [None, {}, {"include_usage": False}], ids=["absent", "empty", "false"]
)
def test_a_client_that_did_not_ask_for_usage_gets_none_and_its_tokens_are_counted(
    gw: Proc, fake: Proc, key: str, options: dict[str, bool] | None
) -> None:
    """Every stream's tokens are counted (#20: capture and metering need them): the gateway asks
    the engine for the usage chunk and strips it, even when it straddles two reads."""
    for model in ("fake-paced", "fake-split"):
        request = {**body(25, usage=False), "model": model}
        if options is not None:
            request["stream_options"] = options
        direct = httpx.post(f"{fake.url}/v1/chat/completions", json=request)
        before = completion_tokens(gw, model)
        relayed = httpx.post(
            f"{gw.url}/v1/chat/completions",
            json=request,
            headers={"authorization": f"Bearer {key}"},
        )
        assert b'"usage"' not in relayed.content
        assert events(relayed.content) == events(direct.content)  # as if not asked
        assert completion_tokens(gw, model) - before == 25


def test_a_usage_event_split_across_two_reads_is_still_counted(gw: Proc, key: str) -> None:
    before = completion_tokens(gw, "fake-split")
    split = {**body(25), "model": "fake-split"}
    r = httpx.post(
        f"{gw.url}/v1/chat/completions", json=split, headers={"authorization": f"Bearer {key}"}
    )
    assert b'"completion_tokens":25' in r.content  # relayed whole
    assert completion_tokens(gw, "fake-split") - before == 25


def test_the_official_client_reads_the_whole_stream_and_its_usage(
    gw: Proc, key: str, request: pytest.FixtureRequest
) -> None:
    # The relay asked for is the one used: under the pinned uvicorn, "direct" never falls back.
    relay = request.node.callspec.params["gw"]
    before = counted(gw, "crucible_gateway_streams", relay=relay)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=30)
    stream = client.chat.completions.create(
        model="fake-paced",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=120,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text == "".join(f" tok{i}" for i in range(120))
    assert finish == "length" and usage is not None and usage.completion_tokens == 120
    assert counted(gw, "crucible_gateway_streams", relay=relay) - before == 1


def test_the_official_client_without_stream_options_sees_no_usage_chunk(gw: Proc, key: str) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=30)
    before = completion_tokens(gw)
    chunks = list(
        client.chat.completions.create(
            model="fake-paced",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=30,
            stream=True,
        )
    )
    assert chunks and all(c.choices and c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(
        f" tok{i}" for i in range(30)
    )
    assert completion_tokens(gw) - before == 30


def test_a_client_slower_than_the_engine_holds_the_engine_back_and_loses_nothing(
    gw: Proc, fake: Proc, key: str
) -> None:
    """30,000 events (~5.7 MB, more than the sockets between can hold) to a client that stops
    reading after the first bytes: the gateway must stop reading from the engine (whose socket
    then backs up) rather than buffer it all, and deliver every event in order once read."""
    tokens = 30_000
    host, port = gw.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    conn.request("POST", "/v1/chat/completions", orjson.dumps(body(tokens)), headers)
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.read(4096)  # a little, then nothing for a while
    held_back = _until_unsent_bytes_on(fake)
    got = events(first + resp.read())
    conn.close()
    assert held_back, "the engine's socket never backed up: the gateway buffered the stream"
    deltas = [orjson.loads(e[6:])["choices"][0]["delta"]["content"] for e in got[1 : tokens + 1]]
    assert deltas == [f" tok{i}" for i in range(tokens)]
    assert got[-1] == b"data: [DONE]" and b'"completion_tokens":%d' % tokens in got[-2]


def _until_unsent_bytes_on(server: Proc) -> bool:
    """Wait until a connection of `server` holds over 256 KiB its peer's process has not read
    (a stream the peer keeps reading holds a few KiB at most): here, the engine's connection to
    a gateway that stopped reading from it. The bytes wait in the engine's send queue or, once
    the kernel has grown the gateway's receive buffer (autotuning, up to tcp_rmem's 32 MiB on
    this host; counting only the send queue failed once in a full run), in the gateway's
    receive queue: /proc/net/tcp's tx_queue of the engine's side, rx_queue of the other.
    Either way the gateway's process stopped reading: it does not hold the stream itself."""
    port = server.port
    # Generous: on a loaded two-core host the fake can take over 30 s to write that far (seen
    # in full runs of the suite on a slow day; the same test alone passes in ~4 s).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = (int(a.split(":")[1], 16) for a in fields[1:3])
            tx, rx = (int(q, 16) for q in fields[4].split(":"))
            if (local == port and tx > 256 << 10) or (remote == port and rx > 256 << 10):
                return True
        time.sleep(0.05)
    return False


def test_a_stream_broken_mid_way_ends_with_an_error_event(gw: Proc, key: str) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=30)
    stream = client.chat.completions.create(
        model="fake-drop", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    got = []
    with pytest.raises(openai.APIError, match="broke the stream"):
        for chunk in stream:
            got.append(chunk)
    assert [c.choices[0].delta.content for c in got] == ["", "ok"]  # all sent before the break

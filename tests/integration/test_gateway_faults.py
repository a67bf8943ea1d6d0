"""Upstream faults, limits and key handling, against a scripted fake upstream over HTTP."""

import asyncio
import http.client
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from pydantic import SecretStr

from services.finetune import adapters
from services.finetune.config import FinetuneSettings
from services.gateway.keys import ON_BEHALF_HEADER, KeyStore
from services.inference import readiness
from services.stackconfig import _free_port
from tests.processes import Proc, fake_upstream, gateway, make_key, metric

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, fake: Proc, redis_url: str) -> Iterator[Proc]:
    with gateway(
        tmp_path_factory.mktemp("gw"),
        [fake.url],
        redis_url,
        request_timeout_s=1.5,
        max_body_bytes=65536,
        routing_refresh_s=0.5,
    ) as g:
        yield g


@pytest.fixture(scope="module")
def key(gw: Proc) -> str:
    return make_key(gw.log.parent, rpm=0)


def sdk(gw: Proc, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=10)


def test_upstream_500_keeps_its_status_and_message(gw: Proc, key: str) -> None:
    with pytest.raises(openai.InternalServerError) as exc:
        sdk(gw, key).chat.completions.create(model="fake-500", messages=HI)
    assert exc.value.status_code == 500 and "engine exploded" in exc.value.message


def test_upstream_400_is_relayed_with_its_param(gw: Proc, key: str) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        sdk(gw, key).chat.completions.create(model="fake-400", messages=HI)
    assert exc.value.param == "temperature" and "bad temperature" in exc.value.message


def test_garbage_upstream_body_is_502(gw: Proc, key: str) -> None:
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "fake-garbage", "messages": HI},
    )
    assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"


def test_slow_upstream_is_504_at_the_deadline(gw: Proc, key: str) -> None:
    start = time.monotonic()
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "fake-slow", "messages": HI},
        timeout=10,
    )
    took = time.monotonic() - start
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert 1.4 <= took < 2.5


def test_stream_dropped_mid_way_ends_with_an_error_event_and_counts_as_failed(
    gw: Proc, key: str
) -> None:
    stream = sdk(gw, key).chat.completions.create(
        model="fake-drop",
        messages=HI,
        stream=True,
    )
    got = []
    with pytest.raises(openai.APIError, match="broke the stream"):
        for chunk in stream:
            got.append(chunk)
    assert len(got) == 2  # what arrived before the break was relayed, chunk by chunk
    metrics = httpx.get(f"{gw.url}/metrics").text
    failed = 'model="fake-drop",route="/v1/chat/completions",status="5xx"} 1.0'
    assert "crucible_gateway_requests_total{" + failed in metrics
    assert 'crucible_gateway_upstream_errors_total{kind="stream_broken"} 1.0' in metrics


def test_body_over_the_limit_is_413(gw: Proc, key: str) -> None:
    big = [{"role": "user", "content": "x" * 100_000}]
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "fake", "messages": big},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HI}, "model"),
        ({"model": 7, "messages": HI}, "model"),
        ({"model": "fake", "messages": []}, "messages"),
        ({"model": "fake", "messages": HI, "n": 1000}, "n"),
        ({"model": "fake", "messages": HI, "max_tokens": "many"}, "max_tokens"),
        ({"model": "fake", "messages": HI, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"model": "fake", "messages": HI, "top_logprobs": 99}, "top_logprobs"),
        ({"model": "fake", "messages": HI, "stream": "yes"}, "stream"),
    ],
)
def test_bad_fields_are_400_naming_the_param(gw: Proc, key: str, body: dict, param: str) -> None:
    r = httpx.post(
        f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, json=body
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_a_body_that_never_arrives_is_408_at_its_deadline(
    tmp_path: Path, fake: Proc, redis_url: str
) -> None:
    with gateway(tmp_path, [fake.url], redis_url, body_timeout_s=1) as g:
        k = make_key(tmp_path, rpm=0)
        with socket.create_connection(("127.0.0.1", g.port), timeout=5) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                b"authorization: Bearer " + k.encode() + b"\r\n"
                b'content-type: application/json\r\ncontent-length: 100\r\n\r\n{"model"'
            )
            start = time.monotonic()
            reply = b""
            while b"request_timeout" not in reply and (chunk := sock.recv(4096)):
                reply += chunk  # headers and body may arrive in separate segments
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
        assert 0.9 <= time.monotonic() - start < 3


def test_malformed_json_is_400(gw: Proc, key: str) -> None:
    r = httpx.post(
        f"{gw.url}/v1/completions",
        content=b"{not json",
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_concurrency_beyond_the_key_limit_is_429_at_once(gw: Proc) -> None:
    narrow = make_key(gw.log.parent, rpm=0, max_concurrency=2)

    async def go() -> list[tuple[int, float]]:
        async with httpx.AsyncClient(timeout=10) as c:

            async def one(delay: float) -> tuple[int, float]:
                await asyncio.sleep(delay)
                t = time.monotonic()
                r = await c.post(
                    f"{gw.url}/v1/chat/completions",
                    headers={"authorization": f"Bearer {narrow}"},
                    json={"model": "fake-slow", "messages": HI},
                )
                return r.status_code, time.monotonic() - t

            return list(await asyncio.gather(one(0), one(0), one(0.3)))

    results = asyncio.run(go())
    assert sorted(s for s, _ in results) == [429, 504, 504]
    rejected = next(t for s, t in results if s == 429)
    assert rejected < 0.5


def _stalled(port: int, key: str, declared: int) -> socket.socket:
    """A request whose headers arrive and whose body of `declared` bytes does not."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
        b"authorization: Bearer " + key.encode() + b"\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n{" % declared
    )
    return sock


def _response(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of the response on `sock`."""
    reply = http.client.HTTPResponse(sock)
    reply.begin()
    return reply.status, reply.read()


def _chat(url: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "fake", "messages": HI},
        timeout=5,
    )


def test_a_key_takes_its_concurrency_slot_before_its_body_is_read(gw: Proc) -> None:
    """A client trickling bodies cannot hold the gateway's memory and time beyond its key's
    concurrency: the slot is taken when the headers arrive."""
    narrow = make_key(gw.log.parent, rpm=0, max_concurrency=1)
    with _stalled(gw.port, narrow, 1000):
        deadline = time.monotonic() + 10
        while (r := _chat(gw.url, narrow)).status_code != 429:
            assert r.status_code == 200
            assert time.monotonic() < deadline, "a second request was admitted meanwhile"
        assert "concurrent" in r.json()["error"]["message"]
    deadline = time.monotonic() + 10  # the stalled client left: its slot is free again
    while (r := _chat(gw.url, narrow)).status_code != 200:
        assert time.monotonic() < deadline, r.text


def test_a_key_cannot_hold_more_body_bytes_in_flight_than_its_share(
    tmp_path: Path, fake: Proc, redis_url: str
) -> None:
    with gateway(
        tmp_path, [fake.url], redis_url, max_body_bytes=65536, max_key_bytes_in_flight=100_000
    ) as g:
        k, other = make_key(tmp_path, rpm=0), make_key(tmp_path, "other", rpm=0)
        with _stalled(g.port, k, 60_000):
            deadline = time.monotonic() + 30  # generous: a loaded host answers slowly
            while metric(g.url, "crucible_gateway_body_bytes_in_flight") < 60_000:
                assert time.monotonic() < deadline, "the first body was never held"
                time.sleep(0.05)
            with _stalled(g.port, k, 60_000) as second:
                second.settimeout(30)
                status, reply = _response(second)
            assert status == 429 and b"100,000 bytes" in reply, reply
            assert _chat(g.url, other).status_code == 200  # another key is not held back
            assert _chat(g.url, k).status_code == 200  # a small body still fits beside it
        while metric(g.url, "crucible_gateway_body_bytes_in_flight") > 0:  # the client left
            assert time.monotonic() < deadline, "a departed client's body is still held"
            time.sleep(0.05)


def test_a_request_without_max_tokens_is_capped_by_the_served_context(
    gw: Proc, fake: Proc, key: str
) -> None:
    """Without `max_tokens` an engine may generate to the end of its context; the gateway sends
    the bound it knows (the served model's context here, 1000; the setting's cap otherwise),
    and leaves a client's own bound alone."""
    c = sdk(gw, key)
    httpx.post(f"{fake.url}/script", json={"replies": [{"content": "ok", "repeat": True}]})
    c.chat.completions.create(model="scripted", messages=HI)
    c.chat.completions.create(model="scripted", messages=HI, max_tokens=50)
    c.chat.completions.create(model="scripted", messages=HI, max_completion_tokens=70)
    seen = httpx.get(f"{fake.url}/script").json()["requests"][-3:]
    bounds = [(r.get("max_tokens"), r.get("max_completion_tokens")) for r in seen]
    assert bounds == [(1000, None), (50, None), (None, 70)], bounds


@pytest.mark.parametrize(
    ("path", "body", "sequences"),
    [
        ("/v1/chat/completions", {"messages": HI, "n": 4}, 4),
        ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}, 6),
        ("/v1/completions", {"prompt": "a", "n": 2, "best_of": 3}, 3),
    ],
)
def test_the_rate_limit_counts_the_sequences_a_request_asks_for(
    gw: Proc, path: str, body: dict, sequences: int
) -> None:
    """A key of 8 requests per minute is 8 sequences per minute: n and prompt lists count."""
    k = make_key(gw.log.parent, rpm=8)

    def post(extra: dict) -> httpx.Response:
        return httpx.post(
            f"{gw.url}{path}",
            headers={"authorization": f"Bearer {k}"},
            json={"model": "fake", **extra},
            timeout=5,
        )

    admitted = 0
    while (r := post(body)).status_code == 200:
        admitted += 1
        assert admitted <= 8
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert admitted == 8 // sequences, admitted
    left = 8 - admitted * sequences  # what is left still admits single sequences
    for _ in range(left):
        assert post({"messages": HI} if "chat" in path else {"prompt": "a"}).status_code == 200


def test_a_request_asking_for_more_sequences_than_a_minute_allows_says_so(gw: Proc) -> None:
    k = make_key(gw.log.parent, rpm=4)
    r = httpx.post(
        f"{gw.url}/v1/completions",
        headers={"authorization": f"Bearer {k}"},
        json={"model": "fake", "prompt": ["a"] * 5},
        timeout=5,
    )
    assert r.status_code == 429, r.text
    assert "5 sequences" in r.json()["error"]["message"]
    assert "4 per minute" in r.json()["error"]["message"]


@pytest.mark.parametrize(("rpm", "burst"), [(10, 30), (300, 600)])
def test_rpm_is_never_exceeded_across_two_gateway_processes(
    gw: Proc, fake: Proc, redis_url: str, rpm: int, burst: int
) -> None:
    """rpm 10 reserves one permit per request; rpm 300 leases 3 at a time per process."""
    shared_key = make_key(gw.log.parent, rpm=rpm, max_concurrency=1000)
    with gateway(gw.log.parent, [fake.url], redis_url) as second:

        async def run() -> tuple[list[int], float]:
            limits = httpx.Limits(max_connections=32)
            timeout = httpx.Timeout(10, pool=None)
            async with httpx.AsyncClient(timeout=timeout, limits=limits) as c:

                async def one(i: int) -> int:
                    url = (gw if i % 2 else second).url
                    r = await c.post(
                        f"{url}/v1/chat/completions",
                        headers={"authorization": f"Bearer {shared_key}"},
                        json={"model": "fake", "messages": HI},
                    )
                    if r.status_code == 429:
                        assert int(r.headers["retry-after"]) >= 1
                    return r.status_code

                t = time.monotonic()
                codes = list(await asyncio.gather(*(one(i) for i in range(burst))))
                return codes, time.monotonic() - t

        statuses, seconds = asyncio.run(run())
    admitted = statuses.count(200)
    assert statuses.count(429) == burst - admitted
    # The bucket holds `rpm` and refills at rpm/60 per second while the burst runs; permits
    # leased but not spent lapse, so each process may leave at most 1.5 leases unused.
    refill = int(rpm / 60 * seconds) + 1
    lease = max(1, min(64, rpm // 100))
    assert rpm - 3 * lease <= admitted <= rpm + refill, (admitted, seconds)


def test_keys_admin_api_creates_lists_and_revokes(gw: Proc) -> None:
    admin = make_key(gw.log.parent, "ops", admin=True)
    user = make_key(gw.log.parent, "someone")
    h = {"authorization": f"Bearer {admin}"}
    assert (
        httpx.get(f"{gw.url}/admin/keys", headers={"authorization": f"Bearer {user}"}).status_code
        == 403
    )
    r = httpx.post(f"{gw.url}/admin/keys", headers=h, json={"owner": "carol", "rpm": 5})
    assert r.status_code == 201
    created = r.json()
    assert created["key"].startswith("sk-cru-") and created["owner"] == "carol"
    assert (
        httpx.post(f"{gw.url}/admin/keys", headers=h, json={"owner": "carol", "rmp": 5}).status_code
        == 400
    )  # typo refused
    listed = httpx.get(f"{gw.url}/admin/keys", headers=h).json()["data"]
    assert created["id"] in [k["id"] for k in listed]
    assert created["key"] not in str(listed)  # secrets are never listed
    carol = {"authorization": f"Bearer {created['key']}"}
    assert httpx.get(f"{gw.url}/v1/models", headers=carol).status_code == 200
    assert httpx.delete(f"{gw.url}/admin/keys/{created['id']}", headers=h).status_code == 200
    assert httpx.get(f"{gw.url}/v1/models", headers=carol).status_code == 401
    assert httpx.delete(f"{gw.url}/admin/keys/key_nope", headers=h).status_code == 404


def test_no_key_or_body_in_logs(gw: Proc) -> None:
    canary = make_key(gw.log.parent, "canary-owner")
    secret_text = "canary-body-7f3a9"
    httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {canary}"},
        json={"model": "fake", "messages": [{"role": "user", "content": secret_text}]},
    )
    httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {canary}x"},
        json={"model": "fake", "messages": [{"role": "user", "content": secret_text}]},
    )
    time.sleep(0.3)
    log = gw.log.read_text()
    assert "canary-owner" in log  # the request lines are there ...
    assert (
        canary not in log and canary[-12:] not in log and secret_text not in log
    )  # ... secrets not


def test_upstream_down_is_503_within_a_second(tmp_path: Path, redis_url: str) -> None:
    with fake_upstream(tmp_path) as lone, gateway(tmp_path / "gw", [lone.url], redis_url) as g:
        k = make_key(tmp_path / "gw", rpm=0)
        h = {"authorization": f"Bearer {k}"}
        body = {"model": "fake", "messages": HI}
        assert httpx.post(f"{g.url}/v1/chat/completions", headers=h, json=body).status_code == 200
        lone.stop()
        start = time.monotonic()
        r = httpx.post(f"{g.url}/v1/chat/completions", headers=h, json=body)
        assert r.status_code == 503 and time.monotonic() - start < 1.0
        assert httpx.get(f"{g.url}/ready").status_code == 503


def test_failover_to_a_second_backend_and_probe_back(tmp_path: Path, redis_url: str) -> None:
    port_a = _free_port()
    with (
        fake_upstream(tmp_path, port_a) as a,
        fake_upstream(tmp_path) as b,
        gateway(tmp_path / "gw", [a.url, b.url], redis_url, routing_refresh_s=0.3) as g,
    ):
        k = make_key(tmp_path / "gw", rpm=0)
        h = {"authorization": f"Bearer {k}"}
        body = {"model": "fake", "messages": HI}
        a.stop()
        codes = [
            httpx.post(f"{g.url}/v1/chat/completions", headers=h, json=body).status_code
            for _ in range(10)
        ]
        assert codes == [200] * 10
        up = f'crucible_gateway_backend_up{{backend="{a.url}"}}'
        deadline = time.monotonic() + 2  # the gauge follows the router's next probe
        while f"{up} 0.0" not in httpx.get(f"{g.url}/metrics").text:
            assert time.monotonic() < deadline, "backend A was not reported down"
            time.sleep(0.05)
        with fake_upstream(tmp_path, port_a):
            deadline = time.monotonic() + 5
            while f"{up} 1.0" not in httpx.get(f"{g.url}/metrics").text:
                assert time.monotonic() < deadline, "backend A was not probed back up"
                time.sleep(0.1)


@pytest.mark.parametrize(("mode", "status"), [("open", 200), ("closed", 503)])
def test_redis_outage_follows_the_configured_policy(
    tmp_path: Path, fake: Proc, mode: str, status: int
) -> None:
    dead_redis = f"redis://127.0.0.1:{_free_port()}/0"
    with gateway(tmp_path, [fake.url], dead_redis, rate_limit_on_redis_error=mode) as g:
        k = make_key(tmp_path, rpm=100)
        r = httpx.post(
            f"{g.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {k}"},
            json={"model": "fake", "messages": HI},
        )
        assert r.status_code == status


def test_a_client_that_disconnects_cancels_the_upstream_stream(
    tmp_path: Path, fake: Proc, redis_url: str
) -> None:
    # A deadline far beyond the test: only the client's leaving can end the upstream stream.
    with gateway(tmp_path, [fake.url], redis_url, request_timeout_s=120) as g:
        key = make_key(tmp_path, rpm=0)
        before = httpx.get(f"{fake.url}/stats").json()["disconnects"]
        body = {"model": "fake-long", "messages": HI, "stream": True}
        with httpx.stream(
            "POST",
            f"{g.url}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
        ) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
        dropped = time.monotonic()  # the upstream would stream for another minute
        while httpx.get(f"{fake.url}/stats").json()["disconnects"] == before:
            assert time.monotonic() - dropped < 2, "the upstream stream was not cancelled"
            time.sleep(0.05)


def test_acting_on_behalf_of_an_admin_key_never_grants_admin(gw: Proc) -> None:
    """The internal token lets a Crucible service (the agent) act as a user's key, never as an
    admin: a leaked token must not mint keys."""
    admin = make_key(gw.log.parent, "ops", admin=True)
    store = KeyStore(f"sqlite:///{gw.log.parent / 'gateway.db'}")
    try:
        found = store.lookup(admin)
        assert found is not None and found.is_admin
    finally:
        store.engine.dispose()
    as_admin = {"authorization": f"Bearer {admin}"}
    assert httpx.get(f"{gw.url}/admin/keys", headers=as_admin).status_code == 200
    on_behalf = {"authorization": "Bearer dev-internal-token", ON_BEHALF_HEADER: found.id}
    r = httpx.post(f"{gw.url}/admin/keys", headers=on_behalf, json={"owner": "mallory"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert httpx.get(f"{gw.url}/admin/keys", headers=on_behalf).status_code == 403
    # The same header still acts as that key for what the key itself may do.
    assert httpx.get(f"{gw.url}/v1/models", headers=on_behalf).status_code == 200


def test_an_engine_behind_an_api_key_is_probed_and_called_with_it(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compose starts vLLM with an API key only the gateway and fine-tuning hold."""
    with fake_upstream(tmp_path, api_key="engine-key") as engine:
        # The gateway: its probe learns the models and its requests are let in.
        with gateway(
            tmp_path / "holds", [engine.url], redis_url, inference_api_key="engine-key"
        ) as g:
            reply = sdk(g, make_key(g.log.parent, rpm=0)).chat.completions.create(
                model="fake", messages=HI
            )
            assert reply.choices[0].message.content
        with gateway(tmp_path / "lacks", [engine.url], redis_url) as g:
            with pytest.raises(openai.NotFoundError):  # its probe was refused: no models known
                sdk(g, make_key(g.log.parent, rpm=0)).chat.completions.create(
                    model="fake", messages=HI
                )
            down = f'crucible_gateway_backend_up{{backend="{engine.url}"}} 0.0'
            assert down in httpx.get(f"{g.url}/metrics").text
        # Fine-tuning lists and loads adapters with it.
        headers = FinetuneSettings(inference_api_key=SecretStr("engine-key")).inference_headers()
        assert "fake" in adapters.served_models(engine.url, headers)
        with pytest.raises(httpx.HTTPStatusError):
            adapters.served_models(engine.url, {})
        # The engine's own healthcheck, in its container, reads the key vLLM reads.
        assert not readiness.is_ready(engine.url, "fake")
        monkeypatch.setenv("VLLM_API_KEY", "engine-key")
        assert readiness.is_ready(engine.url, "fake")


def test_a_backend_back_before_its_next_probe_takes_the_request_when_the_other_dies(
    tmp_path: Path, redis_url: str
) -> None:
    """Two backends; A dies and is marked down; A comes back, and B dies before the router's
    next probe (a minute here): the request is not refused with every backend marked down, the
    gateway probes at once and sends it to A."""
    port_a = _free_port()
    with (
        fake_upstream(tmp_path, port_a) as a,
        fake_upstream(tmp_path) as b,
        gateway(tmp_path / "gw", [a.url, b.url], redis_url, routing_refresh_s=60) as g,
    ):
        k = make_key(tmp_path / "gw", rpm=0)
        h = {"authorization": f"Bearer {k}"}
        body = {"model": "fake", "messages": HI}
        up_a = f'crucible_gateway_backend_up{{backend="{a.url}"}}'
        a.stop()  # the next request finds A refusing, marks it down and goes to B
        assert httpx.post(f"{g.url}/v1/chat/completions", headers=h, json=body).status_code == 200
        with fake_upstream(tmp_path, port_a):  # A is back, still marked down
            b.stop()
            r = httpx.post(f"{g.url}/v1/chat/completions", headers=h, json=body)
            assert r.status_code == 200, r.text
            assert f"{up_a} 1.0" in httpx.get(f"{g.url}/metrics").text

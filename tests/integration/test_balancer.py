"""CRUCIBLE_REPLICAS=2's balancer, as the stack configures it (services/stackconfig.py): HAProxy
from Debian in front of two gateway processes that share one Redis and key database, before a
scripted upstream (tests/fakes). Requests are spread over both, a stream passes as the upstream
sends it, a gateway that dies loses no request that had not reached it, and a key's per-minute
limit holds across both."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.gateway.keys import KeyStore
from services.stackconfig import StackConfig, _free_port, _http_ok, balancer_config
from tests.metrics import counted
from tests.processes import Proc, _spawn, _wait, replicas

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def var(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("balancer")


@pytest.fixture(scope="module")
def gateways(var: Path, fake: Proc, redis_url: str) -> Iterator[tuple[Proc, Proc]]:
    with replicas(var, [fake.url], redis_url) as both:
        yield both


@pytest.fixture(scope="module")
def balancer(var: Path, gateways: tuple[Proc, Proc]) -> Iterator[str]:
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy is missing: `make setup` installs Debian's haproxy package"
    port = _free_port()
    cfg = var / "haproxy.cfg"
    cfg.write_text(balancer_config(port, [g.port for g in gateways]))
    proc = _spawn([haproxy, "-db", "-f", str(cfg)], {}, var / "haproxy.log")
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _http_ok(f"{url}/health"), "haproxy")
        yield url
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def keys(var: Path, gateways: tuple[Proc, Proc]) -> Iterator[KeyStore]:
    store = KeyStore(f"sqlite:///{var / 'gateway.db'}")
    yield store
    store.engine.dispose()


def _served(gateway: Proc) -> float:
    return counted(gateway.url, "crucible_gateway_requests", route="/v1/chat/completions")


def test_the_balancers_configuration_is_valid_haproxy(tmp_path: Path) -> None:
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy is missing: `make setup` installs Debian's haproxy package"
    config = StackConfig(var_dir=tmp_path, replicas=2)
    path = config.write_balancer_config()
    text = path.read_text()
    assert f"bind 127.0.0.1:{config.ports.gateway}" in text
    assert text.count("server gateway-") == 2 and "retry-on conn-failure\n" in text
    checked = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_requests_are_spread_over_both_gateways(
    balancer: str, gateways: tuple[Proc, Proc], keys: KeyStore
) -> None:
    secret, _ = keys.create("balanced", rpm=0)
    before = [_served(g) for g in gateways]
    with httpx.Client(base_url=balancer, timeout=10) as http:
        for _ in range(20):
            r = http.post(
                "/v1/chat/completions",
                json={"model": "fake", "messages": HI},
                headers={"authorization": f"Bearer {secret}"},
            )
            assert r.status_code == 200, r.text
    served = [_served(g) - b for g, b in zip(gateways, before, strict=True)]
    assert sum(served) == 20 and min(served) >= 5, served


def test_a_stream_passes_as_the_upstream_sends_it(balancer: str, keys: KeyStore) -> None:
    """`fake-long` sends a chunk every 50 ms for a minute: through the balancer the first ten
    arrive spread over half a second, not held back, and closing early is fine."""
    secret, _ = keys.create("streamer", rpm=0)
    body = {"model": "fake-long", "messages": HI, "stream": True}
    arrivals: list[float] = []
    with (
        httpx.Client(base_url=balancer, timeout=10) as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {secret}"},
        ) as r,
    ):
        assert r.status_code == 200
        start = time.monotonic()
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - start)
            if len(arrivals) == 10:
                break
    assert arrivals[0] < 1.0
    assert arrivals[-1] - arrivals[0] > 0.3, arrivals  # nine gaps of ~50 ms, as sent


async def _fire(url: str, secret: str, n: int) -> list[int]:
    headers = {"authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=n)) as http:
        replies = await asyncio.gather(
            *(
                http.post(
                    f"{url}/v1/chat/completions",
                    json={"model": "fake", "messages": HI},
                    headers=headers,
                )
                for _ in range(n)
            )
        )
    return [r.status_code for r in replies]


def test_a_keys_per_minute_limit_holds_across_both_gateways(balancer: str, keys: KeyStore) -> None:
    """README "Limits": each process leases about 1% of a key's budget (1 permit at 100 a
    minute), so the fleet admits at most the budget, and at least the budget less a lease per
    gateway."""
    secret, _ = keys.create("limited", rpm=100, max_concurrency=256)
    statuses = asyncio.run(_fire(balancer, secret, 130))
    admitted = statuses.count(200)
    assert 98 <= admitted <= 100, admitted
    assert statuses.count(429) == 130 - admitted


def test_a_gateway_that_dies_loses_no_request_that_had_not_reached_it(
    balancer: str, gateways: tuple[Proc, Proc], keys: KeyStore
) -> None:
    """SIGKILL one gateway while requests keep coming: every request sent after it died is
    answered (HAProxy retries one that cannot connect on the other, and takes the dead one out
    after two failed checks, 2 s)."""
    secret, _ = keys.create("survivor", rpm=0)
    doomed = gateways[1]
    doomed.stop()
    failed, answered = [], 0
    with httpx.Client(base_url=balancer, timeout=10) as http:
        end = time.monotonic() + 4  # the dead one's checks fail within 2 s, and past that
        while time.monotonic() < end:
            r = http.post(
                "/v1/chat/completions",
                json={"model": "fake", "messages": HI},
                headers={"authorization": f"Bearer {secret}"},
            )
            answered += 1
            if r.status_code != 200:
                failed.append(r.status_code)
    assert answered > 20 and failed == []

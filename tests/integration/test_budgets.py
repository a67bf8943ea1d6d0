"""Token budgets that cannot be overrun: two gateway processes share one key database and one
Redis, a scripted model reports the usage of each answer (tests/fakes), and requests are fired
at both at once. A request reserves its worst case (its body's bytes plus `max_tokens` times its
sequences, README "Budgets") and is settled to what the engine reported."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from services.gateway.keys import KeyStore
from tests.processes import Proc, replicas

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def var(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("budgets")


@pytest.fixture(scope="module")
def gateways(var: Path, fake: Proc, redis_url: str) -> Iterator[tuple[Proc, Proc]]:
    with replicas(var, [fake.url], redis_url) as both:
        yield both


@pytest.fixture(scope="module")
def keys(var: Path, gateways: tuple[Proc, Proc]) -> Iterator[KeyStore]:
    store = KeyStore(f"sqlite:///{var / 'gateway.db'}")
    yield store
    store.engine.dispose()


def _body(tag: str, max_tokens: int = MAX_TOKENS) -> bytes:
    messages = [{"role": "user", "content": f"Balance this equation ({tag})."}]
    return orjson.dumps({"model": "scripted", "messages": messages, "max_tokens": max_tokens})


def _script(fake: Proc, prompt: int, completion: int, delay_s: float = 0.0) -> None:
    reply = {
        "content": "ok",
        "repeat": True,
        "delay_s": delay_s,
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
    }
    r = httpx.post(f"{fake.url}/script", json={"replies": [reply]}, timeout=10)
    r.raise_for_status()


async def _fire(urls: list[str], secret: str, body: bytes, n: int) -> list[httpx.Response]:
    headers = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        return await asyncio.gather(
            *(
                http.post(
                    f"{urls[i % len(urls)]}/v1/chat/completions", content=body, headers=headers
                )
                for i in range(n)
            )
        )


def _statuses(responses: list[httpx.Response]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in responses:
        out[r.status_code] = out.get(r.status_code, 0) + 1
    return out


def test_64_concurrent_requests_against_a_budget_for_10_admit_exactly_10(
    gateways: tuple[Proc, Proc], keys: KeyStore, fake: Proc
) -> None:
    body = _body("burst")
    worst = len(body) + MAX_TOKENS  # what the gateway reserves for each
    # The engine reports exactly the worst case, so settling gives nothing back mid-burst.
    _script(fake, len(body), MAX_TOKENS, delay_s=0.3)
    secret, info = keys.create(
        "budget-burst", rpm=0, max_concurrency=128, budget_tokens=10 * worst, budget_period="day"
    )
    urls = [g.url for g in gateways]
    responses = asyncio.run(_fire(urls, secret, body, 64))
    assert _statuses(responses) == {200: 10, 429: 54}
    refused = next(r for r in responses if r.status_code == 429).json()["error"]
    assert refused["code"] == "insufficient_quota" and "key's budget" in refused["message"]
    # Spent exactly: another request is refused on either process, and an admin sees it.
    again = asyncio.run(_fire(urls, secret, body, 2))
    assert _statuses(again) == {429: 2}
    admin, _ = keys.create("budget-ops", admin=True)
    shown = httpx.get(
        f"{urls[1]}/admin/keys/{info['id']}",
        headers={"authorization": f"Bearer {admin}"},
        timeout=10,
    ).json()
    assert (shown["budget_tokens"], shown["budget_used"]) == (10 * worst, 10 * worst)


def test_a_request_is_settled_to_what_the_engine_used(
    gateways: tuple[Proc, Proc], keys: KeyStore, fake: Proc
) -> None:
    body = _body("settle")
    worst = len(body) + MAX_TOKENS
    _script(fake, 3, 2)  # 5 tokens used of each reservation
    secret, _ = keys.create("budget-settle", rpm=0, budget_tokens=worst + 5 * 4)
    urls = [gateways[0].url]
    # Each reserves `worst` and gives back all but 5: five in a row fit a budget of worst + 20.
    for _ in range(5):
        assert _statuses(asyncio.run(_fire(urls, secret, body, 1))) == {200: 1}
    assert _statuses(asyncio.run(_fire(urls, secret, body, 1))) == {429: 1}  # 25 + worst > it
    # One asking for fewer tokens fits what is left (worst - 5 > its worst, worst - 7).
    tiny = _body("settle", max_tokens=1)
    assert len(tiny) + 1 == worst - 7
    assert _statuses(asyncio.run(_fire(urls, secret, tiny, 1))) == {200: 1}


def test_a_projects_budget_is_shared_by_its_keys_and_changes_in_place(
    gateways: tuple[Proc, Proc], keys: KeyStore, fake: Proc
) -> None:
    from services.gateway.projects import ProjectCreate, Projects, ProjectUpdate

    body = _body("project")
    worst = len(body) + MAX_TOKENS
    _script(fake, len(body), MAX_TOKENS)  # each uses its worst case
    projects = Projects(keys)
    project = projects.create(ProjectCreate(name="budgeted", budget_tokens=3 * worst))
    alice, _ = keys.create(project["id"], rpm=0, make_project=False)
    bob, _ = keys.create(project["id"], rpm=0, make_project=False)
    a, b = gateways[0].url, gateways[1].url
    for secret, url in ((alice, a), (bob, b), (alice, b)):
        assert _statuses(asyncio.run(_fire([url], secret, body, 1))) == {200: 1}
    refused = asyncio.run(_fire([a], bob, body, 1))[0]
    assert refused.status_code == 429 and "project's budget" in refused.json()["error"]["message"]

    # Raised by an admin (as `crucible` does, in the database): a gateway process that did not
    # make the change admits again within its key cache's 5 s.
    projects.update(project["id"], ProjectUpdate(budget_tokens=4 * worst))
    assert asyncio.run(_until_admitted(b, bob, body)), "the raised budget was never applied"


async def _until_admitted(url: str, secret: str, body: bytes, within: float = 6.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while loop.time() < end:
        (r,) = await _fire([url], secret, body, 1)
        if r.status_code == 200:
            return True
        await asyncio.sleep(0.2)
    return False


def test_unbudgeted_keys_are_not_counted(
    gateways: tuple[Proc, Proc], keys: KeyStore, fake: Proc
) -> None:
    _script(fake, 10_000, 10_000)
    secret, _ = keys.create("no-budget", rpm=0)
    body = _body("free")
    assert _statuses(asyncio.run(_fire([gateways[0].url], secret, body, 3))) == {200: 3}

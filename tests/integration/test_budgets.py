"""Budgets that cannot be overrun, in tokens and in dollars: two gateway processes share one key
database and one Redis, a scripted model reports the usage of each answer (tests/fakes), and
requests are fired at both at once. A request reserves its worst case (its body's bytes plus
`max_tokens` times its sequences, README "Budgets"; in dollars, priced by the gateways' list)
and is settled to what the engine reported."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from services.gateway.keys import KeyStore
from tests.processes import Proc, gateway, replicas

MAX_TOKENS = 8
# The gateways' price list for dollar budgets: USD per million tokens, i.e. micro-dollars a token.
PRICE_IN, PRICE_OUT = 2.0, 10.0


@pytest.fixture(scope="module")
def var(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("budgets")


@pytest.fixture(scope="module")
def gateways(var: Path, fake: Proc, redis_url: str) -> Iterator[tuple[Proc, Proc]]:
    prices = {"scripted": {"input": PRICE_IN, "output": PRICE_OUT}}
    with replicas(var, [fake.url], redis_url, budget_prices=orjson.dumps(prices).decode()) as both:
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


def _micro_usd(tokens_in: int, tokens_out: int) -> int:
    return int(tokens_in * PRICE_IN + tokens_out * PRICE_OUT)


def test_64_concurrent_requests_against_a_dollar_budget_for_10_admit_exactly_10(
    gateways: tuple[Proc, Proc], keys: KeyStore, fake: Proc
) -> None:
    body = _body("dollars")
    worst = _micro_usd(len(body), MAX_TOKENS)  # what the gateway reserves for each, in µ$
    _script(fake, len(body), MAX_TOKENS, delay_s=0.3)  # each uses its worst case
    secret, info = keys.create(
        "budget-usd", rpm=0, max_concurrency=128, budget_usd=10 * worst / 1e6, budget_period="day"
    )
    urls = [g.url for g in gateways]
    responses = asyncio.run(_fire(urls, secret, body, 64))
    assert _statuses(responses) == {200: 10, 429: 54}
    refused = next(r for r in responses if r.status_code == 429).json()["error"]
    assert refused["code"] == "insufficient_quota"
    assert f"key's budget of ${10 * worst / 1e6:,.6f}" in refused["message"]
    assert _statuses(asyncio.run(_fire(urls, secret, body, 2))) == {429: 2}
    admin, _ = keys.create("budget-usd-ops", admin=True)
    shown = httpx.get(
        f"{urls[0]}/admin/keys/{info['id']}",
        headers={"authorization": f"Bearer {admin}"},
        timeout=10,
    ).json()
    assert (shown["budget_usd"], shown["budget_used_usd"]) == (10 * worst / 1e6, 10 * worst / 1e6)
    assert (shown["budget_tokens"], shown["budget_used"]) == (None, None)


def test_a_dollar_budget_is_settled_at_the_price_of_what_the_engine_used(
    gateways: tuple[Proc, Proc], keys: KeyStore, fake: Proc
) -> None:
    body = _body("settle-usd")
    worst = _micro_usd(len(body), MAX_TOKENS)
    used = _micro_usd(3, 2)  # 26 µ$ of each reservation kept
    _script(fake, 3, 2)
    # A project's dollar budget and a key's token budget, both counted on each request.
    from services.gateway.projects import ProjectCreate, Projects

    project = Projects(keys).create(
        ProjectCreate(name="priced", budget_usd=(worst + 4 * used) / 1e6)
    )
    secret, _ = keys.create(project["id"], rpm=0, make_project=False, budget_tokens=10**6)
    urls = [gateways[1].url]
    for _ in range(5):
        assert _statuses(asyncio.run(_fire(urls, secret, body, 1))) == {200: 1}
    refused = asyncio.run(_fire(urls, secret, body, 1))[0]
    assert (
        refused.status_code == 429 and "project's budget of $" in refused.json()["error"]["message"]
    )
    admin, _ = keys.create("budget-usd-ops2", admin=True)
    headers = {"authorization": f"Bearer {admin}"}
    shown = httpx.get(f"{urls[0]}/admin/projects/{project['id']}", headers=headers, timeout=10)
    assert shown.json()["budget_used_usd"] == 5 * used / 1e6
    mine = httpx.get(f"{urls[0]}/admin/keys", headers=headers, timeout=10).json()["data"]
    key_id = next(k["id"] for k in mine if k["project_id"] == project["id"])
    shown = httpx.get(f"{urls[0]}/admin/keys/{key_id}", headers=headers, timeout=10).json()
    assert shown["budget_used"] == 5 * (3 + 2)  # the refused one held and gave back nothing


def test_a_dollar_budget_cannot_be_set_where_the_gateway_has_no_prices(
    var: Path, fake: Proc, redis_url: str, keys: KeyStore
) -> None:
    admin, _ = keys.create("budget-noprice-ops", admin=True)
    headers = {"authorization": f"Bearer {admin}"}
    with gateway(var, [fake.url], redis_url) as plain:
        r = httpx.post(
            f"{plain.url}/admin/keys",
            json={"project_id": "budget-noprice", "budget_usd": 5},
            headers=headers,
            timeout=10,
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (
            error["param"] == "budget_usd" and "CRUCIBLE_GATEWAY_BUDGET_PRICES" in error["message"]
        )
        made = httpx.post(
            f"{plain.url}/admin/keys",
            json={"owner": "budget-noprice", "budget_tokens": 5},
            headers=headers,
            timeout=10,
        )
        assert made.status_code == 201 and made.json()["budget_usd"] is None

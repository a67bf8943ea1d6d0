"""Keys changed without reissuing them, through `/admin/keys/{id}` with the official SDK's
generic calls: limits and allow-lists apply on every gateway process within the key cache's TTL,
an expired key is refused saying so, and listings show when a key was last used. Two gateway
processes share one key database; a fake model answers (tests/fakes)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from services.gateway.keys import KeyStore
from tests.processes import Proc, replicas

HI: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def var(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="module")
def gateways(var: Path, fake: Proc, redis_url: str) -> Iterator[tuple[Proc, Proc]]:
    with replicas(var, [fake.url], redis_url, key_last_used_every_s=0.2) as both:
        yield both


@pytest.fixture(scope="module")
def keys(var: Path, gateways: tuple[Proc, Proc]) -> Iterator[KeyStore]:
    store = KeyStore(f"sqlite:///{var / 'gateway.db'}")
    yield store
    store.engine.dispose()


@pytest.fixture(scope="module")
def admin(gateways: tuple[Proc, Proc], keys: KeyStore) -> openai.OpenAI:
    """The admin routes are outside /v1: this client's base is the gateway itself."""
    secret, _ = keys.create("ops", admin=True, rpm=0)
    return openai.OpenAI(base_url=gateways[0].url, api_key=secret, max_retries=0, timeout=10)


def _sdk(gw: Proc, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0, timeout=10)


def _update(client: openai.OpenAI, key_id: str, **changes: Any) -> Any:
    return client.post(f"/admin/keys/{key_id}", body=changes, cast_to=object)


def _get(client: openai.OpenAI, path: str) -> Any:
    return client.get(path, cast_to=object)


def _until(check: Any, timeout: float, what: str) -> float:
    """Seconds until `check()` holds."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, what
        time.sleep(0.05)
    return time.monotonic() - start


def _status(client: openai.OpenAI, model: str = "fake") -> int:
    try:
        client.chat.completions.create(model=model, messages=HI)
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def test_a_changed_allow_list_and_rate_apply_on_every_gateway_within_the_cache_ttl(
    gateways: tuple[Proc, Proc], keys: KeyStore, admin: openai.OpenAI
) -> None:
    secret, info = keys.create("lab", models=["fake"], rpm=0)
    on_a, on_b = _sdk(gateways[0], secret), _sdk(gateways[1], secret)
    assert _status(on_a, "fake-b") == _status(on_b, "fake-b") == 404  # both cached it so

    updated = _update(admin, info["id"], models=["fake", "fake-b"])
    assert updated["models"] == ["fake", "fake-b"] and updated["rpm"] == 0  # the rest stays
    assert _status(on_a, "fake-b") == 200  # the gateway that took the change: at once
    assert _until(lambda: _status(on_b, "fake-b") == 200, 5.5, "the other gateway") <= 5.5

    _update(admin, info["id"], rpm=1)
    _until(lambda: _status(on_b) == 429, 5.5, "the new rate on the other gateway")
    assert _get(admin, f"/admin/keys/{info['id']}")["models"] == ["fake", "fake-b"]


def test_a_revoked_key_is_refused_by_every_gateway_within_the_cache_ttl(
    gateways: tuple[Proc, Proc], keys: KeyStore, admin: openai.OpenAI
) -> None:
    """README "Keys": revoking applies at once on the gateway that took it, on the others
    within their key cache's 5 s."""
    secret, info = keys.create("lab", rpm=0)
    on_a, on_b = _sdk(gateways[0], secret), _sdk(gateways[1], secret)
    assert _status(on_a) == _status(on_b) == 200  # cached as valid by both
    admin.delete(f"/admin/keys/{info['id']}", cast_to=object)
    assert _status(on_a) == 401  # the gateway that took the change: at once
    assert _until(lambda: _status(on_b) == 401, 5.5, "the other gateway") <= 5.5


def test_an_expired_key_is_refused_saying_so_even_while_cached(
    gateways: tuple[Proc, Proc], keys: KeyStore, admin: openai.OpenAI
) -> None:
    expires = int(time.time()) + 3
    secret, info = keys.create("lab", rpm=0, expires_at=expires)
    client = _sdk(gateways[0], secret)
    assert _status(client) == 200  # valid, and now in the gateway's key cache
    _until(lambda: _status(client) == 401, 10, "the key was never refused")
    assert time.time() < expires + 2  # at its expiry, not when the cache let go of it
    with pytest.raises(openai.AuthenticationError) as refused:
        client.models.list()
    assert refused.value.code == "expired_api_key" and "expired at" in refused.value.message

    later = int(time.time()) + 3600  # extended: the same secret works again
    assert _update(admin, info["id"], expires_at=later)["expires_at"] == later
    assert _status(client) == 200


def test_a_keys_last_use_is_listed(
    gateways: tuple[Proc, Proc], keys: KeyStore, admin: openai.OpenAI
) -> None:
    secret, info = keys.create("lab", rpm=0)
    assert _get(admin, f"/admin/keys/{info['id']}")["last_used_at"] is None
    before = int(time.time())
    assert _status(_sdk(gateways[1], secret)) == 200

    def listed() -> int | None:
        everyone = _get(admin, "/admin/keys")["data"]
        used: int | None = next(k for k in everyone if k["id"] == info["id"])["last_used_at"]
        return used

    _until(lambda: listed() is not None, 10, "the last use was never recorded")
    assert (listed() or 0) >= before


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"expires_at": 1_000_000_000}, "expires_at"),  # in the past
        ({"expires_at": 10**20}, "expires_at"),
        ({"rpm": -1}, "rpm"),
        ({"rpm": True}, "rpm"),
        ({"owner": "someone-else"}, "owner"),  # not changeable: the owner stays
        ({"admin": True}, "admin"),  # nor a grant
    ],
)
def test_an_invalid_change_is_400_and_changes_nothing(
    keys: KeyStore, admin: openai.OpenAI, changes: dict[str, Any], param: str
) -> None:
    _, info = keys.create("lab", rpm=7)
    with pytest.raises(openai.BadRequestError) as refused:
        _update(admin, info["id"], **changes)
    assert param in str(refused.value.body)
    after = keys.get(info["id"])
    assert after is not None and (after["owner"], after["rpm"], after["admin"]) == ("lab", 7, False)


def test_unknown_revoked_and_non_admin_changes_are_refused(
    gateways: tuple[Proc, Proc], keys: KeyStore, admin: openai.OpenAI
) -> None:
    with pytest.raises(openai.NotFoundError):
        _update(admin, "key_" + "0" * 24, rpm=5)
    secret, info = keys.create("lab", rpm=0)
    member = openai.OpenAI(base_url=gateways[0].url, api_key=secret, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):  # a member cannot raise their own limit
        _update(member, info["id"], rpm=0)
    assert keys.revoke(info["id"])
    with pytest.raises(openai.NotFoundError):
        _update(admin, info["id"], rpm=5)


def test_the_audit_log_shows_each_key_change_with_who_and_never_a_secret(
    keys: KeyStore, admin: openai.OpenAI
) -> None:
    secret, info = keys.create("lab", rpm=3)  # as `crucible keys create` does: an operator
    later = int(time.time()) + 86_400
    _update(admin, info["id"], rpm=4, expires_at=later)
    made: Any = admin.post("/admin/keys", body={"owner": "lab", "name": "app"}, cast_to=object)
    admin.delete(f"/admin/keys/{made['id']}", cast_to=object)
    me = next(k for k in _get(admin, "/admin/keys")["data"] if k["owner"] == "ops")

    def trail(target: str) -> list[tuple[str, str, Any]]:
        events = _get(admin, f"/admin/audit?target={target}&order=asc")["data"]
        return [(e["action"], e["actor"], e["detail"]) for e in events]

    created, updated = trail(info["id"])
    assert created[:2] == ("key.create", "cli") and created[2]["rpm"] == 3
    assert updated == ("key.update", me["id"], {"rpm": 4, "expires_at": later})
    assert [(a, who) for a, who, _ in trail(made["id"])] == [
        ("key.create", me["id"]),
        ("key.revoke", me["id"]),
    ]
    everything = json.dumps(_get(admin, "/admin/audit?limit=100"))
    assert secret not in everything and made["key"] not in everything
    assert "sk-cru-" not in everything  # not even a key's hint

"""The gateway's alias split: weights, stickiness, pins and fallbacks, with no I/O."""

from __future__ import annotations

from collections import Counter

from pydantic import SecretStr

from services.gateway.aliases import Alias, AliasTable


def alias(routes: dict[str, float], name: str = "chem") -> Alias:
    return Alias(
        {
            "id": "alias_1",
            "owner": "lab",
            "name": name,
            "revision": 3,
            "sticky": "user",
            "routes": [{"model": m, "weight": w} for m, w in routes.items()],
        }
    )


def test_the_split_follows_the_weights() -> None:
    a = alias({"base": 70, "cand": 20, "old": 10})
    seen = Counter(a.pick(f"user-{i}") for i in range(20_000))
    assert abs(seen["cand"] / 20_000 - 0.2) < 0.015 and abs(seen["old"] / 20_000 - 0.1) < 0.015


def test_an_identifier_keeps_its_target_and_a_growing_canary_keeps_its_users() -> None:
    small, large = alias({"cand": 10, "base": 90}), alias({"cand": 20, "base": 80})
    users = [f"user-{i}" for i in range(2000)]
    assert [small.pick(u) for u in users] == [small.pick(u) for u in users]
    in_canary = {u for u in users if small.pick(u) == "cand"}
    assert in_canary and all(large.pick(u) == "cand" for u in in_canary)


def test_weight_zero_is_never_drawn_and_fallbacks_go_heaviest_first() -> None:
    a = alias({"base": 60, "pinned-only": 0, "cand": 40})
    assert "pinned-only" not in {a.pick(None) for _ in range(2000)}
    assert a.fallbacks("cand") == ["base"]
    assert a.fallbacks("base") == ["cand"]


def test_a_pin_names_one_of_the_aliases_targets() -> None:
    table = AliasTable("http://127.0.0.1:9", SecretStr("t"))
    table.by_owner = {"lab": {"chem": alias({"base": 1, "cand": 0})}}
    assert table.find("lab", "chem") == (table.by_owner["lab"]["chem"], None)
    assert table.find("lab", "chem@cand") == (table.by_owner["lab"]["chem"], "cand")
    assert table.find("lab", "chem@other") is None
    assert table.find("someone-else", "chem") is None

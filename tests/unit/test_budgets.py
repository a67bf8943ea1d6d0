"""What a budget counts: tokens, or micro-dollars at the lab's price list (budgets.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.gateway.budgets import Budget, Price, Prices, budgets_of
from services.gateway.config import GatewaySettings


def test_a_model_is_priced_by_its_own_entry_then_its_base_then_the_default() -> None:
    prices = Prices(
        {
            "*": {"input": 0.1, "output": 0.2},
            "crucible-dev": {"input": 1.0, "output": 3.0},
            "ft:crucible-dev:lab:special:ftjob-1": {"input": 5.0},
        }
    )
    assert prices.of("crucible-dev") == Price(1.0, 3.0)
    assert prices.of("ft:crucible-dev:lab:x:ftjob-2") == Price(1.0, 3.0)  # its base's
    assert prices.of("ft:crucible-dev:lab:special:ftjob-1") == Price(
        5.0, 0.0
    )  # a price not given is 0
    assert prices.of("embedder") == Price(0.1, 0.2)
    assert Prices({"crucible-dev": {"input": 1}}).of("embedder") is None
    assert not Prices({})


def test_a_dollar_budget_counts_micro_dollars_rounded_up() -> None:
    usd = Budget("key", "key_a", 2_000_000, "day", "usd")
    tokens = Budget("key", "key_a", 900, "day")
    price = Price(0.15, 0.6)  # USD per million tokens: micro-dollars per token
    assert usd.amount(1000, 100, price) == 210  # 150 + 60
    assert usd.amount(1, 0, price) == 1  # 0.15 µ$ is charged as 1: never under
    assert tokens.amount(1000, 100, None) == 1100
    assert usd.says(2_000_000) == "$2.000000" and tokens.says(900) == "900 tokens"
    # Two counters of one key: the token one keeps its name from before dollar budgets.
    assert tokens.counter(0)[0] == "crucible:budget:key:key_a:1970-01-01"
    assert usd.counter(0)[0] == "crucible:budget:key:key_a:usd:1970-01-01"


def test_a_row_holds_either_budget_or_both() -> None:
    assert budgets_of("project", "p", None, None, "month") == ()
    both = budgets_of("project", "p", 10, 5_000_000, "month")
    assert [(b.unit, b.limit) for b in both] == [("tokens", 10), ("usd", 5_000_000)]


@pytest.mark.parametrize(
    "table",
    ['{"*": {"inptu": 1}}', '{"*": {"input": -1}}', '{"*": {"output": "nan"}}'],
)
def test_the_price_list_refuses_what_would_miscount(
    table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRUCIBLE_GATEWAY_BUDGET_PRICES", table)
    with pytest.raises(ValidationError, match="budget_prices"):
        GatewaySettings()


def test_a_dollar_budget_refuses_a_model_without_a_price() -> None:
    from typing import Any, cast

    from services.common.errors import PermissionDenied
    from services.gateway.budgets import Budgets

    budgets = Budgets(cast(Any, None), prices=Prices({"crucible-dev": {"input": 1, "output": 2}}))
    usd = Budget("project", "p", 10**6, "month", "usd")
    tokens = Budget("project", "p", 10**6, "month")
    assert budgets.price([tokens, usd], "crucible-dev") == Price(1, 2)
    assert budgets.price([tokens], "embedder") is None  # tokens need no price
    with pytest.raises(PermissionDenied) as refused:
        budgets.price([tokens, usd], "embedder")
    assert refused.value.code == "model_not_priced" and "'embedder'" in refused.value.message

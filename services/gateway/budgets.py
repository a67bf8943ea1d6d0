"""Budgets per key and per project, per UTC day or month, in tokens or in dollars, that cannot
be overrun.

Before a model request goes out, its worst case is reserved: the bytes of the body sent (a
prompt token is at least one byte of what the client sent; a message's JSON framing outweighs
the tokens a chat template adds to it) as input, plus the output bound (`max_tokens` or the
gateway's cap) times the sequences asked for as output. A budget in tokens counts their sum; a
budget in dollars prices them at the lab's price list (USD per million tokens, per model:
`CRUCIBLE_GATEWAY_BUDGET_PRICES`), counted in micro-dollars, so that the worst case is known
before the request goes out (what an answer costs in engine time is known only after). One Lua
script checks every budget the request counts against and reserves on all of them, or on none,
atomically in Redis: gateway processes share the counters, so 64 concurrent requests against a
budget that fits 10 admit 10. When the answer is in, each reservation is settled to what the
engine reported (a request that never reached an engine gives it all back; one whose usage is
unknown keeps its worst case). Beyond a budget the answer is 429 `insufficient_quota`; with
Redis away, 503 (a budget is never skipped).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.common.errors import PermissionDenied, QuotaExceeded, Unavailable
from services.gateway.metrics import GatewayMetrics
from services.gateway.redisio import Redis, RedisReplyError, Script

log = logging.getLogger("crucible.gateway.budgets")

PERIODS = ("day", "month")
MICRO = 1_000_000  # a dollar budget is counted in micro-dollars

# KEYS: the counters; ARGV[3i-2], ARGV[3i-1], ARGV[3i]: counter i's amount, budget and TTL (s).
# Returns {0, total_1, ...} when reserved on all, else {i, used} for the first it would pass.
_RESERVE = Script("""
for i, key in ipairs(KEYS) do
  local used = tonumber(redis.call('GET', key) or '0')
  if used + tonumber(ARGV[3 * i - 2]) > tonumber(ARGV[3 * i - 1]) then return {i, used} end
end
local totals = {0}
for i, key in ipairs(KEYS) do
  totals[i + 1] = redis.call('INCRBY', key, ARGV[3 * i - 2])
  redis.call('EXPIRE', key, tonumber(ARGV[3 * i]))
end
return totals
""")
# KEYS: the counters a reservation holds; ARGV[i]: what to add to counter i (negative: given
# back).
_SETTLE = Script("""
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, ARGV[i]) end
end
return 0
""")


def window(period: str, now: float | None = None) -> tuple[str, int]:
    """The current window of a period (`2026-12-01`, `2026-12`) and a TTL that outlives it."""
    t = time.gmtime(now)
    if period == "day":
        return time.strftime("%Y-%m-%d", t), 2 * 86_400
    return time.strftime("%Y-%m", t), 32 * 86_400


@dataclass(frozen=True)
class Price:
    """USD per million tokens: micro-dollars per token."""

    input: float
    output: float


class Prices:
    """The lab's price list for dollar budgets: a model's own price, else its base model's (a
    fine-tuned `ft:<base>:...` costs what its base does), else `*`'s."""

    def __init__(self, table: Mapping[str, Mapping[str, float]]) -> None:
        self.table = {m: Price(p.get("input", 0.0), p.get("output", 0.0)) for m, p in table.items()}

    def __bool__(self) -> bool:
        return bool(self.table)

    def of(self, model: str) -> Price | None:
        if model.startswith("ft:") and model not in self.table:
            model = model.split(":")[1]
        return self.table.get(model) or self.table.get("*")


@dataclass(frozen=True)
class Budget:
    """Who a budget belongs to (`key` or `project`), its id, and what it allows per period:
    tokens, or micro-dollars (`unit` "usd")."""

    scope: str
    id: str
    limit: int
    period: str
    unit: str = "tokens"

    def counter(self, now: float | None = None) -> tuple[str, str, int]:
        """(Redis key, window, TTL) for the current window."""
        name, ttl = window(self.period, now)
        unit = ":usd" if self.unit == "usd" else ""
        return f"crucible:budget:{self.scope}:{self.id}{unit}:{name}", name, ttl

    def amount(self, input_tokens: int, output_tokens: int, price: Price | None) -> int:
        """What these tokens count against this budget (micro-dollars rounded up)."""
        if self.unit == "tokens":
            return input_tokens + output_tokens
        assert price is not None
        return math.ceil(input_tokens * price.input + output_tokens * price.output)

    def says(self, amount: int) -> str:
        return f"{amount:,} tokens" if self.unit == "tokens" else f"${amount / MICRO:,.6f}"


def budgets_of(
    scope: str, id_: str, tokens: int | None, usd_micros: int | None, period: str
) -> tuple[Budget, ...]:
    """A key's or a project's budgets, as its row holds them (None: none of that unit)."""
    out = []
    if tokens is not None:
        out.append(Budget(scope, id_, tokens, period))
    if usd_micros is not None:
        out.append(Budget(scope, id_, usd_micros, period, "usd"))
    return tuple(out)


@dataclass
class Reservation:
    budgets: Sequence[Budget]
    counters: list[str]
    amounts: list[int]
    price: Price | None


class Budgets:
    def __init__(
        self, redis: Redis, metrics: GatewayMetrics | None = None, prices: Prices | None = None
    ) -> None:
        self.redis = redis
        self.metrics = metrics
        self.prices = prices or Prices({})

    def _used(self, budget: Budget, used: int) -> None:
        if self.metrics is not None:
            gauge = self.metrics.budget_used.labels(budget.scope, budget.id, budget.unit)
            gauge.set(used / budget.limit)

    def price(self, budgets: Sequence[Budget], model: str) -> Price | None:
        """The price of `model` when a dollar budget needs one (403 when the list has none)."""
        if not any(b.unit == "usd" for b in budgets):
            return None
        price = self.prices.of(model)
        if price is None:
            raise PermissionDenied(
                f"this request counts against a budget in dollars, and the model {model[:256]!r}"
                " has no price in the gateway's list (CRUCIBLE_GATEWAY_BUDGET_PRICES): ask an "
                "admin to price it, or to set a `*` price",
                code="model_not_priced",
            )
        return price

    async def reserve(
        self, budgets: Sequence[Budget], input_tokens: int, output_tokens: int, model: str
    ) -> Reservation | None:
        """Reserve the worst case on every budget, or raise (429 past one, 503 without
        Redis, 403 for a dollar budget and a model without a price)."""
        if not budgets:
            return None
        price = self.price(budgets, model)
        amounts = [b.amount(input_tokens, output_tokens, price) for b in budgets]
        counters = [b.counter() for b in budgets]
        args: list[Any] = [len(counters), *(c[0] for c in counters)]
        for b, c, amount in zip(budgets, counters, amounts, strict=True):
            args += [amount, b.limit, c[2]]
        try:
            hit, *used = await _RESERVE(self.redis, *args)
        except (RedisReplyError, OSError, TimeoutError) as exc:
            log.warning("budgets: redis unavailable", extra={"error": type(exc).__name__})
            raise Unavailable("budgets cannot be checked now; try again shortly") from None
        if hit:
            b = budgets[hit - 1]
            self._used(b, used[0])
            if self.metrics is not None:
                self.metrics.rejections.labels("budget").inc()
            raise QuotaExceeded(
                f"this {b.scope}'s budget of {b.says(b.limit)} for {counters[hit - 1][1]} "
                f"would be passed: {b.says(used[0])} used or reserved, and this request may "
                f"use up to {b.says(amounts[hit - 1])} (its body's bytes and its output bound); "
                "lower max_tokens, or ask an admin to raise the budget"
            )
        for b, total in zip(budgets, used, strict=True):
            self._used(b, total)
        return Reservation(budgets, [c[0] for c in counters], amounts, price)

    async def settle(self, reservation: Reservation, used: tuple[int, int] | None) -> None:
        """Make the reservation what the request used, (input, output) tokens (gives back the
        difference); None keeps the worst case."""
        if used is None:
            return
        deltas = [
            b.amount(*used, reservation.price) - held
            for b, held in zip(reservation.budgets, reservation.amounts, strict=True)
        ]
        if not any(deltas):
            return
        try:
            await _SETTLE(self.redis, len(reservation.counters), *reservation.counters, *deltas)
        except (RedisReplyError, OSError, TimeoutError) as exc:
            # The counter keeps the worst case: the budget errs on the side of not overrunning.
            log.warning("budgets: not settled", extra={"error": type(exc).__name__})

    async def used(self, budget: Budget) -> int:
        """Tokens, or micro-dollars, used or reserved in the current window."""
        name, _, _ = budget.counter()
        return int(await self.redis.execute("GET", name) or 0)

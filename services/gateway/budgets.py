"""Token budgets per key and per project, per UTC day or month, that cannot be overrun.

Before a model request goes out, its worst case is reserved: the bytes of the body sent (a
prompt token is at least one byte of what the client sent; a message's JSON framing outweighs
the tokens a chat template adds to it) plus the output bound (`max_tokens` or the gateway's
cap) times the sequences asked for. One Lua script checks every budget the request counts
against and reserves on all of them, or on none, atomically in Redis: gateway processes share
the counters, so 64 concurrent requests against a budget that fits 10 admit 10. When the answer
is in, the reservation is settled to what the engine reported (a request that never reached an
engine gives it all back; one whose usage is unknown keeps its worst case). Beyond a budget the
answer is 429 `insufficient_quota`; with Redis away, 503 (a budget is never skipped).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.common.errors import QuotaExceeded, Unavailable
from services.gateway.metrics import GatewayMetrics
from services.gateway.redisio import Redis, RedisReplyError, Script

log = logging.getLogger("crucible.gateway.budgets")

PERIODS = ("day", "month")

# KEYS: the counters; ARGV[1]: tokens; ARGV[2i], ARGV[2i+1]: counter i's budget and TTL (s).
# Returns {0, total_1, ...} when reserved on all, else {i, used} for the first it would pass.
_RESERVE = Script("""
local want = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local used = tonumber(redis.call('GET', key) or '0')
  if used + want > tonumber(ARGV[2 * i]) then return {i, used} end
end
local totals = {0}
for i, key in ipairs(KEYS) do
  totals[i + 1] = redis.call('INCRBY', key, want)
  redis.call('EXPIRE', key, tonumber(ARGV[2 * i + 1]))
end
return totals
""")
# KEYS: the counters a reservation holds; ARGV[1]: what to add (negative: given back).
_SETTLE = Script("""
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, ARGV[1]) end
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
class Budget:
    """Who a budget belongs to (`key` or `project`), its id, and its tokens per period."""

    scope: str
    id: str
    tokens: int
    period: str

    def counter(self, now: float | None = None) -> tuple[str, str, int]:
        """(Redis key, window, TTL) for the current window."""
        name, ttl = window(self.period, now)
        return f"crucible:budget:{self.scope}:{self.id}:{name}", name, ttl


@dataclass
class Reservation:
    counters: list[str]
    tokens: int


class Budgets:
    def __init__(self, redis: Redis, metrics: GatewayMetrics | None = None) -> None:
        self.redis = redis
        self.metrics = metrics

    def _used(self, budget: Budget, used: int) -> None:
        if self.metrics is not None:
            self.metrics.budget_used.labels(budget.scope, budget.id).set(used / budget.tokens)

    async def reserve(self, budgets: Sequence[Budget], tokens: int) -> Reservation | None:
        """Reserve `tokens` on every budget, or raise (429 past one, 503 without Redis)."""
        if not budgets:
            return None
        counters = [b.counter() for b in budgets]
        args: list[Any] = [len(counters), *(c[0] for c in counters), tokens]
        for b, c in zip(budgets, counters, strict=True):
            args += [b.tokens, c[2]]
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
                f"this {b.scope}'s budget of {b.tokens:,} tokens for {counters[hit - 1][1]} "
                f"would be passed: {used[0]:,} used or reserved, and this request may use up "
                f"to {tokens:,} (its body's bytes and its output bound); lower max_tokens, or "
                "ask an admin to raise the budget"
            )
        for b, total in zip(budgets, used, strict=True):
            self._used(b, total)
        return Reservation([c[0] for c in counters], tokens)

    async def settle(self, reservation: Reservation, used: int) -> None:
        """Make the reservation what the request used (gives back the difference)."""
        delta = used - reservation.tokens
        if not delta:
            return
        try:
            await _SETTLE(self.redis, len(reservation.counters), *reservation.counters, delta)
        except (RedisReplyError, OSError, TimeoutError) as exc:
            # The counter keeps the worst case: the budget errs on the side of not overrunning.
            log.warning("budgets: not settled", extra={"error": type(exc).__name__})

    async def used(self, budget: Budget) -> int:
        """Tokens used or reserved in the current window."""
        name, _, _ = budget.counter()
        return int(await self.redis.execute("GET", name) or 0)

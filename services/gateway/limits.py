"""Limits, checked before anything is forwarded.

- Concurrency per key and overall: in-process counters, exact for this process, taken when a
  request's headers arrive (before its body is read); beyond them the answer is 429 at once,
  never a queue. So are the bytes of request bodies a key holds in flight.
- Requests per minute per key: reserved atomically in Redis before forwarding (GCRA in one Lua
  script, with Redis's clock), so several gateway processes share one exact budget and a burst
  cannot slip through between a check and an update. To keep a Redis round trip off most
  requests, a process takes a small lease of permits at once (about 1% of the key's budget) and
  spends it locally: permits leave the shared bucket before they are used, so the fleet never
  admits more than the budget; unspent ones lapse after a second, so at worst it admits a few
  fewer.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.common.errors import RateLimited
from services.gateway.redisio import Redis, RedisReplyError, Script

log = logging.getLogger("crucible.gateway.limits")

# A token bucket of `rpm` requests refilled at rpm/60 per second, as a Generic Cell Rate
# Algorithm: one stored number per key (the theoretical arrival time), updated atomically.
# Takes up to ARGV[2] permits at once (exactly that many or none when ARGV[3] is 1: a request
# of several sequences) and returns {granted, retry_after_ms}.
_GCRA = Script("""
local rpm = tonumber(ARGV[1])
local want = tonumber(ARGV[2])
local need = 1
if ARGV[3] == '1' then need = want end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = 60000 / rpm
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local fits = math.floor((now + 60000 - tat) / interval)
if fits < need then
  return {0, math.ceil(tat + need * interval - 60000 - now)}
end
local granted = math.min(want, fits)
local new_tat = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
return {granted, 0}
""")

# Permits a process may hold for a key: about 1% of its per-minute budget, at most 64. A key of
# under 200 rpm gets 1, i.e. one Redis round trip per request, exactly as without leasing.
LEASE_MAX = 64
# Unspent permits lapse: a lease cannot be saved up and spent later as a burst.
LEASE_TTL = 1.0


def lease_size(rpm: int) -> int:
    return max(1, min(LEASE_MAX, rpm // 100))


class _Lease:
    __slots__ = ("expires", "refilling", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self.expires = 0.0
        self.refilling = False


class Concurrency:
    def __init__(self, overall: int, key_bytes: int = 1 << 62) -> None:
        self.overall = overall
        self.total = 0
        self.per_key: dict[str, int] = {}
        self.key_bytes = key_bytes  # of request bodies one key may hold in flight
        self.bytes: dict[str, int] = {}
        self.bytes_total = 0

    def try_acquire(self, key_id: str, key_limit: int) -> str | None:
        """None when admitted, else which limit was hit ("key" or "overall")."""
        if self.total >= self.overall:
            return "overall"
        held = self.per_key.get(key_id, 0)
        if held >= key_limit:
            return "key"
        self.total += 1
        self.per_key[key_id] = held + 1
        return None

    def release(self, key_id: str) -> None:
        self.total -= 1
        left = self.per_key[key_id] - 1
        if left:
            self.per_key[key_id] = left
        else:
            del self.per_key[key_id]

    def hold(self, key_id: str, n: int) -> bool:
        """Count `n` more bytes of the key's bodies in flight, if they fit."""
        held = self.bytes.get(key_id, 0)
        if held + n > self.key_bytes:
            return False
        self.bytes[key_id] = held + n
        self.bytes_total += n
        return True

    def unhold(self, key_id: str, n: int) -> None:
        self.bytes_total -= n
        left = self.bytes[key_id] - n
        if left:
            self.bytes[key_id] = left
        else:
            del self.bytes[key_id]


class BodyBytes:
    """The bytes one request's body holds of its key's share, while the request lasts."""

    def __init__(self, concurrency: Concurrency, key_id: str) -> None:
        self.c, self.key_id, self.n = concurrency, key_id, 0

    def __call__(self, n: int) -> None:
        if not self.c.hold(self.key_id, n):
            raise RateLimited(
                f"this key's request bodies in flight would pass {self.c.key_bytes:,} bytes "
                f"({self.c.bytes.get(self.key_id, 0):,} held, {n:,} more asked)",
                retry_after=1,
            )
        self.n += n

    def release(self) -> None:
        if self.n:
            self.c.unhold(self.key_id, self.n)
            self.n = 0


class RedisUnavailable(Exception):
    pass


class RateLimiter:
    def __init__(self, url: str, *, on_error: str = "open", timeout: float = 0.25) -> None:
        self.redis = Redis(url, timeout=timeout)
        self.on_error = on_error
        self._leases: dict[str, _Lease] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._skip_until = 0.0
        self.errors = 0

    async def reserve(self, key_id: str, rpm: int, cost: int = 1) -> float:
        """Reserve `cost` permits (the sequences a request asks for; at most `rpm`) for the key,
        all or none: 0.0 if admitted, else seconds until they would be.

        Permits come from the local lease when it holds enough (no round trip), else from
        Redis. Only a single background refill per key takes permits in batches, so a process
        never holds more than 1.5 leases. Raises RedisUnavailable only in "closed" mode.
        """
        if rpm <= 0:
            return 0.0
        now = time.monotonic()
        lease = self._leases.get(key_id)
        if lease is not None and lease.tokens >= cost and now < lease.expires:
            lease.tokens -= cost
            self._maybe_refill(key_id, rpm, lease)
            return 0.0
        if now < self._skip_until:
            return self._outage()
        try:
            granted, retry_ms = await self._gcra(f"crucible:rpm:{key_id}", rpm, cost, cost > 1)
        except (RedisReplyError, OSError, TimeoutError) as exc:
            return self._redis_failed(exc, now)
        if not granted:
            return max(retry_ms / 1000, 0.001)
        if lease_size(rpm) > 1:
            self._maybe_refill(key_id, rpm, self._leases.setdefault(key_id, _Lease()))
        return 0.0

    def _maybe_refill(self, key_id: str, rpm: int, lease: _Lease) -> None:
        size = lease_size(rpm)
        if size > 1 and lease.tokens <= size // 2 and not lease.refilling:
            lease.refilling = True
            task = asyncio.create_task(self._refill(key_id, rpm, lease, size))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _refill(self, key_id: str, rpm: int, lease: _Lease, size: int) -> None:
        try:
            granted, _ = await self._gcra(f"crucible:rpm:{key_id}", rpm, size)
            if granted:
                now = time.monotonic()
                if now >= lease.expires:
                    lease.tokens = 0  # the old permits have lapsed
                lease.tokens += granted
                lease.expires = now + LEASE_TTL
        except (RedisReplyError, OSError, TimeoutError):
            pass  # the next request without a permit goes to Redis itself and sees the error
        finally:
            lease.refilling = False

    def _redis_failed(self, exc: BaseException, now: float) -> float:
        # Don't pay a timeout on every request while Redis is down: retry it in a second.
        self._skip_until = now + 1.0
        self.errors += 1
        # Redis's own words say why (NOAUTH, WRONGPASS, a bad database); they hold no secret.
        why = str(exc)[:200] if isinstance(exc, RedisReplyError) else type(exc).__name__
        log.warning("rate limiter: redis unavailable", extra={"error": why})
        return self._outage()

    async def _gcra(self, key: str, rpm: int, want: int, exact: bool = False) -> list[int]:
        reply: list[int] = await _GCRA(self.redis, 1, key, rpm, want, int(exact))
        return reply

    def _outage(self) -> float:
        if self.on_error == "closed":
            raise RedisUnavailable("rate limiter unavailable")
        return 0.0

    async def ping(self) -> None:
        await self.redis.execute("PING")

    async def aclose(self) -> None:
        await self.redis.aclose()

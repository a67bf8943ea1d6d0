"""Limits, checked before anything is forwarded.

- Concurrency per key and overall: in-process counters, exact for this process; beyond them the
  answer is 429 at once, never a queue.
- Requests per minute per key: reserved atomically in Redis before forwarding (GCRA in one Lua
  script, with Redis's clock), so several gateway processes share one exact budget and a burst
  cannot slip through between a check and an update.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("crucible.gateway.limits")

# A token bucket of `rpm` requests refilled at rpm/60 per second, as a Generic Cell Rate
# Algorithm: one stored number per key (the theoretical arrival time), updated atomically.
_GCRA = """
local rpm = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = 60000 / rpm
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - 60000
if allow_at > now then
  return {0, math.ceil(allow_at - now)}
end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
return {1, 0}
"""


class Concurrency:
    def __init__(self, overall: int) -> None:
        self.overall = overall
        self.total = 0
        self.per_key: defaultdict[str, int] = defaultdict(int)

    def try_acquire(self, key_id: str, key_limit: int) -> str | None:
        """None when admitted, else which limit was hit ("key" or "overall")."""
        if self.total >= self.overall:
            return "overall"
        if self.per_key[key_id] >= key_limit:
            return "key"
        self.total += 1
        self.per_key[key_id] += 1
        return None

    def release(self, key_id: str) -> None:
        self.total -= 1
        left = self.per_key[key_id] - 1
        if left:
            self.per_key[key_id] = left
        else:
            del self.per_key[key_id]


class RedisUnavailable(Exception):
    pass


class RateLimiter:
    def __init__(self, url: str, *, on_error: str = "open", timeout: float = 0.25) -> None:
        self.redis = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.script = self.redis.register_script(_GCRA)
        self.on_error = on_error
        self._skip_until = 0.0
        self.errors = 0

    async def reserve(self, key_id: str, rpm: int) -> float:
        """Reserve one request for the key: 0.0 if admitted, else seconds until it would be.

        Raises RedisUnavailable only in "closed" mode; in "open" mode an outage admits.
        """
        if rpm <= 0:
            return 0.0
        now = time.monotonic()
        if now < self._skip_until:
            return self._outage()
        try:
            allowed, retry_ms = await self.script(keys=[f"crucible:rpm:{key_id}"], args=[rpm])
        except (RedisError, OSError) as exc:
            # Don't pay a timeout on every request while Redis is down: retry it in a second.
            self._skip_until = now + 1.0
            self.errors += 1
            log.warning("rate limiter: redis unavailable", extra={"error": type(exc).__name__})
            return self._outage()
        return 0.0 if allowed else max(retry_ms / 1000, 0.001)

    def _outage(self) -> float:
        if self.on_error == "closed":
            raise RedisUnavailable("rate limiter unavailable")
        return 0.0

    async def ping(self) -> None:
        await self.redis.ping()

    async def aclose(self) -> None:
        await self.redis.aclose()

"""A minimal pipelined Redis client for the rate limiter's one command per request.

redis-py's asyncio client spent about a third of the gateway's per-request CPU (connection
checkout, health checks, command packing). This keeps one connection, writes each command at
once, and matches replies to callers in order (Redis answers in order), parsed by hiredis in C.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis


class RedisReplyError(Exception):
    """Redis answered with an error (e.g. NOSCRIPT)."""


class RedisSetupError(RedisReplyError):
    """AUTH or SELECT was refused on a new connection: a setting to fix, not an outage."""


def _pack(*args: bytes | str | int) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=RedisReplyError)
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError("redis connection lost"))


class Redis:
    def __init__(self, url: str, *, timeout: float = 0.25) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.db = int(parts.path.lstrip("/") or 0)
        # redis://[user[:password]@]host: a password alone, or an ACL user and its password.
        self.username = unquote(parts.username) if parts.username and parts.password else None
        self.password = unquote(parts.password or parts.username or "") or None
        self.timeout = timeout
        self._conn: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> _Protocol:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._connecting = self._connecting or asyncio.Lock()
        async with self._connecting:
            if self._conn is None or self._conn.closed:
                loop = asyncio.get_running_loop()
                _, proto = await loop.create_connection(_Protocol, self.host, self.port)
                try:
                    await self._setup(proto)
                except BaseException:
                    assert proto.transport is not None
                    proto.transport.close()
                    raise
                self._conn = proto
        return self._conn

    async def _setup(self, proto: _Protocol) -> None:
        """AUTH and SELECT, each checked: a refused one must not leave a connection that
        answers NOAUTH (or writes to database 0) to every later command."""
        if self.password:
            user = [self.username] if self.username else []
            reply = await self._send(proto, "AUTH", *user, self.password)
            if isinstance(reply, RedisReplyError):
                raise RedisSetupError(f"redis AUTH failed: {reply}")  # Redis never echoes it
        if self.db:
            reply = await self._send(proto, "SELECT", self.db)
            if isinstance(reply, RedisReplyError):
                raise RedisSetupError(f"redis SELECT {self.db} failed: {reply}")

    async def _send(self, proto: _Protocol, *args: bytes | str | int) -> Any:
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        proto.waiters.append(waiter)
        assert proto.transport is not None
        proto.transport.write(_pack(*args))
        return await waiter

    async def execute(self, *args: bytes | str | int) -> Any:
        """One command; raises OSError/TimeoutError when Redis is unreachable or slow."""
        async with asyncio.timeout(self.timeout):
            proto = await self._connection()
            try:
                reply = await self._send(proto, *args)
            except BaseException:
                # A reply may still arrive for this command: replies are matched in order, so
                # the connection can no longer be trusted. Drop it.
                if proto.transport:
                    proto.transport.close()
                raise
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def aclose(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            with contextlib.suppress(Exception):
                self._conn.transport.close()


class Script:
    """A Lua script run by its SHA-1 (EVALSHA), loaded with EVAL the first time a Redis (or a
    restarted one) does not know it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 (Redis's naming)

    async def __call__(self, redis: Redis, *args: bytes | str | int) -> Any:
        try:
            return await redis.execute("EVALSHA", self.sha, *args)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await redis.execute("EVAL", self.source, *args)

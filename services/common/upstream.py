"""A lean HTTP/1.1 client for hot paths (the gateway, the agent): asyncio protocol + httptools.

httpx costs a few hundred microseconds a request in pure Python; the gateway's budget for all its
work is one millisecond. This client does only what forwarding needs: one request per pooled
keep-alive connection, the body relayed chunk by chunk as it arrives (chunked or content-length),
and clean failure: a connection that saw an error is closed, never reused.

What it promises (tests/integration/test_upstream_client.py, against raw sockets):
- a request whose bytes were written is sent again only if its method is idempotent;
- a stream that stays silent longer than its idle timeout fails, instead of holding a slot;
- at most `max_open` exchanges per backend; past that a request waits, then is `UpstreamBusy`;
- HEAD is answered from the headers alone; a body framed by closing the connection is refused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

# Uvicorn (vLLM's server) closes idle keep-alive connections after 5 s: retire ours sooner, so a
# request never races the server's close.
IDLE_TTL = 4.0
# Pause reading from the upstream when this much body is buffered and the client is slow.
HIGH_WATER = 1 << 20


class UpstreamConnectError(Exception):
    """Could not connect: the backend is down (safe to fail over: nothing was sent)."""


class UpstreamProtocolError(Exception):
    """The connection broke or the upstream sent something that is not HTTP."""


class UpstreamBusy(Exception):
    """Every connection the pool may open to this backend is in use (it is up, but saturated)."""


# Methods a server must treat the same when repeated (RFC 9110 9.2.2): only these are sent again
# after their bytes went out on a connection that then turned out closed.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})


class _Connection(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = time.monotonic()
        self.reused = False
        self.expect_body = True
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.headers_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # The reader's future while it waits for body bytes (None while it is not waiting): one
        # future per wait, resolved by the next callback, instead of an Event's set/clear.
        self.waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.got_bytes = False
        self.last_data = 0.0  # time.monotonic() of the last bytes read
        self.paused = False
        # Set while Response.relay runs: body bytes go to it from data_received, not to `chunks`.
        self.sink: Callable[[bytes], bool] | None = None

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.last_data = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"malformed response from upstream: {exc}"))
        if self.sink is not None and self.chunks:
            self._to_sink(self.sink)

    def _take(self) -> bytes:
        """Everything read and not yet taken, in one piece."""
        chunks = self.chunks
        self.chunks = []
        self.buffered = 0
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _to_sink(self, sink: Callable[[bytes], bool]) -> None:
        """Everything read so far to the sink; a full sink pauses reading."""
        if not sink(self._take()) and not self.paused:
            self.paused = True
            if self.transport:
                self.transport.pause_reading()
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.discard(self)
        if not self.complete:
            self._fail(UpstreamProtocolError("upstream closed the connection"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if not self.expect_body:
            # A HEAD's response has a content-length but no body: it ends here. The parser
            # cannot be told so, hence the connection is not reused after it.
            self.complete, self.keep_alive = True, False
            self._wake()
        elif not _framed(self.status, self.headers):
            self._fail(UpstreamProtocolError("upstream sent a body without a length or chunks"))
            return
        if not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        if self.sink is not None:
            return  # data_received hands what this read brought to the sink, once
        self.buffered += len(body)
        self._wake()
        if self.buffered > HIGH_WATER and self.transport and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        # Only valid inside the parser's callbacks: after this the parser resets for the next
        # message and reports False.
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True
        self._wake()

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        if not self.headers_done.done():
            self.headers_done.set_exception(exc)
            self.headers_done.exception()  # mark retrieved: the caller may already be gone
        self._wake()
        if self.transport:
            self.transport.close()

    def close(self) -> None:
        if self.transport:
            self.transport.close()


def _framed(status: int, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the body's end is known without the connection closing (HTTP/1.1 framing)."""
    if status < 200 or status in (204, 304):
        return True
    names = {k for k, _ in headers}
    return b"content-length" in names or b"transfer-encoding" in names


class Response:
    """An upstream response whose headers have arrived; the body is read or streamed after."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self._released = False
        self.on_release: Callable[[], None] | None = None

    async def iter_chunks(self, idle_timeout: float | None = None) -> AsyncGenerator[bytes, None]:
        """The body as it arrives, everything buffered since the last step in one piece (a
        relay then writes once per wake-up, not once per upstream chunk); with `idle_timeout`,
        a silence that long while waiting breaks the exchange (UpstreamProtocolError), whatever
        the overall deadline."""
        conn = self._conn
        loop = asyncio.get_running_loop()
        watchdog = _IdleWatchdog(self, loop, idle_timeout) if idle_timeout is not None else None
        try:
            while True:
                if conn.chunks:
                    data = conn._take()
                    if conn.paused and conn.transport:
                        conn.paused = False
                        conn.transport.resume_reading()
                    yield data
                elif self._ended():
                    return
                else:
                    await self._wait(loop, watchdog)
        finally:
            if watchdog is not None:
                watchdog.cancel()

    def _ended(self) -> bool:
        """True (and released) at the body's end; raises (released) if the exchange broke."""
        conn = self._conn
        if conn.complete:
            self.release()
            return True
        if conn.error is not None:
            self.release()
            raise conn.error
        return False

    async def _wait(self, loop: asyncio.AbstractEventLoop, watchdog: _IdleWatchdog | None) -> None:
        """Until the connection's next callback (bytes, the end, or a failure)."""
        self._conn.waiter = waiter = loop.create_future()
        if watchdog is not None:
            watchdog.waiting_since = time.monotonic()
        await waiter

    async def relay(
        self,
        sink: Callable[[bytes], bool],
        drain: Callable[[], Awaitable[object]],
        idle_timeout: float | None = None,
    ) -> None:
        """The body into `sink` as it arrives, called from the connection's own read callback:
        no task wakes up for a chunk, which is most of a streamed token's cost in `iter_chunks`.
        Each call gets everything one read brought. `sink` returns False when its reader is
        full: reading from the upstream pauses until `drain()` returns. Returns at the body's
        end; raises UpstreamProtocolError when the exchange breaks or stays silent for
        `idle_timeout` seconds."""
        conn = self._conn
        loop = asyncio.get_running_loop()
        watchdog = _IdleWatchdog(self, loop, idle_timeout) if idle_timeout is not None else None
        conn.sink = sink
        try:
            if conn.chunks:
                conn._to_sink(sink)
            while True:
                if conn.paused:
                    await drain()
                    conn.paused = False
                    if conn.transport:
                        conn.transport.resume_reading()
                elif self._ended():
                    return
                else:
                    await self._wait(loop, watchdog)
        finally:
            conn.sink = None
            if watchdog is not None:
                watchdog.cancel()

    async def read(self) -> bytes:
        return b"".join([c async for c in self.iter_chunks()])

    def release(self) -> None:
        """Back to the pool if the exchange completed cleanly, else closed."""
        if self._released:
            return
        self._released = True
        if self.on_release is not None:
            self.on_release()
        conn = self._conn
        conn.pool.slots.release()
        if conn.complete and conn.error is None and conn.keep_alive:
            self._conn.pool.put_back(conn)
        else:
            conn.close()


class _IdleWatchdog:
    """Fails an exchange whose reader has waited `limit` seconds with no bytes read. One timer
    per `limit` (re-armed for what is left when it fires early), not one per chunk: arming and
    cancelling a timer for every token was a measurable share of a streamed token's cost."""

    def __init__(self, resp: Response, loop: asyncio.AbstractEventLoop, limit: float) -> None:
        self.resp, self.loop, self.limit = resp, loop, limit
        self.waiting_since = time.monotonic()
        self.handle = loop.call_later(limit, self.check)

    def check(self) -> None:
        if self.resp._released:  # the exchange is over (its reader may never have closed us)
            return
        conn = self.resp._conn
        waiting = conn.waiter is not None
        quiet = time.monotonic() - max(self.waiting_since, conn.last_data)
        if waiting and quiet >= self.limit:
            conn._fail(UpstreamProtocolError(f"upstream sent nothing for {self.limit:g}s"))
            return
        self.handle = self.loop.call_later(
            self.limit - quiet if waiting else self.limit, self.check
        )

    def cancel(self) -> None:
        self.handle.cancel()


class Pool:
    """Keep-alive connections to one backend (scheme http, host, port)."""

    def __init__(self, base_url: str, *, max_idle: int = 128, max_open: int = 1024) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"backend URL must be http://host:port, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.host_header = f"{self.host}:{self.port}".encode()
        self.idle: collections.deque[_Connection] = collections.deque()
        self.max_idle = max_idle
        self.open: set[_Connection] = set()
        # One exchange per connection: this bounds both (held until the response is released).
        self.slots = asyncio.Semaphore(max_open)

    async def _connect(self, limit: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port
                )
        except (OSError, TimeoutError) as exc:
            raise UpstreamConnectError(f"cannot connect to {self.base_url}: {exc}") from None
        self.open.add(conn)
        return conn

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()  # most recent first: least likely to be closed by the server
            if (
                now - conn.idle_since < IDLE_TTL
                and conn.transport
                and not conn.transport.is_closing()
            ):
                conn.reused = True
                return conn
            conn.close()
        return None

    def put_back(self, conn: _Connection) -> None:
        if len(self.idle) >= self.max_idle or conn.transport is None or conn.transport.is_closing():
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def discard(self, conn: _Connection) -> None:
        self.open.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    async def request(
        self,
        method: bytes,
        path: bytes,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        *,
        connect_timeout: float,
    ) -> Response:
        """Send one request and wait for the response headers. Raises UpstreamConnectError when
        nothing could be sent, UpstreamProtocolError when the exchange broke."""
        head = [
            method,
            b" ",
            path,
            b" HTTP/1.1\r\nhost: ",
            self.host_header,
            b"\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\n",
        ]
        for name, value in headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        payload = b"".join(head) + body
        if self.slots.locked():  # full: wait for a slot, as long as a connect may take
            try:
                async with asyncio.timeout(connect_timeout):
                    await self.slots.acquire()
            except TimeoutError:
                raise UpstreamBusy(f"all connections to {self.base_url} are busy") from None
        else:
            await self.slots.acquire()  # free: returns at once, no timer on the hot path
        try:
            return await self._send(method, payload, connect_timeout)
        except BaseException:
            self.slots.release()  # a returned Response releases it instead
            raise

    async def _send(self, method: bytes, payload: bytes, connect_timeout: float) -> Response:
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, method, payload)
            except UpstreamProtocolError:
                # A reused connection the server had closed, before any byte of a response.
                # The server may still have read the request, so only an idempotent one is
                # sent again (a POST could start a second generation or job).
                if conn.got_bytes or method not in IDEMPOTENT:
                    raise
        return await self._exchange(await self._connect(connect_timeout), method, payload)

    async def _exchange(self, conn: _Connection, method: bytes, payload: bytes) -> Response:
        conn._reset()
        conn.expect_body = method != b"HEAD"
        assert conn.transport is not None
        conn.transport.write(payload)
        try:
            await conn.headers_done
        except BaseException:
            conn.close()
            raise
        return Response(conn)

    async def aclose(self) -> None:
        for conn in list(self.open):
            conn.close()
        self.idle.clear()

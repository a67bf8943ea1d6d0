"""The hot path's HTTP/1.1 client (`services/common/upstream.py`) against raw sockets that send
exactly the bytes each case needs: split headers, chunk extensions, a closed keep-alive
connection, garbage, silence, a saturated pool, HEAD, and a body framed by closing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from services.common.upstream import (
    Pool,
    UpstreamBusy,
    UpstreamProtocolError,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, list[bytes]], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body (our client always sends content-length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


def run(
    handler: Handler, scenario: Callable[[Pool, list[bytes]], Awaitable[Any]], **pool: Any
) -> Any:
    """Serve `handler` on a free loopback port and run `scenario` against a pool to it."""

    async def main() -> Any:
        seen: list[bytes] = []

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await handler(r, w, seen)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = Pool(f"http://127.0.0.1:{port}", **pool)
        try:
            return await asyncio.wait_for(scenario(client, seen), 10)
        finally:
            await client.aclose()
            server.close()

    return asyncio.run(main())


async def get(pool: Pool, method: bytes = b"GET", path: bytes = b"/") -> tuple[int, bytes]:
    resp = await pool.request(method, path, b"", [], connect_timeout=1.0)
    try:
        return resp.status, await resp.read()
    finally:
        resp.release()


def test_headers_and_body_split_into_single_bytes_are_read_whole() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        await read_request(r)
        for i in range(len(OK)):
            w.write(OK[i : i + 1])
            await w.drain()
            await asyncio.sleep(0)

    assert run(handler, lambda pool, _: get(pool)) == (200, b"hello")


def test_chunks_with_extensions_and_trailers_are_decoded() -> None:
    body = b"5;name=value\r\nhello\r\n6;x\r\n world\r\n0\r\ntrailer: yes\r\n\r\n"

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body)
        await w.drain()

    assert run(handler, lambda pool, _: get(pool)) == (200, b"hello world")


def _closes_its_first_connection_after_one_answer() -> tuple[Handler, list[int]]:
    """Connection 1 answers one request keep-alive, reads the next and closes unanswered (a
    server that timed the connection out); later connections answer. Counts connections."""
    connections: list[int] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        connections.append(len(connections) + 1)
        seen.append(await read_request(r))
        w.write(OK)
        await w.drain()
        if connections[-1] == 1:
            seen.append(await read_request(r))  # read: it may have been acted on

    return handler, connections


@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_a_closed_reused_connection_resends_only_an_idempotent_request(method: bytes) -> None:
    handler, connections = _closes_its_first_connection_after_one_answer()

    async def scenario(pool: Pool, seen: list[bytes]) -> tuple[Any, int]:
        assert await get(pool, method) == (200, b"hello")
        try:
            return await get(pool, method), len(seen)
        except UpstreamProtocolError as exc:
            return exc, len(seen)

    outcome, received = run(handler, scenario)
    if method == b"GET":  # sent again on a new connection: the user never sees the close
        assert outcome == (200, b"hello") and received == 3 and len(connections) == 2
    else:  # it reached the server once; sending it again could run it twice
        assert isinstance(outcome, UpstreamProtocolError)
        assert received == 2 and len(connections) == 1


def test_garbage_is_a_protocol_error_and_the_connection_is_not_kept() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        await read_request(r)
        w.write(b"SMTP READY\r\n\r\n\x00\x01garbage")
        await w.drain()
        await asyncio.Event().wait()  # then silent, until the client gives up

    async def scenario(pool: Pool, _: list[bytes]) -> int:
        with pytest.raises(UpstreamProtocolError, match="malformed"):
            await get(pool)
        return len(pool.idle)

    assert run(handler, scenario) == 0


def test_a_silent_stream_fails_after_its_idle_timeout_not_its_deadline() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await w.drain()
        await asyncio.Event().wait()  # then nothing

    async def scenario(pool: Pool, _: list[bytes]) -> tuple[list[bytes], float]:
        resp = await pool.request(b"POST", b"/s", b"{}", [], connect_timeout=1.0)
        got: list[bytes] = []
        start = time.monotonic()
        with pytest.raises(UpstreamProtocolError, match=r"sent nothing for 0\.3s"):
            async for chunk in resp.iter_chunks(idle_timeout=0.3):
                got.append(chunk)
        return got, time.monotonic() - start

    got, waited = run(handler, scenario)
    assert got == [b"first"] and 0.3 <= waited < 2


def test_a_full_pool_makes_the_next_request_wait_then_busy() -> None:
    release = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        while True:
            seen.append(await read_request(r))
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            await w.drain()
            await release.wait()
            w.write(b"2\r\nok\r\n0\r\n\r\n")
            await w.drain()

    async def scenario(pool: Pool, seen: list[bytes]) -> tuple[int, bytes]:
        held = await pool.request(b"GET", b"/a", b"", [], connect_timeout=0.2)
        start = time.monotonic()
        with pytest.raises(UpstreamBusy):
            await pool.request(b"GET", b"/b", b"", [], connect_timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 1 and len(seen) == 1  # never sent
        waiting = asyncio.create_task(get(pool, path=b"/c"))  # blocks until `held` is released
        release.set()
        assert await held.read() == b"ok"
        held.release()  # its slot goes to the request that waited
        return await waiting

    assert run(handler, scenario, max_open=1) == (200, b"ok")


def test_head_ends_at_the_headers_and_a_close_framed_body_is_refused() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        request = await read_request(r)
        if request.startswith(b"HEAD"):
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")  # no body follows
            await w.drain()
            await asyncio.Event().wait()  # no body follows
        else:
            w.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
            await w.drain()

    async def scenario(pool: Pool, _: list[bytes]) -> tuple[int, bytes]:
        head = await get(pool, b"HEAD")
        with pytest.raises(UpstreamProtocolError, match="without a length"):
            await get(pool, b"GET")
        return head

    assert run(handler, scenario) == (200, b"")


CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def no_drain() -> None:
    raise AssertionError("the sink never said it was full")


def collect(into: list[bytes]) -> Callable[[bytes], bool]:
    """A sink that keeps what it is given and is never full."""

    def sink(data: bytes) -> bool:
        into.append(data)
        return True

    return sink


def test_relay_hands_every_byte_to_the_sink_in_order_and_keeps_the_connection() -> None:
    events = [b"data: %d\n\n" % i for i in range(200)]

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        for _ in range(2):
            await read_request(r)
            w.write(CHUNKED)
            for i, event in enumerate(events):
                w.write(chunk(event))
                if i % 7 == 0:  # some reads bring one event, some several
                    await w.drain()
                    await asyncio.sleep(0.001)
            w.write(b"0\r\n\r\n")
            await w.drain()
            seen.append(b"served")

    async def scenario(pool: Pool, seen: list[bytes]) -> tuple[list[bytes], int]:
        writes: list[bytes] = []
        for _ in range(2):
            resp = await pool.request(b"POST", b"/s", b"{}", [], connect_timeout=1.0)
            await resp.relay(collect(writes), no_drain, idle_timeout=5)
        return writes, len(pool.open)

    writes, connections = run(handler, scenario)
    assert b"".join(writes) == b"".join(events) * 2
    assert len(writes) < 2 * len(events)  # what one read brings is one write
    assert connections == 1  # the keep-alive connection was reused for the second exchange


def test_a_full_sink_waits_for_its_drain_longer_than_the_idle_timeout_and_loses_nothing() -> None:
    big = [b"x" * 1000 + b"%06d" % i for i in range(3000)]  # ~3 MB, beyond any socket buffer

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        await read_request(r)
        w.write(CHUNKED)
        for part in big:
            w.write(chunk(part))
            await w.drain()
        w.write(b"0\r\n\r\n")
        await w.drain()

    async def scenario(pool: Pool, _: list[bytes]) -> tuple[bytes, int]:
        got: list[bytes] = []
        drains = 0

        def sink(data: bytes) -> bool:
            got.append(data)
            return len(got) % 3 != 0  # "full" now and then

        async def drain() -> None:
            nonlocal drains
            drains += 1
            # A slow client, slower than the idle timeout: this wait is not upstream silence.
            await asyncio.sleep(0.4 if drains < 3 else 0)

        resp = await pool.request(b"POST", b"/s", b"{}", [], connect_timeout=1.0)
        await resp.relay(sink, drain, idle_timeout=0.3)
        return b"".join(got), drains

    body, drains = run(handler, scenario)
    assert body == b"".join(big) and drains > 0


def test_a_silent_relay_fails_after_its_idle_timeout() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        await read_request(r)
        w.write(CHUNKED + chunk(b"first"))
        await w.drain()
        await asyncio.sleep(0.2)
        w.write(chunk(b"second"))  # within the limit: the clock starts again
        await w.drain()
        await asyncio.Event().wait()  # then nothing

    async def scenario(pool: Pool, _: list[bytes]) -> tuple[list[bytes], float, int]:
        resp = await pool.request(b"POST", b"/s", b"{}", [], connect_timeout=1.0)
        got: list[bytes] = []
        start = time.monotonic()
        with pytest.raises(UpstreamProtocolError, match=r"sent nothing for 0\.3s"):
            await resp.relay(collect(got), no_drain, idle_timeout=0.3)
        return got, time.monotonic() - start, len(pool.idle)

    got, waited, idle = run(handler, scenario)
    assert got == [b"first", b"second"] and 0.5 <= waited < 2
    assert idle == 0  # a broken exchange's connection is closed, never reused

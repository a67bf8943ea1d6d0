"""A byte pipe on uvloop: each accepted connection is joined to one new connection to the
upstream, and whatever one side reads is written to the other. No HTTP, no keys, no parsing,
no flow control.

It is not a gateway; it is the floor for one. bench/streaming.py runs it as `tcp-pipe`: its CPU
per streamed token is what any relay on this event loop pays for the reads, writes and wake-ups
alone, so a gateway's figure is read against it.

    python bench/tcp_pipe.py --port 9400 --upstream-port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import cast

import uvloop


class _Side(asyncio.Protocol):
    def __init__(self, peer: _Side | None = None) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []  # read before the other side was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class _Client(_Side):
    def __init__(self, upstream_port: int) -> None:
        super().__init__()
        self.upstream_port = upstream_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.opening = asyncio.ensure_future(self._open())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(
            lambda: _Side(self), "127.0.0.1", self.upstream_port
        )
        self.peer = upstream
        assert upstream.transport is not None
        for data in self.early:  # the request's first bytes may come before the upstream is up
            upstream.transport.write(data)
        self.early.clear()


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(upstream_port), "127.0.0.1", port)
    await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream-port", type=int, required=True)
    args = p.parse_args()
    uvloop.run(serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()

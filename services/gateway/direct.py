"""Relaying a stream's body straight into uvicorn's transport (the gateway's `direct` stream
relay), without an ASGI send per read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.types import Send

from services.gateway.bodies import ClientGone


class DirectClient:
    """The client's side of uvicorn's httptools protocol, for relaying a stream's body without
    an ASGI send per read. It writes what uvicorn's `send` would write for a body message with
    `more_body` (one chunk of chunked encoding) to the same transport, and keeps uvicorn's own
    flow control: a full socket pauses the upstream until uvicorn says it drained. The response
    start and end still go through `send`, so uvicorn's state stays true."""

    def __init__(self, cycle: Any) -> None:
        self.transport = cycle.transport
        self.flow = cycle.flow

    def sink(self, see: Callable[[bytes], bytes]) -> Callable[[bytes], bool]:
        """What the relay calls with each read: what `see` makes of it goes to the client."""
        transport, flow = self.transport, self.flow

        def write(data: bytes) -> bool:
            data = see(data)
            if transport.is_closing():
                return False  # gone: drain_or_gone ends the relay
            if data:  # a chunk of length 0 would end the chunked body
                transport.write(b"%x\r\n%b\r\n" % (len(data), data))
            return not flow.write_paused

        return write

    async def drain_or_gone(self) -> None:
        if self.transport.is_closing():
            raise ClientGone
        await self.flow.drain()


def direct_client(send: Send) -> DirectClient | None:
    """The uvicorn httptools cycle behind `send`, if that is what it is and its response is
    chunked (the only framing this relay writes); else None, and the ASGI path is used."""
    cycle = getattr(send, "__self__", None)
    if (
        type(cycle).__module__ == "uvicorn.protocols.http.httptools_impl"
        and getattr(cycle, "chunked_encoding", None) is True
        and hasattr(cycle, "transport")
        and hasattr(cycle, "flow")
    ):
        return DirectClient(cycle)
    return None

"""The outbox: records a hot path hands off, delivered at least once to the service that keeps them.

Producer (the gateway): `Outbox.put` appends to an in-memory buffer, with no I/O and no encoding
on the request path; a background task writes batches to a Redis stream. Redis runs with AOF, so
what it acknowledged survives a restart of the gateway (or of Redis). Bounded twice: the buffer
(Redis unreachable) and the stream (the keeping service away); a record that does not fit is
dropped, counted in `crucible_outbox_dropped_total{stream,reason}` and logged.

Consumer (the keeping service): `Consumer` reads the stream in a consumer group and acknowledges
(and deletes) a batch only after its handler returned, so a crash anywhere redelivers. Records
carry ids the handler stores idempotently: at-least-once delivery, effectively exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("crucible.outbox")

# The streams: the gateway writes them, the finetune service keeps them.
CAPTURES = "crucible:captures"  # stored completions and responses (finetune/captures.py)
ALIAS_OUTCOMES = "crucible:alias-outcomes"  # each aliased request's outcome (finetune/aliases.py)
USAGE = "crucible:usage"  # each served request's tokens (finetune/usage.py)
# A service's answer names what it used in this header (JSON: model, input_tokens): the gateway,
# which knows the key and its project, records it (never relayed to the client).
USAGE_HEADER = "x-crucible-usage"

Fields = dict[bytes, bytes]
"""One record as the stream holds it: field name → value (binary-safe)."""


class _Metrics:
    """The outbox metrics of one registry, shared by its outboxes (labelled by stream)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sent = Counter(
            "crucible_outbox_sent_total",
            "Records written to their outbox stream (Redis acknowledged them).",
            ["stream"],
            registry=registry,
        )
        self.dropped = Counter(
            "crucible_outbox_dropped_total",
            "Records dropped: the buffer was full (Redis away) or the stream was full (its "
            "consumer away).",
            ["stream", "reason"],
            registry=registry,
        )
        self.buffered = Gauge(
            "crucible_outbox_buffered",
            "Records waiting in this process for Redis.",
            ["stream"],
            registry=registry,
        )


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()


def _metrics(registry: CollectorRegistry) -> _Metrics:
    found = _BY_REGISTRY.get(registry)
    if found is None:
        found = _BY_REGISTRY[registry] = _Metrics(registry)
    return found


class Outbox:
    """The producer. `put` is all the request path does; `run` is the background sender."""

    def __init__(
        self,
        redis_client: Any,  # services.gateway.redisio.Redis: execute(*args) -> reply
        stream: str,
        registry: CollectorRegistry,
        *,
        buffer: int = 10_000,
        max_len: int = 100_000,
        batch: int = 128,
    ) -> None:
        self.redis = redis_client
        self.stream = stream
        self.buffer = buffer
        self.max_len = max_len
        self.batch = batch
        self._items: collections.deque[tuple[dict[str, Any], bytes, bytes]] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_drop_log = 0.0
        metrics = _metrics(registry)
        self.sent = metrics.sent.labels(stream)
        self.dropped = metrics.dropped
        metrics.buffered.labels(stream).set_function(lambda: len(self._items))

    def put(self, meta: dict[str, Any], request: bytes, response: bytes) -> None:
        """Hand a record off (never blocks, never raises)."""
        if len(self._items) >= self.buffer:
            self._drop("buffer_full", 1)
            return
        self._items.append((meta, request, response))
        if not self._wake.is_set():
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def aclose(self, timeout: float) -> None:  # noqa: ASYNC109 (a shutdown budget)
        """Stop sending in the background; send what is buffered within `timeout` seconds."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(TimeoutError, OSError, RuntimeError):
            async with asyncio.timeout(timeout):
                while self._items:
                    await self._send_next()
        if self._items:
            self._drop("shutdown", len(self._items))

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self._items:
                self._wake.clear()
                await self._wake.wait()
            try:
                await self._send_next()
                failures = 0
            except (OSError, TimeoutError, RuntimeError) as exc:
                failures += 1
                log.warning("outbox: redis unavailable", extra={"error": str(exc)[:200]})
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))

    async def _send_next(self) -> None:
        """Send the oldest batch; if that fails (or is cancelled), it stays first in line, as
        far as the buffer's bound allows. A batch sent in part is sent again in whole: the
        consumer keeps each record once."""
        batch = [self._items.popleft() for _ in range(min(self.batch, len(self._items)))]
        try:
            await self._send(batch)
        except BaseException:
            room = self.buffer - len(self._items)
            if room < len(batch):
                self._drop("buffer_full", len(batch) - room)
                batch = batch[: max(room, 0)]
            self._items.extendleft(reversed(batch))
            raise

    async def _send(self, batch: list[tuple[dict[str, Any], bytes, bytes]]) -> None:
        length = int(await self.redis.execute("XLEN", self.stream))
        room = max(self.max_len - length, 0)
        if room < len(batch):
            self._drop("stream_full", len(batch) - room)
            batch = batch[:room]
        if not batch:
            return
        await asyncio.gather(
            *(
                self.redis.execute(
                    "XADD", self.stream, "*", "meta", orjson.dumps(m), "request", q, "response", r
                )
                for m, q, r in batch
            )
        )
        self.sent.inc(len(batch))

    def _drop(self, reason: str, n: int) -> None:
        self.dropped.labels(self.stream, reason).inc(n)
        now = time.monotonic()
        if now - self._last_drop_log > 10:  # a flood of drops must not flood the log
            self._last_drop_log = now
            log.warning(
                "outbox: records dropped",
                extra={"stream": self.stream, "reason": reason, "count": n},
            )


class Consumer:
    """Reads a stream in a consumer group on a thread; `handle` gets each batch and must store it
    idempotently. A batch is acknowledged and deleted only after `handle` returned; a handler
    that raises (its database away) gets the same batch again after a pause."""

    def __init__(
        self,
        url: str,
        stream: str,
        group: str,
        handle: Callable[[Sequence[Fields]], object],
        *,
        batch: int = 200,
        claim_idle_s: float = 30.0,
    ) -> None:
        import redis  # the consumer's side only (the gateway's image does not carry redis-py)

        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=2)
        self.stream, self.group, self.handle = stream, group, handle
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self.batch = batch
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"outbox-{self.stream}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.redis.close()

    def _run(self) -> None:
        pause = 0.5
        while not self._stop.is_set():
            try:
                self._ensure_group()
                # Our own unacknowledged entries first (a handler failed), then those a consumer
                # that died left (idle past claim_idle_s), then new ones.
                while not self._stop.is_set():
                    if self._deliver(self._read("0")) or self._deliver(self._claim()):
                        continue
                    self._deliver(self._read(">", block_ms=1000))
                    pause = 0.5
            except Exception:  # Redis or the handler's database away: same batch, after a pause
                log.warning("outbox consumer: retrying", exc_info=True)
                self._stop.wait(pause)
                pause = min(pause * 2, 10.0)

    def _ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except Exception as exc:  # redis.ResponseError
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self, start: str, block_ms: int | None = None) -> list[tuple[bytes, Fields]]:
        reply: Any = self.redis.xreadgroup(
            self.group, self.name, {self.stream: start}, count=self.batch, block=block_ms
        )
        return [(i, f) for i, f in reply[0][1] if f] if reply else []

    def _claim(self) -> list[tuple[bytes, Fields]]:
        reply: Any = self.redis.xautoclaim(
            self.stream, self.group, self.name, self.claim_idle_ms, "0-0", count=self.batch
        )
        return [(i, f) for i, f in reply[1] if f]

    def _deliver(self, entries: list[tuple[bytes, Fields]]) -> bool:
        if not entries:
            return False
        self.handle([fields for _, fields in entries])
        ids = [i for i, _ in entries]
        self.redis.xack(self.stream, self.group, *ids)
        self.redis.xdel(self.stream, *ids)
        return True

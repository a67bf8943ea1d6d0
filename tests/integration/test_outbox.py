"""The capture outbox against a real Redis: at-least-once delivery to an idempotent store, bounded
when Redis or the consumer is away, and every drop counted."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis
from prometheus_client import CollectorRegistry

from services.common.outbox import Consumer, Fields, Outbox
from services.gateway.redisio import Redis
from services.stackconfig import _free_port


def dropped(registry: CollectorRegistry, stream: str, reason: str) -> float:
    labels = {"stream": stream, "reason": reason}
    return registry.get_sample_value("crucible_outbox_dropped_total", labels) or 0.0


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


class Store:
    """An idempotent store (as the lifecycle store is): records by id, each kept once."""

    def __init__(self, fail_first: int = 0) -> None:
        self.kept: dict[bytes, int] = {}
        self.deliveries = 0
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def handle(self, records: Sequence[Fields]) -> None:
        with self.lock:
            self.deliveries += len(records)
            if self.fail_first > 0:
                self.fail_first -= 1
                raise ConnectionError("database away")
            for r in records:
                self.kept[r[b"request"]] = self.kept.get(r[b"request"], 0) + 1


async def produce(url: str, stream: str, n: int, registry: CollectorRegistry, **kw: int) -> Outbox:
    client = Redis(url, timeout=2.0)
    box = Outbox(client, stream, registry, **kw)
    box.start()
    for i in range(n):
        box.put({"i": i}, f"r{i}".encode(), b"{}")
    await box.aclose(timeout=10)
    await client.aclose()
    return box


def test_every_record_reaches_the_store_once_even_when_the_handler_fails(redis_url: str) -> None:
    stream = f"test:outbox:{uuid.uuid4().hex}"
    registry = CollectorRegistry()
    asyncio.run(produce(redis_url, stream, 250, registry))
    assert registry.get_sample_value("crucible_outbox_sent_total", {"stream": stream}) == 250
    store = Store(fail_first=2)  # the database is away for two batches: both come again
    consumer = Consumer(redis_url, stream, "g", store.handle, batch=100)
    consumer.start()
    try:
        wait_until(lambda: len(store.kept) == 250)
    finally:
        consumer.stop()
    assert set(store.kept.values()) == {1} and store.deliveries > 250
    r = redis.Redis.from_url(redis_url)
    assert r.xlen(stream) == 0  # acknowledged records are deleted: the length is the backlog
    r.delete(stream)


def test_a_dead_consumers_records_are_claimed_by_another(redis_url: str) -> None:
    stream = f"test:outbox:{uuid.uuid4().hex}"
    asyncio.run(produce(redis_url, stream, 20, CollectorRegistry()))
    r = redis.Redis.from_url(redis_url)
    r.xgroup_create(stream, "g", id="0", mkstream=True)
    taken: Any = r.xreadgroup("g", "died-before-ack", {stream: ">"}, count=20)
    assert len(taken[0][1]) == 20  # read, never acknowledged: that consumer was killed
    store = Store()
    consumer = Consumer(redis_url, stream, "g", store.handle, claim_idle_s=0.2)
    consumer.start()
    try:
        wait_until(lambda: len(store.kept) == 20)
    finally:
        consumer.stop()
    assert set(store.kept.values()) == {1}
    r.delete(stream)


def test_a_full_stream_drops_new_records_and_counts_them(redis_url: str) -> None:
    stream = f"test:outbox:{uuid.uuid4().hex}"
    registry = CollectorRegistry()
    asyncio.run(produce(redis_url, stream, 30, registry, max_len=25, batch=10))
    r = redis.Redis.from_url(redis_url)
    assert r.xlen(stream) == 25
    assert dropped(registry, stream, "stream_full") == 5
    r.delete(stream)


class Signal(logging.Handler):
    """Sets an event when a log line says `text` (the sender's failure is awaited, not slept on)."""

    def __init__(self, event: asyncio.Event, text: str) -> None:
        super().__init__()
        self.event, self.text = event, text

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_while_redis_is_away_the_buffer_is_bounded_and_drops_are_counted() -> None:
    """Nothing listens on the port: records wait in the buffer, up to its bound; what is left
    at shutdown is counted too."""
    registry = CollectorRegistry()
    url = f"redis://127.0.0.1:{_free_port()}/0"

    def buffered() -> float | None:
        return registry.get_sample_value("crucible_outbox_buffered", {"stream": "test:away"})

    async def scenario() -> None:
        client = Redis(url, timeout=0.2)
        failed = asyncio.Event()
        handler = Signal(failed, "redis unavailable")
        logging.getLogger("crucible.outbox").addHandler(handler)
        box = Outbox(client, "test:away", registry, buffer=50)
        box.start()
        for i in range(80):
            box.put({"i": i}, b"x", b"{}")
        try:
            await failed.wait()  # the sender has failed once
        finally:
            logging.getLogger("crucible.outbox").removeHandler(handler)
        assert buffered() == 50  # the failed batch went back into the buffer
        await box.aclose(timeout=0.3)
        await client.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert dropped(registry, "test:away", "buffer_full") == 30
    assert dropped(registry, "test:away", "shutdown") == 50

"""The gateway's own Redis client (`services/gateway/redisio.py`) against real `redis-server`
processes: credentials from the URL, refused AUTH and SELECT, and the rate limit across a Redis
restart."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
import redis as redis_py

from services.gateway.limits import RateLimiter, RedisUnavailable
from services.gateway.redisio import Redis, RedisReplyError, RedisSetupError
from tests.processes import redis_server

PASSWORD = "p@ss word/1"  # characters a URL must escape
ACL = ("--user", "default", "on", f">{PASSWORD}", "~*", "&*", "+@all")
ALICE = ("--user", "alice", "on", ">s3cr:t", "~*", "&*", "+@all")


def test_a_password_or_an_acl_user_in_the_url_authenticates_and_selects_the_database(
    tmp_path: Path,
) -> None:
    with redis_server(tmp_path, *ACL, *ALICE) as server:
        host = f"127.0.0.1:{server.port}"

        async def go() -> None:
            default = Redis(f"redis://:p%40ss%20word%2F1@{host}/3")
            alice = Redis(f"redis://alice:s3cr%3At@{host}/2")
            assert await default.execute("SET", "k", "default") == b"OK"
            assert await alice.execute("SET", "k", "alice") == b"OK"
            await default.aclose()
            await alice.aclose()

        asyncio.run(go())
        check = redis_py.Redis(port=server.port, password=PASSWORD)
        assert check.execute_command("SELECT", 3) and check.get("k") == b"default"
        assert check.execute_command("SELECT", 2) and check.get("k") == b"alice"
        check.close()


def test_a_refused_auth_or_select_names_why_and_keeps_no_connection(tmp_path: Path) -> None:
    with redis_server(tmp_path, *ACL) as server:
        host = f"127.0.0.1:{server.port}"

        async def refused(url: str, error: type[RedisReplyError] = RedisSetupError) -> str:
            client = Redis(url)
            with pytest.raises(error) as err:
                await client.execute("PING")
            if error is RedisSetupError:
                assert client._conn is None  # the next command connects anew, not reuses this
            await client.aclose()
            return str(err.value)

        wrong = asyncio.run(refused(f"redis://:not-it@{host}/0"))
        assert "AUTH failed" in wrong and "WRONGPASS" in wrong and "not-it" not in wrong
        # No password at all: the first command itself is refused, with Redis's reason.
        none = asyncio.run(refused(f"redis://{host}/0", RedisReplyError))
        assert "NOAUTH" in none
        bad_db = asyncio.run(refused(f"redis://:p%40ss%20word%2F1@{host}/99"))
        assert "SELECT 99 failed" in bad_db


def test_the_limiter_reports_a_refused_password_in_its_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with redis_server(tmp_path, *ACL) as server:

        async def go() -> None:
            limiter = RateLimiter(f"redis://:wrong@127.0.0.1:{server.port}/0", on_error="closed")
            with pytest.raises(RedisUnavailable):
                await limiter.reserve("key_a", 60)
            await limiter.aclose()

        with caplog.at_level(logging.WARNING, logger="crucible.gateway"):
            asyncio.run(go())
    assert any("WRONGPASS" in str(getattr(r, "error", "")) for r in caplog.records)


def test_a_per_minute_limit_holds_across_a_redis_restart(tmp_path: Path) -> None:
    """Redis with AOF (as compose runs it) restarts under a key that has spent its budget: the
    client reconnects on its own, reloads its script, and the key is still limited."""
    aof = ("--appendonly", "yes", "--appendfsync", "always")
    with redis_server(tmp_path, *aof) as first:
        port = first.port
        limiter = RateLimiter(f"redis://127.0.0.1:{port}/0", on_error="closed")
        loop = asyncio.new_event_loop()
        try:
            assert [loop.run_until_complete(limiter.reserve("key_a", 3)) for _ in range(3)] == [
                0.0
            ] * 3
            assert loop.run_until_complete(limiter.reserve("key_a", 3)) > 0
            first.stop()
            started = time.monotonic()
            with pytest.raises(RedisUnavailable):
                loop.run_until_complete(limiter.reserve("key_a", 3))
            assert time.monotonic() - started < 1.0  # refused at once, no hang
            with redis_server(tmp_path, *aof, port=port):
                deadline = time.monotonic() + 5
                while True:
                    try:
                        wait = loop.run_until_complete(limiter.reserve("key_a", 3))
                        break
                    except RedisUnavailable:
                        assert time.monotonic() < deadline, "never reconnected"
                        time.sleep(0.1)
                assert wait > 0  # the spent budget survived the restart
                assert loop.run_until_complete(limiter.reserve("key_b", 3)) == 0.0
        finally:
            loop.run_until_complete(limiter.aclose())
            loop.close()

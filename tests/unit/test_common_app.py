"""The shared app pieces every service uses: envelope, request ids, metrics, health, logs."""

import asyncio
import gc
import json
import logging

import httpx
import pytest
from pydantic import BaseModel

from services.common.app import build_app
from services.common.errors import NotFound, RateLimited
from services.common.logging import JsonFormatter


class Item(BaseModel):
    n: int


async def _failing_check() -> None:
    raise ConnectionError("redis down")


def make_app(ready_ok: bool = True):
    async def ok() -> None:
        return None

    app = build_app("demo", ready_checks=[("dep", ok if ready_ok else _failing_check)])

    @app.get("/v1/things/{thing_id}")
    async def get_thing(thing_id: str) -> dict[str, str]:
        if thing_id != "t1":
            raise NotFound(f"no thing {thing_id!r}", param="thing_id")
        return {"id": thing_id}

    @app.post("/v1/things")
    async def create(item: Item) -> Item:
        return item

    from fastapi import APIRouter

    included = APIRouter()

    @included.get("/v1/nested/{item_id}")
    async def nested(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    app.include_router(included)

    @app.get("/limited")
    async def limited() -> None:
        raise RateLimited("slow down", retry_after=2.4)

    @app.get("/huge")
    async def huge() -> None:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    @app.get("/half-a-surrogate")
    async def unencodable() -> None:
        "\ud800".encode()  # what a database driver does with JSON's "\ud800"

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret-token-123 leaked?")

    return app


def call(app, method: str, path: str, **kw) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


def test_unknown_id_is_404_in_the_openai_envelope() -> None:
    r = call(make_app(), "GET", "/v1/things/zzz")
    assert r.status_code == 404
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == "thing_id" and err["code"] == "not_found"


def test_wrong_type_is_400_naming_the_field_without_echoing_input() -> None:
    r = call(make_app(), "POST", "/v1/things", json={"n": "sk-not-a-number"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "n" and err["type"] == "invalid_request_error"
    assert "sk-not-a-number" not in r.text


def test_unknown_route_and_method_use_the_envelope() -> None:
    assert call(make_app(), "GET", "/nope").json()["error"]["code"] == "not_found"
    r = call(make_app(), "DELETE", "/v1/things")
    assert r.status_code == 405 and "error" in r.json()


def test_rate_limit_carries_retry_after() -> None:
    r = call(make_app(), "GET", "/limited")
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_unexpected_error_is_500_without_internals() -> None:
    r = call(make_app(), "GET", "/boom")
    assert r.status_code == 500
    assert "secret-token" not in r.text and "Traceback" not in r.text
    assert r.json()["error"]["code"] == "internal_error"


def test_text_that_is_not_unicode_and_numbers_past_the_database_are_400_not_500() -> None:
    for path in ("/half-a-surrogate", "/huge"):
        r = call(make_app(), "GET", path)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value"


def test_request_id_is_echoed_or_generated() -> None:
    app = make_app()
    assert (
        call(app, "GET", "/health", headers={"x-request-id": "abc-1"}).headers["x-request-id"]
        == "abc-1"
    )
    generated = call(app, "GET", "/health").headers["x-request-id"]
    assert len(generated) == 32
    # A header that could forge log lines is replaced, not trusted.
    forged = call(app, "GET", "/health", headers={"x-request-id": 'a"\\n{"x'}).headers[
        "x-request-id"
    ]
    assert forged != 'a"\\n{"x'


def test_metrics_label_route_templates_not_ids() -> None:
    app = make_app()
    call(app, "GET", "/v1/things/t1")
    call(app, "GET", "/v1/things/secret-id-42")
    call(app, "GET", "/v1/nested/other-secret-7")
    text = call(app, "GET", "/metrics").text
    line = (
        "crucible_demo_http_requests_total"
        '{method="GET",route="/v1/things/{thing_id}",status="2xx"} 1.0'
    )
    assert line in text
    assert 'status="4xx"' in text and "secret-id-42" not in text
    # Routes from an included router (how services mount theirs) get their template too.
    assert 'route="/v1/nested/{item_id}"' in text and "other-secret-7" not in text
    assert "crucible_demo_http_request_duration_seconds_bucket" in text


def test_ready_is_503_with_the_failing_dependency_named() -> None:
    assert call(make_app(ready_ok=True), "GET", "/ready").status_code == 200
    r = call(make_app(ready_ok=False), "GET", "/ready")
    assert r.status_code == 503 and "redis down" in r.json()["checks"]["dep"]
    assert call(make_app(ready_ok=False), "GET", "/health").status_code == 200


def test_log_lines_are_json_with_request_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="crucible.http")
    call(make_app(), "GET", "/v1/things/t1", headers={"x-request-id": "rid-7"})
    record = next(r for r in caplog.records if r.name == "crucible.http")
    from services.common.logging import request_id

    token = request_id.set("rid-7")
    try:
        line = json.loads(JsonFormatter("demo").format(record))
    finally:
        request_id.reset(token)
    assert line["request_id"] == "rid-7" and line["route"] == "/v1/things/{thing_id}"
    assert line["status"] == 200 and line["service"] == "demo"


def test_library_loggers_with_their_own_handlers_log_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import pymilvus  # noqa: F401  (installs its plain-text handlers on import)

    from services.common.logging import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    lib = logging.getLogger("pymilvus")
    lib_saved = lib.handlers[:], lib.propagate
    try:
        configure_logging("demo")
        lib.error("RPC error: [search], connection refused")
    finally:
        root.handlers[:], root.level = saved
        lib.handlers[:], lib.propagate = lib_saved
    [line] = capsys.readouterr().err.splitlines()
    event = json.loads(line)
    assert (event["logger"], event["level"], event["service"]) == ("pymilvus", "error", "demo")


def test_what_startup_loads_is_left_out_of_later_collections() -> None:
    from contextlib import asynccontextmanager

    from fastapi.testclient import TestClient

    held: list[object] = []

    @asynccontextmanager
    async def lifespan(app):  # a service loading its models
        held.extend({"weight": i} for i in range(50_000))
        yield

    app = build_app("demo", lifespan=lifespan)
    gc.unfreeze()
    try:
        with TestClient(app) as client:
            assert client.get("/health").status_code == 200
            assert gc.get_freeze_count() >= len(held)
    finally:
        gc.unfreeze()

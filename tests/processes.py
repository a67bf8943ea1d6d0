"""Extra gateway and fake-upstream processes for the tests that need their own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import httpx

from services import milvuslite
from services.gateway.keys import KeyStore
from services.stackconfig import ROOT, _free_port, _http_ok, _port_busy


@dataclass
class Proc:
    url: str
    port: int
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self, graceful: bool = False) -> None:
        """SIGKILL (a crash), or SIGTERM first: the service shuts down as in production."""
        if self.popen.poll() is None and graceful:
            os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(30)
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.1)


@contextmanager
def fake_upstream(
    tmp: Path,
    port: int | None = None,
    slow_s: float = 5.0,
    api_key: str | None = None,
    token_interval_ms: float = 20.0,
) -> Iterator[Proc]:
    port = port or _free_port()
    popen = _spawn(
        [
            sys.executable,
            "-m",
            "tests.fakes.openai_server",
            "--port",
            str(port),
            "--slow-s",
            str(slow_s),
            "--token-interval-ms",
            str(token_interval_ms),
            *(["--api-key", api_key] if api_key else []),
        ],
        {},
        tmp / f"fake-{port}.log",
    )
    proc = Proc(f"http://127.0.0.1:{port}", port, popen, tmp / f"fake-{port}.log")
    try:
        _wait(lambda: _port_busy(port), "fake upstream")
        yield proc
    finally:
        proc.stop()


@contextmanager
def service(
    name: str,
    var_dir: Path,
    settings: dict[str, object],
    ready: str = "/health",
    timeout: float = 30,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Proc]:
    """`python -m services.<name>` on a free port (or `port`) with its own var dir; `settings`
    are its settings fields (as CRUCIBLE_<NAME>_* env), `env` shared ones (CRUCIBLE_OTLP_...)."""
    var_dir.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    prefix = f"CRUCIBLE_{name.upper()}_"
    own = {"CRUCIBLE_VAR_DIR": str(var_dir), f"{prefix}PORT": str(port), **(env or {})}
    own |= {f"{prefix}{k.upper()}": str(v) for k, v in settings.items()}
    log = var_dir / f"{name}-{port}.log"
    argv = [sys.executable, "-m", f"services.{name}"]
    proc = Proc(f"http://127.0.0.1:{port}", port, _spawn(argv, own, log), log)
    try:
        _wait(lambda: _http_ok(f"{proc.url}{ready}"), name, timeout=timeout)
        yield proc
    finally:
        proc.stop()


@contextmanager
def eval_worker(var_dir: Path, settings: dict[str, object]) -> Iterator[Proc]:
    """`python -m services.finetune.evalworker` beside a finetune service on `var_dir` (the
    same database; `settings` as that service's, CRUCIBLE_FINETUNE_*)."""
    port = _free_port()
    env = {
        "CRUCIBLE_VAR_DIR": str(var_dir),
        "CRUCIBLE_FINETUNE_EVAL_WORKER_METRICS_PORT": str(port),
    }
    env |= {f"CRUCIBLE_FINETUNE_{k.upper()}": str(v) for k, v in settings.items()}
    log = var_dir / f"eval-worker-{port}.log"
    argv = [sys.executable, "-m", "services.finetune.evalworker"]
    proc = Proc(f"http://127.0.0.1:{port}", port, _spawn(argv, env, log), log)
    try:
        _wait(lambda: _http_ok(f"{proc.url}/metrics"), "eval worker")
        yield proc
    finally:
        proc.stop()


def gateway(
    var_dir: Path, backends: list[str], redis_url: str, **settings: object
) -> contextlib.AbstractContextManager[Proc]:
    """A gateway process; `settings` are GatewaySettings fields (and `env`, shared settings
    such as CRUCIBLE_OTLP_ENDPOINT)."""
    import json

    env = cast(dict[str, str] | None, settings.pop("env", None))
    wiring = {"inference_urls": json.dumps(backends), "redis_url": redis_url}
    return service("gateway", var_dir, {**wiring, **settings}, env=env)


@contextmanager
def replicas(
    var_dir: Path, backends: list[str], redis_url: str, **settings: object
) -> Iterator[tuple[Proc, Proc]]:
    """Two gateway processes on one key database and one Redis, as compose's replicas are."""
    with (
        gateway(var_dir, backends, redis_url, **settings) as a,
        gateway(var_dir, backends, redis_url, **settings) as b,
    ):
        yield a, b


def retrieval(var_dir: Path, **settings: object) -> contextlib.AbstractContextManager[Proc]:
    """A retrieval service process on its own var dir (own SQLite, Milvus Lite and files)."""
    return service("retrieval", var_dir, settings, ready="/ready", timeout=120)


@contextmanager
def milvus_lite(var_dir: Path, port: int | None = None) -> Iterator[Proc]:
    """Milvus's server process on `var_dir`'s database, as `make up` runs it (its engine)."""
    var_dir.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    data = str(milvuslite.database(var_dir))
    argv = [sys.executable, "-m", "services.milvuslite", "--data-dir", data]
    log = var_dir / f"milvus-{port}.log"
    proc = Proc(
        f"http://127.0.0.1:{port}", port, _spawn([*argv, "--port", str(port)], {}, log), log
    )
    try:
        _wait(lambda: _port_busy(port), "milvus lite", timeout=60)
        yield proc
    finally:
        proc.stop(graceful=True)


def make_key(var_dir: Path, owner: str = "tester", **kw: object) -> str:
    store = KeyStore(f"sqlite:///{var_dir / 'gateway.db'}")
    try:
        secret, _ = store.create(owner, **kw)  # type: ignore[arg-type]
    finally:
        store.engine.dispose()
    return secret


@contextmanager
def redis_server(tmp: Path, *args: str, port: int | None = None) -> Iterator[Proc]:
    """A `redis-server` of a test's own (its own port, its files under `tmp`); `args` are its
    settings (`--requirepass x`, `--appendonly yes`, ...)."""
    port = port or _free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    argv = ["redis-server", "--port", str(port), "--dir", str(tmp), "--save", "", *args]
    log = tmp / f"redis-{port}.log"
    proc = Proc(f"redis://127.0.0.1:{port}", port, _spawn(argv, {}, log), log)
    try:
        _wait(lambda: _port_busy(port), "redis-server")
        yield proc
    finally:
        proc.stop()


PG_URL = os.environ.get("CRUCIBLE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the test server (dropped after, with any sessions
    still open to it); yields its URL."""
    from sqlalchemy import create_engine, text

    name = f"crucible_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def behind_a_gateway(
    var: Path,
    redis_url: str,
    gateway_port: int,
    inference_url: str = "http://127.0.0.1:9",  # none: enough where no model is called
    **common: object,
) -> Iterator[dict[str, object]]:
    """Retrieval, fine-tuning's API and the agent on `var`, each with the `common` settings (a
    database URL, say), the agent calling back the gateway that will listen on `gateway_port`;
    yields the gateway settings that reach them."""
    import json

    with contextlib.ExitStack() as es:
        r = es.enter_context(retrieval(var, **common))
        finetune = {"redis_url": redis_url, "retrieval_url": r.url}
        finetune["inference_urls"] = json.dumps([inference_url])
        # The suite's stack shares the machine's two cores: give them time to start.
        f = es.enter_context(service("finetune", var, {**common, **finetune}, timeout=120))
        agent = {"gateway_url": f"http://127.0.0.1:{gateway_port}", "retrieval_url": r.url}
        a = es.enter_context(service("agent", var, {**common, **agent}, timeout=120))
        yield {"retrieval_url": r.url, "finetune_url": f.url, "agent_url": a.url}


def metric(url: str, name: str) -> float:
    """The sum of a service's samples whose line starts with `name`, from its /metrics."""
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )

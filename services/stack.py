"""The native stack: every service as a local background process (`make up/down/logs/status`).

The list of services, their commands and their environment lives here once; the tests start the
same list on free ports, and the compose test checks that compose runs the same commands.

    python -m services.stack up|down|status|logs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from services import monitoring
from services.inference import profiles, readiness

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@dataclass(frozen=True)
class Ports:
    inference: int = 8000
    gateway: int = 8080
    retrieval: int = 8001
    finetune: int = 8002
    agent: int = 8003
    prometheus: int = 9090
    redis: int = 6379
    milvus: int = 19530
    finetune_worker: int = 8012  # the worker's /metrics

    @classmethod
    def free(cls) -> Ports:
        """Free ports for a test stack, so it never collides with a developer's `make up`."""
        return cls(*(_free_port() for _ in fields(cls)))


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    url: str
    ready: Callable[[], bool] = field(compare=False)
    ready_timeout: float = 60.0
    # A server already answering on the port is used as it is (Redis on a developer's machine).
    adopt_existing: bool = False
    # Runs before each start (Prometheus: writes its config for the stack's ports).
    prepare: Callable[[], object] | None = field(default=None, compare=False)
    # Monitoring: the stack runs without it where its program is not installed.
    optional: bool = False


@dataclass(frozen=True)
class StackConfig:
    var_dir: Path = ROOT / "var"
    ports: Ports = Ports()
    profile: str = "cpu-dev"
    models_dir: Path = ROOT / "var" / "models"
    scrape_interval: str = "5s"

    def write_prometheus_config(self) -> Path:
        ports = {f.name: getattr(self.ports, f.name) for f in fields(self.ports)}
        path = self.var_dir / "prometheus" / "prometheus.yml"
        path.parent.mkdir(parents=True, exist_ok=True)
        config = monitoring.native_config(ports, self.scrape_interval)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def services(self) -> list[Service]:
        """Every service of the stack, in start order."""
        profile = profiles.load(self.profile)
        inference_url = f"http://127.0.0.1:{self.ports.inference}"
        gateway_url = f"http://127.0.0.1:{self.ports.gateway}"
        retrieval_url = f"http://127.0.0.1:{self.ports.retrieval}"
        finetune_url = f"http://127.0.0.1:{self.ports.finetune}"
        worker_url = f"http://127.0.0.1:{self.ports.finetune_worker}"
        agent_url = f"http://127.0.0.1:{self.ports.agent}"
        prometheus_url = f"http://127.0.0.1:{self.ports.prometheus}"
        prometheus_dir = self.var_dir / "prometheus"
        # Jobs queue in their own Redis database, apart from the gateway's counters.
        broker = f"redis://127.0.0.1:{self.ports.redis}/1"
        finetune_env = {
            "CRUCIBLE_FINETUNE_REDIS_URL": broker,
            "CRUCIBLE_FINETUNE_RETRIEVAL_URL": retrieval_url,
            "CRUCIBLE_FINETUNE_INFERENCE_URLS": json.dumps([inference_url]),
            "CRUCIBLE_FINETUNE_MODELS_DIR": str(self.models_dir),
        }
        redis_dir = self.var_dir / "redis"
        milvus_url = f"http://127.0.0.1:{self.ports.milvus}"
        return [
            Service(
                name="redis",
                argv=[
                    "redis-server",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.ports.redis),
                    "--dir",
                    str(redis_dir),
                    "--appendonly",
                    "yes",
                    "--save",
                    "",
                ],
                env={},
                url=f"redis://127.0.0.1:{self.ports.redis}",
                ready=lambda: _redis_ping(self.ports.redis),
                ready_timeout=20,
                adopt_existing=True,
            ),
            Service(
                name="inference",
                argv=[PYTHON, "-m", "services.inference.launch"],
                env={
                    "CRUCIBLE_INFERENCE_PROFILE": self.profile,
                    "CRUCIBLE_INFERENCE_HOST": "127.0.0.1",
                    "CRUCIBLE_INFERENCE_PORT": str(self.ports.inference),
                    "CRUCIBLE_INFERENCE_MODELS_DIR": str(self.models_dir),
                },
                url=inference_url,
                ready=lambda: readiness.is_ready(inference_url, profile.served_model_name),
                ready_timeout=600,
            ),
            Service(
                name="milvus",
                argv=[
                    PYTHON,
                    "-m",
                    "services.milvuslite",
                    "--data-dir",
                    str(self.var_dir / "milvus.db"),
                    "--port",
                    str(self.ports.milvus),
                ],
                env={},
                url=milvus_url,
                ready=lambda: _port_busy(self.ports.milvus),
                ready_timeout=60,
            ),
            Service(
                name="retrieval",
                argv=[PYTHON, "-m", "services.retrieval"],
                env={
                    "CRUCIBLE_RETRIEVAL_HOST": "127.0.0.1",
                    "CRUCIBLE_RETRIEVAL_PORT": str(self.ports.retrieval),
                    "CRUCIBLE_RETRIEVAL_MILVUS_URI": milvus_url,
                },
                url=retrieval_url,
                ready=lambda: _http_ok(f"{retrieval_url}/ready"),
                ready_timeout=120,
            ),
            # The worker first: the API is ready only once a worker beats.
            Service(
                name="finetune-worker",
                argv=[PYTHON, "-m", "services.finetune.worker"],
                env={
                    "CRUCIBLE_FINETUNE_HOST": "127.0.0.1",
                    "CRUCIBLE_FINETUNE_PORT": str(self.ports.finetune),
                    "CRUCIBLE_FINETUNE_WORKER_METRICS_PORT": str(self.ports.finetune_worker),
                    **finetune_env,
                },
                url=worker_url,
                ready=lambda: _http_ok(f"{worker_url}/metrics"),
                ready_timeout=60,
            ),
            Service(
                name="finetune",
                argv=[PYTHON, "-m", "services.finetune"],
                env={
                    "CRUCIBLE_FINETUNE_HOST": "127.0.0.1",
                    "CRUCIBLE_FINETUNE_PORT": str(self.ports.finetune),
                    **finetune_env,
                },
                url=finetune_url,
                ready=lambda: _http_ok(f"{finetune_url}/ready"),
                ready_timeout=60,
            ),
            Service(
                name="gateway",
                argv=[PYTHON, "-m", "services.gateway"],
                env={
                    "CRUCIBLE_GATEWAY_HOST": "127.0.0.1",
                    "CRUCIBLE_GATEWAY_PORT": str(self.ports.gateway),
                    "CRUCIBLE_GATEWAY_INFERENCE_URLS": json.dumps([inference_url]),
                    "CRUCIBLE_GATEWAY_REDIS_URL": f"redis://127.0.0.1:{self.ports.redis}/0",
                    "CRUCIBLE_GATEWAY_RETRIEVAL_URL": retrieval_url,
                    "CRUCIBLE_GATEWAY_FINETUNE_URL": finetune_url,
                    "CRUCIBLE_GATEWAY_AGENT_URL": agent_url,
                },
                url=gateway_url,
                ready=lambda: _http_ok(f"{gateway_url}/ready"),
                ready_timeout=60,
            ),
            Service(
                name="agent",
                argv=[PYTHON, "-m", "services.agent"],
                env={
                    "CRUCIBLE_AGENT_HOST": "127.0.0.1",
                    "CRUCIBLE_AGENT_PORT": str(self.ports.agent),
                    "CRUCIBLE_AGENT_GATEWAY_URL": gateway_url,
                    "CRUCIBLE_AGENT_RETRIEVAL_URL": retrieval_url,
                },
                url=agent_url,
                ready=lambda: _http_ok(f"{agent_url}/ready"),
                ready_timeout=60,
            ),
            Service(
                name="prometheus",
                argv=[
                    "prometheus",
                    f"--config.file={prometheus_dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={prometheus_dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.ports.prometheus}",
                    "--storage.tsdb.retention.time=7d",
                ],
                env={},
                url=prometheus_url,
                ready=lambda: _http_ok(f"{prometheus_url}/-/ready"),
                ready_timeout=60,
                prepare=self.write_prometheus_config,
                optional=True,
            ),
        ]


class StackError(RuntimeError):
    pass


class Stack:
    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        self.run_dir = self.config.var_dir / "run"
        self.log_dir = self.config.var_dir / "log"

    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def pid(self, name: str) -> int | None:
        try:
            pid = int(self._pidfile(name).read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def up(self, only: list[str] | None = None, echo: Callable[[str], None] = print) -> None:
        """Start every service at once (each waits for its own dependencies), then wait for
        each to be ready in order: the slow engine start overlaps everything else."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        chosen = [s for s in self.config.services() if not only or s.name in only]
        adopted = set()
        missing = {s.name for s in chosen if s.optional and shutil.which(s.argv[0]) is None}
        for name in sorted(missing):
            echo(f"{name:<16} skipped: `{name}` is not installed (make setup installs it)")
        chosen = [s for s in chosen if s.name not in missing]
        for svc in chosen:
            if svc.adopt_existing and self.pid(svc.name) is None and svc.ready():
                adopted.add(svc.name)
            elif self.pid(svc.name) is None:
                self.down_one(svc.name)  # leftovers of a crashed run, if any
                self._start(svc)
        for svc in chosen:
            if svc.name in adopted:
                echo(f"{svc.name:<16} ready  {svc.url} (already running, not managed)")
                continue
            self._wait_ready(svc)
            echo(f"{svc.name:<16} ready  {svc.url}")

    def _start(self, svc: Service) -> None:
        port = int(svc.url.rsplit(":", 1)[1])
        if _port_busy(port):
            raise StackError(
                f"{svc.name}: port {port} is taken by a process `make up` did not start"
            )
        env = {**os.environ, **svc.env, "CRUCIBLE_VAR_DIR": str(self.config.var_dir)}
        if svc.prepare is not None:
            svc.prepare()
        (self.config.var_dir / "redis").mkdir(parents=True, exist_ok=True)
        with open(self.log_path(svc.name), "ab") as log:
            # A session of its own: `down` stops the service with everything it spawned.
            proc = subprocess.Popen(
                svc.argv,
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._pidfile(svc.name).write_text(str(proc.pid))

    def _wait_ready(self, svc: Service) -> None:
        deadline = time.monotonic() + svc.ready_timeout
        while time.monotonic() < deadline:
            if self.pid(svc.name) is None:
                raise StackError(f"{svc.name} exited during start:\n{self.tail(svc.name)}")
            if svc.ready():
                return
            time.sleep(1)
        raise StackError(
            f"{svc.name} not ready after {svc.ready_timeout:g}s:\n{self.tail(svc.name)}"
        )

    def tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def down(self, grace: float = 20.0) -> list[str]:
        """Stop every service started here, newest first; returns the names stopped."""
        return [s.name for s in reversed(self.config.services()) if self.down_one(s.name, grace)]

    def down_one(self, name: str, grace: float = 20.0) -> bool:
        try:
            pgid = int(self._pidfile(name).read_text())
        except (OSError, ValueError):
            return False
        # The whole group, even when its leader is gone: helpers it spawned may outlive it.
        alive = _group_alive(pgid)
        if alive:
            _stop_group(pgid, grace)
        self._pidfile(name).unlink(missing_ok=True)
        return alive

    def status(self) -> dict[str, str]:
        out = {}
        for svc in self.config.services():
            if self.pid(svc.name) is None:
                # A server we did not start (the machine's Redis) that answers is up, not stopped.
                foreign = svc.adopt_existing and svc.ready()
                out[svc.name] = "ready (not managed)" if foreign else "stopped"
            else:
                out[svc.name] = "ready" if svc.ready() else "starting or unhealthy"
        return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def _stop_group(pgid: int, grace: float) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return


def _group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process left in the group? Zombies linger until their parent reaps."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 (our own URL)
            return bool(resp.status == 200)
    except (OSError, ValueError):
        return False


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    """A free port below the kernel's ephemeral range: a port the kernel hands out (bind to 0)
    can be taken by any outgoing connection before the service binds it (seen once in a test
    session: "port ... is taken")."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randint(20000, max(20001, low - 1))  # noqa: S311 (not a secret)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dev_key(var_dir: Path) -> str:
    """The developer's admin key, created on the first `make up` and kept in var/ (mode 0600)."""
    from services.gateway.config import GatewaySettings
    from services.gateway.keys import KeyStore

    path = var_dir / "dev-api-key"
    store = KeyStore(GatewaySettings(var_dir=var_dir).db_url())
    try:
        if path.exists() and store.lookup(path.read_text().strip()) is not None:
            return path.read_text().strip()
        # The operator's own key on their machine: no per-minute limit, generous concurrency.
        secret, _ = store.create("dev", name="make up", admin=True, rpm=0, max_concurrency=256)
    finally:
        store.engine.dispose()
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run Crucible's services as local processes.")
    parser.add_argument("command", choices=["up", "down", "status", "logs"])
    parser.add_argument(
        "--profile", default=os.environ.get("CRUCIBLE_INFERENCE_PROFILE", "cpu-dev")
    )
    parser.add_argument("services", nargs="*", help="only these (default: all)")
    args = parser.parse_args(argv)
    stack = Stack(StackConfig(profile=args.profile))
    if args.command == "up":
        try:
            stack.up(args.services or None)
        except StackError as exc:
            print(f"make up failed: {exc}", file=sys.stderr)
            stack.down()
            return 1
        if not args.services or "gateway" in args.services:
            print(f"API key:   {dev_key(stack.config.var_dir)}")
            print("           export OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=<key>")
        print(f"logs: {stack.log_dir}/ (make logs); stop with `make down`")
    elif args.command == "down":
        stopped = stack.down()
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    elif args.command == "status":
        for name, state in stack.status().items():
            print(f"{name:<16} {state}")
    else:
        logs = sorted(str(p) for p in stack.log_dir.glob("*.log"))
        if not logs:
            print("no logs yet: run `make up`")
            return 0
        os.execvp("tail", ["tail", "-n", "50", "-F", *logs])  # noqa: S606
    return 0


if __name__ == "__main__":
    sys.exit(main())

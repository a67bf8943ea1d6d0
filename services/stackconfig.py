"""The native stack's services: each one's command, environment, port, checks and start time.

The list lives here once: `make up` (services/stack.py) runs it under supervisord, the tests
start the same list on free ports, and the compose test checks that compose runs the same
commands.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from services import milvuslite, monitoring
from services.inference import profiles, readiness
from services.supervise import Policy, probe

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
    supervisor: int = 8013  # the monitor's /metrics (restarts, failures)
    eval_worker: int = 8014  # the eval worker's /metrics
    traces: int = 4318  # the trace sink (OTLP/HTTP's port)
    # CRUCIBLE_REPLICAS=2 only: the balancer takes `gateway`, the gateways these; the second
    # vLLM and training worker (its /metrics) these.
    gateway_1: int = 8090
    gateway_2: int = 8091
    inference_2: int = 8010
    finetune_worker_2: int = 8015

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
    # Liveness, checked by the monitor (http://, redis://, tcp://): failing it restarts the
    # service; `ready_url` is only polled, never a reason to restart.
    health: str = ""
    ready_url: str = ""
    ready_timeout: float = 60.0
    # How long it must stay up to count as started; exits sooner are retried with backoff.
    startsecs: float = 5.0
    # A server already answering on the port is used as it is (Redis on a developer's machine).
    adopt_existing: bool = False
    # Runs before each start (Prometheus: writes its config for the stack's ports).
    prepare: Callable[[], object] | None = field(default=None, compare=False)
    # Monitoring: the stack runs without it where its program is not installed.
    optional: bool = False
    # The command line it has once running, where it execs another program (Milvus's server).
    runs_as: list[str] | None = None


@dataclass(frozen=True)
class StackConfig:
    var_dir: Path = ROOT / "var"
    ports: Ports = Ports()
    profile: str = "cpu-dev"
    models_dir: Path = ROOT / "var" / "models"
    scrape_interval: str = "5s"
    policy: Policy = field(default_factory=Policy)
    # Environment for every service: `make up` passes the shell's CRUCIBLE_* settings, so a
    # changed setting restarts the services it reaches on the next `make up`.
    env: dict[str, str] = field(default_factory=dict)
    # 2: two gateways behind HAProxy, two vLLM servers (each pinned to half the cores) and two
    # training workers, on one Redis, database and Milvus (CRUCIBLE_REPLICAS; README).
    replicas: int = 1

    def __post_init__(self) -> None:
        if self.replicas not in (1, 2):
            raise ValueError(f"CRUCIBLE_REPLICAS is 1 or 2, not {self.replicas}")

    def write_balancer_config(self) -> Path:
        path = self.var_dir / "balancer" / "haproxy.cfg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            balancer_config(self.ports.gateway, [self.ports.gateway_1, self.ports.gateway_2])
        )
        return path

    def write_prometheus_config(self) -> Path:
        ports = {f.name: getattr(self.ports, f.name) for f in fields(self.ports)}
        path = self.var_dir / "prometheus" / "prometheus.yml"
        path.parent.mkdir(parents=True, exist_ok=True)
        config = monitoring.native_config(ports, self.scrape_interval, self.replicas)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def services(self) -> list[Service]:
        """Every service of the stack, in start order."""
        profile = profiles.load(self.profile)
        inference_url = f"http://127.0.0.1:{self.ports.inference}"
        engines = [inference_url]
        if self.replicas == 2:
            engines.append(f"http://127.0.0.1:{self.ports.inference_2}")
        gateway_url = f"http://127.0.0.1:{self.ports.gateway}"  # the balancer's, with replicas
        retrieval_url = f"http://127.0.0.1:{self.ports.retrieval}"
        finetune_url = f"http://127.0.0.1:{self.ports.finetune}"
        eval_worker_url = f"http://127.0.0.1:{self.ports.eval_worker}"
        agent_url = f"http://127.0.0.1:{self.ports.agent}"
        traces_url = f"http://127.0.0.1:{self.ports.traces}"
        traced = {"CRUCIBLE_OTLP_ENDPOINT": traces_url}  # where every service sends its spans
        prometheus_url = f"http://127.0.0.1:{self.ports.prometheus}"
        prometheus_dir = self.var_dir / "prometheus"
        # Jobs queue in their own Redis database, apart from the gateway's counters.
        broker = f"redis://127.0.0.1:{self.ports.redis}/1"
        finetune_env = {
            "CRUCIBLE_FINETUNE_REDIS_URL": broker,
            "CRUCIBLE_FINETUNE_CAPTURES_REDIS_URL": f"redis://127.0.0.1:{self.ports.redis}/0",
            "CRUCIBLE_FINETUNE_RETRIEVAL_URL": retrieval_url,
            "CRUCIBLE_FINETUNE_AGENT_URL": agent_url,
            # Eval runs call models (and their create checks them) through the gateway.
            "CRUCIBLE_FINETUNE_GATEWAY_URL": gateway_url,
            "CRUCIBLE_FINETUNE_INFERENCE_URLS": json.dumps(engines),
            "CRUCIBLE_FINETUNE_MODELS_DIR": str(self.models_dir),
        }
        redis_dir = self.var_dir / "redis"
        milvus_url = f"http://127.0.0.1:{self.ports.milvus}"
        gateway_env = {
            "CRUCIBLE_GATEWAY_INFERENCE_URLS": json.dumps(engines),
            "CRUCIBLE_GATEWAY_REDIS_URL": f"redis://127.0.0.1:{self.ports.redis}/0",
            "CRUCIBLE_GATEWAY_RETRIEVAL_URL": retrieval_url,
            "CRUCIBLE_GATEWAY_FINETUNE_URL": finetune_url,
            "CRUCIBLE_GATEWAY_AGENT_URL": agent_url,
        }
        gateways = {"gateway": gateway_url}
        worker_ports = [self.ports.finetune_worker]
        cores = _core_halves(len(engines))
        if self.replicas == 2:
            gateways = {
                "gateway": f"http://127.0.0.1:{self.ports.gateway_1}",
                "gateway-2": f"http://127.0.0.1:{self.ports.gateway_2}",
            }
            worker_ports.append(self.ports.finetune_worker_2)

        def engine(i: int, url: str) -> Service:
            """vLLM's server (the i-th of the replicas, pinned to its share of the cores)."""
            pinned = {"VLLM_CPU_OMP_THREADS_BIND": cores[i]} if cores else {}
            return Service(
                name="inference" if i == 0 else f"inference-{i + 1}",
                argv=[PYTHON, "-m", "services.inference.launch"],
                env={
                    "CRUCIBLE_INFERENCE_PROFILE": self.profile,
                    "CRUCIBLE_INFERENCE_HOST": "127.0.0.1",
                    "CRUCIBLE_INFERENCE_PORT": url.rsplit(":", 1)[1],
                    "CRUCIBLE_INFERENCE_MODELS_DIR": str(self.models_dir),
                    **pinned,
                    **traced,
                },
                url=url,
                ready=lambda: readiness.is_ready(url, profile.served_model_name),
                health=f"{url}/health",
                ready_timeout=600,
                startsecs=10,
            )

        def worker(i: int, port: int) -> Service:
            """A training worker (its /metrics on `port`)."""
            url = f"http://127.0.0.1:{port}"
            return Service(
                name="finetune-worker" if i == 0 else f"finetune-worker-{i + 1}",
                argv=[PYTHON, "-m", "services.finetune.worker"],
                env={
                    "CRUCIBLE_FINETUNE_HOST": "127.0.0.1",
                    "CRUCIBLE_FINETUNE_PORT": str(self.ports.finetune),
                    "CRUCIBLE_FINETUNE_WORKER_METRICS_PORT": str(port),
                    **finetune_env,
                    **traced,
                },
                url=url,
                ready=lambda: _http_ok(f"{url}/metrics"),
                health=f"{url}/metrics",
                ready_timeout=60,
            )

        balancer = Service(
            name="balancer",
            argv=["haproxy", "-db", "-f", str(self.var_dir / "balancer" / "haproxy.cfg")],
            env={},
            url=gateway_url,
            ready=lambda: _http_ok(f"{gateway_url}/health"),
            health=f"tcp://127.0.0.1:{self.ports.gateway}",
            ready_timeout=30,
            prepare=self.write_balancer_config,
        )

        def app(
            name: str, url: str, env: dict[str, str], ready_timeout: float = 60, module: str = ""
        ) -> Service:
            """One of our FastAPI services: `services.<module or name>`, listening where `url`
            says, alive while /health answers, ready when /ready does."""
            module = module or name
            own = {
                f"CRUCIBLE_{module.upper()}_HOST": "127.0.0.1",
                f"CRUCIBLE_{module.upper()}_PORT": url.rsplit(":", 1)[1],
            }
            return Service(
                name=name,
                argv=[PYTHON, "-m", f"services.{module}"],
                env={**own, **traced, **env},
                url=url,
                ready=lambda: _http_ok(f"{url}/ready"),
                health=f"{url}/health",
                ready_url=f"{url}/ready",
                ready_timeout=ready_timeout,
            )

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
                health=f"redis://127.0.0.1:{self.ports.redis}",
                ready_timeout=20,
                startsecs=2,
                adopt_existing=True,
            ),
            Service(
                name="traces",
                argv=[PYTHON, "-m", "services.traces"],
                env={
                    "CRUCIBLE_TRACES_HOST": "127.0.0.1",
                    "CRUCIBLE_TRACES_PORT": str(self.ports.traces),
                },
                url=traces_url,
                ready=lambda: _http_ok(f"{traces_url}/ready"),
                health=f"{traces_url}/health",
                ready_url=f"{traces_url}/ready",
                ready_timeout=30,
            ),
            *(engine(i, url) for i, url in enumerate(engines)),
            Service(
                name="milvus",
                argv=[
                    PYTHON,
                    "-m",
                    "services.milvuslite",
                    "--data-dir",
                    str(milvuslite.database(self.var_dir)),
                    "--port",
                    str(self.ports.milvus),
                ],
                env={},
                url=milvus_url,
                runs_as=milvuslite.server_argv(
                    milvuslite.database(self.var_dir), "127.0.0.1", self.ports.milvus
                ),
                ready=lambda: _port_busy(self.ports.milvus),
                health=f"tcp://127.0.0.1:{self.ports.milvus}",
                ready_timeout=60,
            ),
            app("retrieval", retrieval_url, {"CRUCIBLE_RETRIEVAL_MILVUS_URI": milvus_url}, 120),
            # The workers first: the API is ready only once a worker beats.
            *(worker(i, port) for i, port in enumerate(worker_ports)),
            app("finetune", finetune_url, finetune_env),
            *(app(name, url, gateway_env, module="gateway") for name, url in gateways.items()),
            *([balancer] if self.replicas == 2 else []),
            app(
                "agent",
                agent_url,
                {
                    "CRUCIBLE_AGENT_GATEWAY_URL": gateway_url,
                    "CRUCIBLE_AGENT_RETRIEVAL_URL": retrieval_url,
                },
            ),
            Service(
                name="eval-worker",
                argv=[PYTHON, "-m", "services.finetune.evalworker"],
                env={
                    "CRUCIBLE_FINETUNE_HOST": "127.0.0.1",
                    "CRUCIBLE_FINETUNE_EVAL_WORKER_METRICS_PORT": str(self.ports.eval_worker),
                    "CRUCIBLE_FINETUNE_GATEWAY_URL": gateway_url,
                    "CRUCIBLE_FINETUNE_RETRIEVAL_URL": retrieval_url,
                    **traced,
                },
                url=eval_worker_url,
                ready=lambda: _http_ok(f"{eval_worker_url}/metrics"),
                health=f"{eval_worker_url}/metrics",
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
                health=f"{prometheus_url}/-/healthy",
                ready_timeout=60,
                prepare=self.write_prometheus_config,
                optional=True,
            ),
        ]


def balancer_config(port: int, gateways: list[int]) -> str:
    """HAProxy in front of the gateways: the fewest open requests first, a gateway that stops
    answering /health taken out within 2 s, a request retried on the other only when it could
    not connect (never once sent: a POST that may have arrived is not repeated), and responses
    passed on as they come (a stream's events are not held back)."""
    servers = "\n".join(
        f"  server gateway-{i + 1} 127.0.0.1:{p} check inter 1s fall 2 rise 1"
        for i, p in enumerate(gateways)
    )
    return f"""# Written by the stack (services/stackconfig.py) at each start.
global
  maxconn 8192

defaults
  mode http
  timeout connect 1s
  timeout http-request 35s
  # Longer than the gateway's own deadline (600 s, streams included): the gateway ends them.
  timeout client 660s
  timeout server 660s
  timeout tunnel 660s
  option http-no-delay
  retries 2
  retry-on conn-failure
  option redispatch

frontend crucible
  bind 127.0.0.1:{port}
  default_backend gateways

backend gateways
  balance leastconn
  option httpchk GET /health
  http-check expect status 200
{servers}
"""


def _core_halves(engines: int) -> list[str]:
    """Each of two engines' share of the cores (VLLM_CPU_OMP_THREADS_BIND): two engines on
    the same cores would each run as many threads as there are cores and thrash."""
    if engines < 2:
        return []
    n = os.cpu_count() or 2
    half = max(1, n // 2)
    first = "0" if half == 1 else f"0-{half - 1}"
    second = str(min(half, n - 1)) if n - half <= 1 else f"{half}-{n - 1}"
    return [first, second]


def _redis_ping(port: int) -> bool:
    return probe(f"redis://127.0.0.1:{port}", timeout=1)


def _http_ok(url: str) -> bool:
    return probe(url, timeout=3)


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


_OWNED = ("AGENT", "FINETUNE", "GATEWAY", "INFERENCE", "RETRIEVAL")


def _settings_for(service: str, env: dict[str, str]) -> dict[str, str]:
    """The settings a service reads: CRUCIBLE_<ITS NAME>_* and the shared ones, not another
    service's, so that changing the agent's setting does not restart vLLM."""
    mine = service.split("-")[0].upper()
    owner = {k: k.split("_", 2)[1] if k.count("_") else "" for k in env}
    return {k: v for k, v in env.items() if owner[k] == mine or owner[k] not in _OWNED}

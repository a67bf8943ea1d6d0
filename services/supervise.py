"""The native stack's monitor: the part of supervision that supervisord does not do itself.

supervisord (`services/stack.py` writes its config) starts every service, restarts one that
exits, backs off and gives up (FATAL) when a service keeps exiting during its start. This
program runs under it as an event listener and adds what it lacks:

- restarts counted per service and reason (`exited`, `unhealthy`), kept in `state.json` for
  `make status`, and served as `crucible_stack_restarts_total` for Prometheus;
- a crash-loop limit for services that exit after their start: `crash_exits` exits within
  `crash_window_s` and the service is stopped and reported failed, instead of restarted forever;
- liveness: a running service whose health check fails `health_failures` times in a row (once
  it has passed it since it started, or its start grace is over) is killed, its whole process
  group, so that supervisord restarts it. A service that is up but not ready because a
  dependency is out is left alone: only a process that exited or stopped answering is restarted;
- each service's `/ready` polled on the same beat, so the services' own readiness gauges
  (`crucible_ready_check`) are fresh for the alert as they are under compose's healthchecks.

    python -m services.supervise CONFIG.json [DIGEST]   (supervisord runs it; stdout is its
                                                         protocol)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger("crucible.supervise")


@dataclass(frozen=True)
class Policy:
    crash_exits: int = 5
    crash_window_s: float = 300.0
    health_interval_s: float = 5.0
    health_timeout_s: float = 5.0
    health_failures: int = 3


@dataclass
class Ledger:
    """Restarts and failures per service, from supervisord's state events. Pure: the monitor
    acts on what `event` returns (`"stop"`: the service is in a crash loop)."""

    policy: Policy
    restarts: dict[str, dict[str, int]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    exits: dict[str, deque[float]] = field(default_factory=dict)
    killed_unhealthy: set[str] = field(default_factory=set)

    def event(self, name: str, to: str, frm: str, now: float) -> str | None:
        if to == "STARTING":
            if frm in ("EXITED", "BACKOFF"):
                reason = "unhealthy" if name in self.killed_unhealthy else "exited"
                self.killed_unhealthy.discard(name)
                by = self.restarts.setdefault(name, {})
                by[reason] = by.get(reason, 0) + 1
            else:  # started by someone (`make up`): a fresh chance
                self.failed.pop(name, None)
                self.exits.pop(name, None)
        elif to == "EXITED":
            recent = self.exits.setdefault(name, deque())
            recent.append(now)
            while recent and recent[0] < now - self.policy.crash_window_s:
                recent.popleft()
            if len(recent) >= self.policy.crash_exits:
                self.failed[name] = (
                    f"exited {len(recent)} times in {self.policy.crash_window_s:g} s; "
                    "not restarted again (make up starts it)"
                )
                return "stop"
        elif to == "FATAL":
            self.failed[name] = "kept exiting during its start; supervisord gave up"
        return None

    def total(self, name: str) -> int:
        return sum(self.restarts.get(name, {}).values())

    def as_json(self) -> dict[str, Any]:
        return {"restarts": self.restarts, "failed": self.failed}


class Monitor:
    def __init__(self, config: dict[str, Any]) -> None:
        self.services: dict[str, dict[str, str]] = config["services"]
        self.policy = Policy(**config.get("policy", {}))
        self.state_path = Path(config["state_file"])
        self.ledger = Ledger(self.policy)
        self.lock = threading.Lock()
        self.port = int(config["metrics_port"])

    def collect(self) -> Iterator[Any]:
        """The metrics, read from the ledger at each scrape (a prometheus_client collector)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        restarts = CounterMetricFamily(
            "crucible_stack_restarts",
            "Restarts of the native stack's services, by why (exited, unhealthy).",
            labels=["service", "reason"],
        )
        failed = GaugeMetricFamily(
            "crucible_stack_failed",
            "1 while a service of the native stack is failed (crash loop; not restarted).",
            labels=["service"],
        )
        with self.lock:
            for name in self.services:
                by = self.ledger.restarts.get(name, {})
                for reason in ("exited", "unhealthy"):
                    restarts.add_metric([name, reason], by.get(reason, 0))
                failed.add_metric([name], 1 if name in self.ledger.failed else 0)
        yield restarts
        yield failed

    # --- events (the listener's main loop) ---

    def on_event(self, headers: dict[str, str], payload: str) -> None:
        kind = headers.get("eventname", "")
        if not kind.startswith("PROCESS_STATE_"):
            return
        body = dict(part.split(":", 1) for part in payload.split())
        name, to = body.get("processname", ""), kind.removeprefix("PROCESS_STATE_")
        if name not in self.services:
            return
        with self.lock:
            action = self.ledger.event(name, to, body.get("from_state", ""), time.monotonic())
            self._save()
        if to in ("EXITED", "FATAL", "BACKOFF"):
            log.warning("%s: %s (restarts so far: %d)", name, to.lower(), self.ledger.total(name))
        if action == "stop":
            log.error("%s: %s", name, self.ledger.failed[name])
            try:
                _rpc().supervisor.stopProcess(name, False)
            except Exception as exc:  # it may have stopped on its own meanwhile
                log.warning("%s: stop after crash loop: %s", name, exc)

    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.ledger.as_json()))
        tmp.replace(self.state_path)

    # --- liveness (a thread) ---

    def watch(self) -> None:
        passed: set[int] = set()  # pids that have answered their health check
        fails: dict[int, int] = {}  # pid -> failed checks in a row
        while True:
            time.sleep(self.policy.health_interval_s)
            try:
                infos = {i["name"]: i for i in _rpc().supervisor.getAllProcessInfo()}
            except Exception as exc:  # supervisord is shutting down
                log.info("no process list: %s", exc)
                continue
            for name, spec in self.services.items():
                info = infos.get(name)
                if info and info["statename"] in ("STARTING", "RUNNING") and spec["health"]:
                    self._check(name, spec, int(info["pid"]), int(info["start"]), passed, fails)

    def _check(
        self,
        name: str,
        spec: dict[str, Any],
        pid: int,
        started: int,
        passed: set[int],
        fails: dict[int, int],
    ) -> None:
        if probe(spec["health"], self.policy.health_timeout_s):
            passed.add(pid)
            fails.pop(pid, None)
            if spec["ready"]:
                probe(spec["ready"], self.policy.health_timeout_s)  # refreshes its gauges
            return
        # Counted once it has answered since it started, or once its start grace is over:
        # vLLM takes a minute before it answers at all.
        if pid not in passed and time.time() - started < float(spec["grace_s"]):
            return
        fails[pid] = fails.get(pid, 0) + 1
        limit = self.policy.health_failures
        log.warning("%s: no answer from %s (%d of %d)", name, spec["health"], fails[pid], limit)
        if fails[pid] < limit:
            return
        log.error("%s: not answering; killing it (pid %d) so that it is restarted", name, pid)
        with self.lock:
            self.ledger.killed_unhealthy.add(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # supervisord sees it exit and restarts it

    def serve(self, stdin: TextIO, stdout: TextIO) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        from supervisor import childutils

        self._save()
        registry = CollectorRegistry()
        registry.register(self)
        start_http_server(self.port, addr="127.0.0.1", registry=registry)
        threading.Thread(target=self.watch, name="liveness", daemon=True).start()
        while True:
            headers, payload = childutils.listener.wait(stdin, stdout)
            try:
                self.on_event(headers, payload)
            finally:
                childutils.listener.ok(stdout)


def _rpc() -> Any:
    from supervisor import childutils

    return childutils.getRPCInterface(os.environ)


def probe(target: str, timeout: float) -> bool:
    """http(s)://… answers 200; redis://host:port answers PING; tcp://host:port accepts."""
    scheme, _, rest = target.partition("://")
    try:
        if scheme in ("http", "https"):
            with urllib.request.urlopen(target, timeout=timeout) as resp:  # noqa: S310
                return bool(resp.status == 200)
        host, _, port = rest.partition("/")[0].rpartition(":")
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            if scheme == "redis":
                s.settimeout(timeout)
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
            return True
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    config = json.loads(Path(args[0]).read_text())
    log.info("watching %s (config %s)", ", ".join(config["services"]), args[1:] or "-")
    Monitor(config).serve(sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The native stack: every service as a local background process under supervisord
(`make up/down/logs/status`). What runs is listed in services/stackconfig.py.

    python -m services.stack up|down|status|logs
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from services.stackconfig import (
    PYTHON,
    ROOT,
    Ports,
    Service,
    StackConfig,
    _port_busy,
    _settings_for,
)

__all__ = ["PYTHON", "ROOT", "Ports", "Service", "Stack", "StackConfig", "StackError", "dev_key"]


class StackError(RuntimeError):
    pass


# supervisord's process states, grouped as `make status` tells them.
_UP = {"STARTING", "RUNNING", "BACKOFF", "EXITED"}  # EXITED: about to be restarted


class Stack:
    """The services under supervisord, one per var dir: it restarts what exits (backing off,
    then giving up on a service that keeps exiting during its start), and `services.supervise`
    runs under it to count restarts, stop crash loops and restart what stops answering."""

    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        self.run_dir = self.config.var_dir / "run"
        self.log_dir = self.config.var_dir / "log"
        self.conf_path = self.run_dir / "supervisord.conf"
        self.state_path = self.run_dir / "state.json"

    @property
    def socket_path(self) -> Path:
        path = self.run_dir / "supervisor.sock"
        if len(str(path)) < 100:  # a Unix socket's path has room for ~107 bytes
            return path
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"crucible-{digest}.sock"

    # --- supervisord ---

    def _rpc(self) -> Any:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport)

    def _infos(self) -> dict[str, dict[str, Any]] | None:
        """Each managed process's state, or None when supervisord is not running."""
        if not self.socket_path.exists():
            return None
        try:
            return {i["name"]: i for i in self._rpc().supervisor.getAllProcessInfo()}
        except (OSError, xmlrpc.client.Error):
            return None

    def _supervisord_conf(self) -> str:
        c = configparser.ConfigParser(interpolation=None)
        c["unix_http_server"] = {"file": str(self.socket_path), "chmod": "0700"}
        c["supervisord"] = {
            "logfile": str(self.log_dir / "supervisord.log"),
            "logfile_maxbytes": "10MB",
            "pidfile": str(self.run_dir / "supervisord.pid"),
            "directory": str(ROOT),
            "nodaemon": "false",
            "childlogdir": str(self.log_dir),
            "identifier": "crucible",
        }
        c["rpcinterface:supervisor"] = {
            "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"
        }
        c["supervisorctl"] = {"serverurl": f"unix://{self.socket_path}"}
        watched = {}
        for priority, svc in enumerate(self.config.services(), start=10):
            env = {
                **_settings_for(svc.name, self.config.env),
                "CRUCIBLE_VAR_DIR": str(self.config.var_dir),
                **svc.env,
            }
            # The service writes its own log, as it did before supervision: no process relays
            # the gateway's per-request lines, so a busy supervisord can never stall a service
            # on a full pipe. `exec` keeps the pid supervisord watches the service's own.
            command = [
                *("sh", "-c", 'log=$1; shift; exec "$@" >>"$log" 2>&1', "sh"),
                str(self.log_path(svc.name)),
                *("env", *(f"{k}={v}" for k, v in env.items())),
                *svc.argv,
            ]
            c[f"program:{svc.name}"] = {
                "command": shlex.join(command).replace("%", "%%"),
                "directory": str(ROOT),
                "priority": str(priority),  # started in this order, stopped in reverse
                "autostart": "false",  # `up` starts what it is asked for
                "autorestart": "true",
                "startsecs": f"{svc.startsecs:g}",
                "startretries": "3",  # waits 1, 2, 3 s between tries, then FATAL
                "stopsignal": "TERM",
                "stopwaitsecs": "20",
                "stopasgroup": "true",  # vLLM's engine, Celery's job processes
                "killasgroup": "true",
                "redirect_stderr": "true",
                "stdout_logfile": "NONE",
            }
            watched[svc.name] = {
                "health": svc.health,
                "ready": svc.ready_url,
                "grace_s": svc.ready_timeout,
            }
        monitor = {
            "services": watched,
            "policy": dataclasses.asdict(self.config.policy),
            "state_file": str(self.state_path),
            "metrics_port": self.config.ports.supervisor,
        }
        monitor_path = self.run_dir / "monitor.json"
        text = json.dumps(monitor, indent=1)
        monitor_path.write_text(text)
        # The digest on its command line: a changed monitor.json is a changed program for
        # supervisord, so the next `up` restarts the monitor with it.
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        c["eventlistener:monitor"] = {
            "command": shlex.join([PYTHON, "-m", "services.supervise", str(monitor_path), digest]),
            "directory": str(ROOT),
            "events": "PROCESS_STATE",
            "priority": "1",
            "autostart": "true",
            "autorestart": "true",
            "stdout_logfile": "NONE",  # its stdout is supervisord's event protocol
            "stderr_logfile": str(self.log_path("monitor")),
            "stderr_logfile_maxbytes": "10MB",
            "buffer_size": "100",
        }
        out = io.StringIO()
        c.write(out)
        return out.getvalue()

    def _ensure_supervisord(self, echo: Callable[[str], None]) -> Any:
        """supervisord for this var dir, started or brought up to date with the config."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.config.var_dir / "redis").mkdir(parents=True, exist_ok=True)
        running = self._infos() is not None
        conf = self._supervisord_conf()
        changed = not self.conf_path.exists() or self.conf_path.read_text() != conf
        self.conf_path.touch(mode=0o600)  # settings may hold secrets (a Redis password)
        self.conf_path.write_text(conf)
        rpc = self._rpc()
        if not running:
            # What a supervisord killed outright left running: stopped, then started under this
            # one (else their ports would be "taken by a process `make up` did not start").
            for name in self._down_unsupervised():
                echo(f"{name:<16} was running unsupervised: stopped, to start it supervised")
            self.state_path.unlink(missing_ok=True)  # restarts count from this start
            self.socket_path.unlink(missing_ok=True)
            if _port_busy(self.config.ports.supervisor):
                raise StackError(
                    f"monitor: port {self.config.ports.supervisor} is taken by a process "
                    "`make up` did not start"
                )
            # Daemonizes: the command returns once supervisord runs on its own.
            started = subprocess.run(
                [PYTHON, "-m", "supervisor.supervisord", "-c", str(self.conf_path)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
            )
            if started.returncode:
                raise StackError(f"supervisord did not start:\n{started.stderr[-2000:]}")
            deadline = time.monotonic() + 20
            while self._infos() is None:
                if time.monotonic() > deadline:
                    raise StackError(f"supervisord did not start:\n{self.tail('supervisord')}")
                time.sleep(0.1)
        elif changed:
            # What `supervisorctl update` does: programs whose config changed start afresh.
            [[added, changed_names, removed]] = rpc.supervisor.reloadConfig()
            for name in [*changed_names, *removed]:
                rpc.supervisor.stopProcessGroup(name)
                rpc.supervisor.removeProcessGroup(name)
            for name in [*changed_names, *added]:
                rpc.supervisor.addProcessGroup(name)
        return rpc

    # --- what the CLI and the tests use ---

    def pid(self, name: str) -> int | None:
        info = (self._infos() or {}).get(name)
        return (int(info["pid"]) or None) if info else None

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def up(self, only: list[str] | None = None, echo: Callable[[str], None] = print) -> None:
        """Start every service at once (each waits for its own dependencies), then wait for
        each to be ready in order: the slow engine start overlaps everything else."""
        # The span sink goes with any part: every service sends its spans to it.
        chosen = [
            s for s in self.config.services() if not only or s.name in only or s.name == "traces"
        ]
        missing = {s.name for s in chosen if s.optional and shutil.which(s.argv[0]) is None}
        for name in sorted(missing):
            echo(f"{name:<16} skipped: `{name}` is not installed (make setup installs it)")
        chosen = [s for s in chosen if s.name not in missing]
        rpc = self._ensure_supervisord(echo)
        infos = self._infos() or {}
        adopted = set()
        for svc in chosen:
            if infos[svc.name]["statename"] in _UP:
                continue
            if svc.adopt_existing and svc.ready():
                adopted.add(svc.name)
                continue
            port = int(svc.url.rsplit(":", 1)[1])
            if _port_busy(port):
                raise StackError(
                    f"{svc.name}: port {port} is taken by a process `make up` did not start"
                )
            if svc.prepare is not None:
                svc.prepare()
            rpc.supervisor.startProcess(svc.name, False)
        for svc in chosen:
            if svc.name in adopted:
                echo(f"{svc.name:<16} ready  {svc.url} (already running, not managed)")
                continue
            self._wait_ready(svc)
            echo(f"{svc.name:<16} ready  {svc.url}")

    def _wait_ready(self, svc: Service) -> None:
        deadline = time.monotonic() + svc.ready_timeout
        while time.monotonic() < deadline:
            state = self._state(svc, self._infos(), self._ledger())
            if state == "ready":
                return
            if state in ("failed", "stopped"):
                raise StackError(f"{svc.name} {state} during start:\n{self.tail(svc.name)}")
            time.sleep(0.5)
        raise StackError(
            f"{svc.name} not ready after {svc.ready_timeout:g}s:\n{self.tail(svc.name)}"
        )

    def tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def down(self) -> list[str]:
        """Stop every service (newest first) and supervisord; returns the names stopped."""
        infos = self._infos()
        if infos is None:
            return self._down_unsupervised()
        stopped = [n for n, i in infos.items() if i["statename"] in _UP and n != "monitor"]
        pid = int((self.run_dir / "supervisord.pid").read_text())
        self._rpc().supervisor.shutdown()
        deadline = time.monotonic() + 120  # each service has 20 s to stop, one after another
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [s.name for s in reversed(self.config.services()) if s.name in stopped]

    def _down_unsupervised(self) -> list[str]:
        """Stop this stack's services that run without a supervisord (see `_unsupervised`):
        SIGTERM to each process group, SIGKILL after 20 s."""
        stopped = []
        for name, pgid in self._unsupervised().items():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
                deadline = time.monotonic() + 20
                while _alive(pgid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _alive(pgid):
                    os.killpg(pgid, signal.SIGKILL)
            stopped.append(name)
        return stopped

    def _unsupervised(self) -> dict[str, int]:
        """Services of this stack running with no supervisord, newest first: name -> process
        group. Those a `make up` from before supervision started (var/run/<name>.pid), and those
        that outlived a supervisord killed outright, found by their command and this stack's
        var dir in their environment (every service gets it). Only asked with no supervisord.
        Not Redis, which rewrites both: a Redis left answering on the port is adopted by `up`
        as any running Redis is (`ready (not managed)`)."""
        found: dict[str, int] = {}
        services = list(reversed(self.config.services()))
        for svc in services:
            path = self.run_dir / f"{svc.name}.pid"
            with contextlib.suppress(OSError, ValueError):
                pgid = int(path.read_text())
                path.unlink()
                if _alive(pgid):
                    found[svc.name] = pgid
        mine = str(self.config.var_dir)
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            for svc in services:
                if svc.name in found or cmdline not in (svc.argv, svc.runs_as):
                    continue
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    if proc.environ().get("CRUCIBLE_VAR_DIR") == mine:
                        found[svc.name] = os.getpgid(proc.pid)
        return {s.name: found[s.name] for s in services if s.name in found}

    def down_one(self, name: str) -> bool:
        """Stop one service (it stays stopped until `up`); whether it was running."""
        info = (self._infos() or {}).get(name)
        if info is None or info["statename"] not in _UP:
            return False
        try:
            self._rpc().supervisor.stopProcess(name, True)
        except xmlrpc.client.Fault as exc:  # it exited meanwhile and is being restarted
            if "NOT_RUNNING" not in exc.faultString:
                raise
            return self.down_one(name)
        return True

    def _ledger(self) -> dict[str, Any]:
        """The monitor's state.json: restarts by service and reason, failed services."""
        try:
            return dict(json.loads(self.state_path.read_text()))
        except (OSError, ValueError):
            return {}

    def restarts(self) -> dict[str, int]:
        """Restarts per service since `make up` started supervisord."""
        return {n: sum(by.values()) for n, by in self._ledger().get("restarts", {}).items()}

    def _state(
        self, svc: Service, infos: dict[str, dict[str, Any]] | None, ledger: dict[str, Any]
    ) -> str:
        info = (infos or {}).get(svc.name)
        state = info["statename"] if info else "STOPPED"
        if info and state in _UP:
            if state in ("STARTING", "RUNNING") and svc.ready():
                return "ready"
            if time.time() - int(info["start"]) > svc.ready_timeout:
                return "unready"  # up, but not ready: a dependency it needs is missing
            n = sum(ledger.get("restarts", {}).get(svc.name, {}).values())
            return f"restarting ({n})" if n else "starting"
        if state == "FATAL" or svc.name in ledger.get("failed", {}):
            return "failed"
        if state == "STOPPING":
            return "stopping"
        # A server we did not start (the machine's Redis) that answers is up, not stopped.
        return "ready (not managed)" if svc.adopt_existing and svc.ready() else "stopped"

    def status(self) -> dict[str, str]:
        """Each service's state: ready, ready (not managed), starting, restarting (n), unready,
        failed or stopped."""
        infos, ledger = self._infos(), self._ledger()
        return {svc.name: self._state(svc, infos, ledger) for svc in self.config.services()}

    def explain(self, name: str) -> str:
        """Why a service failed: the monitor's verdict and the last lines of its log."""
        reason = self._ledger().get("failed", {}).get(name, "")
        return "\n".join(x for x in (reason, self.tail(name, 5)) if x)


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
    settings = {
        k: v for k, v in os.environ.items() if k.startswith("CRUCIBLE_") and k != "CRUCIBLE_VAR_DIR"
    }
    # What `up` was asked for last, so that status, logs and down see the same services.
    recorded = StackConfig().var_dir / "run" / "replicas"
    replicas = os.environ.get("CRUCIBLE_REPLICAS") or (
        recorded.read_text().strip() if recorded.is_file() else "1"
    )
    if replicas not in ("1", "2"):
        print(f"CRUCIBLE_REPLICAS is 1 or 2, not {replicas!r}", file=sys.stderr)
        return 2
    stack = Stack(StackConfig(profile=args.profile, env=settings, replicas=int(replicas)))
    if args.command == "up":
        recorded.parent.mkdir(parents=True, exist_ok=True)
        recorded.write_text(replicas + "\n")
        try:
            stack.up(args.services or None)
        except StackError as exc:
            print(f"make up failed: {exc}", file=sys.stderr)
            print(
                "The rest keeps running: `make status`, `make logs`; fix it and `make up` again "
                "(it starts only what is not running), or `make down`.",
                file=sys.stderr,
            )
            return 1
        if not args.services or "gateway" in args.services:
            print(f"API key:   {dev_key(stack.config.var_dir)}")
            print("           export OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=<key>")
        print(f"logs: {stack.log_dir}/ (make logs); stop with `make down`")
    elif args.command == "down":
        stopped = stack.down()
        recorded.unlink(missing_ok=True)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    elif args.command == "status":
        restarts = stack.restarts()
        for name, state in stack.status().items():
            n = restarts.get(name, 0)
            count = f"{n} restart{'s' * (n != 1)}" if n else ""
            print(f"{name:<16} {state:<20} {count}".rstrip())
            if state == "failed":
                print("\n".join(f"{'':<16} | {line}" for line in stack.explain(name).splitlines()))
    else:
        logs = sorted(str(p) for p in stack.log_dir.glob("*.log"))
        if not logs:
            print("no logs yet: run `make up`")
            return 0
        os.execvp("tail", ["tail", "-n", "50", "-F", *logs])  # noqa: S606
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Start vLLM's OpenAI server for a profile, wait until it really serves, then supervise it.

    python -m services.inference.launch --profile cpu-dev [--dry-run] [-- extra vLLM flags]

Every option has an env var (CRUCIBLE_INFERENCE_*), so compose and `make up` run the same
command. The launcher exits with vLLM's status when vLLM exits (vLLM stops itself when its
engine dies), and forwards SIGTERM/SIGINT so a stop is a clean vLLM shutdown. Before it exits
it ends what vLLM left behind in its process group: a worker whose engine was killed outlives
it, holding the device's memory that the restarted engine needs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import psutil

from services.common.logging import configure_logging
from services.inference import profiles, readiness

log = logging.getLogger("crucible.inference.launch")


def _default_python() -> str:
    venv = profiles.ROOT / ".venv-vllm" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description="Launch vLLM for a Crucible profile.")
    p.add_argument("--profile", default=env("CRUCIBLE_INFERENCE_PROFILE", "cpu-dev"))
    p.add_argument("--host", default=env("CRUCIBLE_INFERENCE_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("CRUCIBLE_INFERENCE_PORT", "8000")))
    p.add_argument(
        "--models-dir",
        type=Path,
        default=Path(env("CRUCIBLE_INFERENCE_MODELS_DIR", str(profiles.DEFAULT_MODELS_DIR))),
    )
    p.add_argument("--python", default=env("CRUCIBLE_INFERENCE_VLLM_PYTHON") or _default_python())
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=float(env("CRUCIBLE_INFERENCE_READY_TIMEOUT", "600")),
        help="seconds to wait for health, model list and canary before giving up",
    )
    p.add_argument(
        "--otlp-endpoint",
        default=env("CRUCIBLE_OTLP_ENDPOINT") or None,
        help="where vLLM sends its spans (OTLP/HTTP; the services' setting)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: extra vLLM flags")
    args = p.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        profile = profiles.load(args.profile)
    except profiles.ProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    extra = list(args.extra)
    env = profile.environment()
    if args.otlp_endpoint:
        # vLLM continues the gateway's `traceparent` with a span per request, sent over
        # OTLP/HTTP (its default is gRPC, which the native stack's sink does not speak).
        extra += ["--otlp-traces-endpoint", f"{args.otlp_endpoint.rstrip('/')}/v1/traces"]
        env |= {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "vllm"}
    cmd = profile.command(
        args.python, host=args.host, port=args.port, models_dir=args.models_dir, extra=extra
    )
    if args.dry_run:
        assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
        print(f"{assignments} {shlex.join(cmd)}".strip())
        return 0
    configure_logging("inference")
    model_path = profile.model_path(args.models_dir)
    if not model_path.exists():
        log.error("model folder missing", extra={"path": str(model_path), "hint": _hint(profile)})
        return 2
    return supervise(cmd, env, profile.served_model_name, args)


def _hint(profile: profiles.Profile) -> str:
    if profile.device == "cpu":
        return "run `make setup` to build the dev models"
    return f"download {profile.source} into the models directory (docs/deploy.md)"


def supervise(cmd: list[str], env: dict[str, str], model: str, args: argparse.Namespace) -> int:
    log.info("starting vLLM", extra={"profile": args.profile, "port": args.port})
    proc = subprocess.Popen(cmd, env={**os.environ, **env})

    def forward(signum: int, _: FrameType | None) -> None:
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    started = time.monotonic()
    gave_up = False
    while proc.poll() is None:
        if readiness.is_ready(url, model, timeout=10):
            log.info(
                "ready",
                extra={"url": url, "model": model, "seconds": round(time.monotonic() - started, 1)},
            )
            break
        if time.monotonic() - started > args.ready_timeout:
            log.error("not ready in time; stopping vLLM", extra={"seconds": args.ready_timeout})
            proc.terminate()
            gave_up = True
            break
        time.sleep(1)
    code = proc.wait()
    log.info("vLLM exited", extra={"code": code})
    _end_leftovers()
    return 1 if gave_up else code


def _end_leftovers(grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`, every other process of the launcher's process
    group (supervisord and compose start it as the group's leader; run from a shell it is not,
    and the shell's group is not its to end)."""
    me = os.getpid()
    if os.getpgrp() != me:
        return
    left = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != me and os.getpgid(proc.pid) == me:
                left.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if left:
        log.warning("ended what vLLM left running", extra={"pids": [p.pid for p in left]})


if __name__ == "__main__":
    sys.exit(main())

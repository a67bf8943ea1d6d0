"""Training in a process of its own, started with a scrubbed environment.

The job runner (a Celery child) holds the database URL and the internal token: it claims the
job, reads the training file as its owner and records events. The training itself (the model,
the tokenizer, the user's data) runs here, without either: `run` starts
`python -m services.finetune.trainproc` with an allow-listed environment, sends the spec on its
stdin, and turns the JSON lines it prints (steps, checkpoints, a resume, the result) into the
runner's hooks. A stop (a cancel, a lost claim) is a file the child checks between steps; the
child dies with its parent, so a killed worker never leaves it writing checkpoints beside the
attempt that resumes.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from services.common.config import scrubbed_env
from services.finetune.training import Hooks, TrainResult, TrainSpec, train

# What training needs beyond the base allow-list: the GPU it was given, offline model loading.
TRAINING_ENV = r"CUDA_\w+|NVIDIA_\w+|HF_\w+|TRANSFORMERS_\w+|PYTORCH_\w+|TORCH_\w+|BNB_\w+"


def run(spec: TrainSpec, hooks: Hooks, on_start: Any = None) -> TrainResult:
    """Train `spec` in a child process; the hooks are called here, in this process."""
    with tempfile.TemporaryDirectory(prefix="crucible-train-") as tmp:
        stop, errors = Path(tmp) / "stop", Path(tmp) / "stderr"
        payload = {**asdict(spec), "stop_file": str(stop), "parent": os.getpid()}
        with open(errors, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.finetune.trainproc"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=scrubbed_env(TRAINING_ENV),
                text=True,
            )
        if on_start is not None:
            on_start(proc.pid)
        done = threading.Event()
        watcher = threading.Thread(target=_watch_stop, args=(hooks, stop, done), daemon=True)
        watcher.start()
        result: TrainResult | None = None
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(payload, default=str))
            proc.stdin.close()
            for line in proc.stdout:
                result = _dispatch(json.loads(line), hooks) or result
                if hooks.should_stop is not None and hooks.should_stop():
                    stop.touch()  # at once after a step, not at the watcher's next look
            code = proc.wait()
        finally:
            done.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if code != 0 or result is None:
            tail = errors.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"training process exited with {code}: " + " | ".join(tail))
        return result


def _watch_stop(hooks: Hooks, stop: Path, done: threading.Event) -> None:
    while not done.wait(0.2):
        if hooks.should_stop is not None and hooks.should_stop():
            stop.touch()
            return


def _dispatch(msg: dict[str, Any], hooks: Hooks) -> TrainResult | None:
    if "step" in msg and hooks.on_step is not None:
        hooks.on_step(*msg["step"])
    elif "checkpoint" in msg and hooks.on_checkpoint is not None:
        step, path, values = msg["checkpoint"]
        hooks.on_checkpoint(step, Path(path), values)
    elif "resume" in msg and hooks.on_resume is not None:
        hooks.on_resume(msg["resume"])
    elif "result" in msg:
        r = msg["result"]
        return TrainResult(
            **{**r, "adapter_dir": Path(r["adapter_dir"]) if r["adapter_dir"] else None}
        )
    return None


def _die_with(parent: int) -> None:
    """Linux: SIGKILL this process when `parent` dies (set here, not in a preexec_fn: the
    runner has threads). If it died before this line, leave at once."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return  # not Linux: a killed worker's child finishes its step and finds no one reading
    if os.getppid() != parent:
        sys.exit(1)


def main() -> int:
    # Messages go to the original stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    raw = json.loads(sys.stdin.read())
    _die_with(raw.pop("parent"))
    stop = Path(raw.pop("stop_file"))
    raw["base_model"], raw["output_dir"] = Path(raw["base_model"]), Path(raw["output_dir"])
    spec = TrainSpec(**raw)

    def say(**msg: Any) -> None:
        print(json.dumps(msg, default=str), file=out, flush=True)

    result = train(
        spec,
        Hooks(
            on_step=lambda *a: say(step=list(a)),
            on_checkpoint=lambda step, path, values: say(checkpoint=[step, str(path), values]),
            on_resume=lambda step: say(resume=step),
            should_stop=stop.exists,
        ),
    )
    say(result={**asdict(result), "adapter_dir": str(result.adapter_dir or "") or None})
    return 0


if __name__ == "__main__":
    sys.exit(main())

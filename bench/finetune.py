"""LoRA training throughput through the fine-tuning worker against `train()` called directly,
alternating in one run, and the queue-to-start latency of a job (`make up` first).

    python bench/finetune.py [--gateway http://127.0.0.1:8080] [--rounds 3] [--epochs 40]

Both sides train the same data (tests/data/codewords.jsonl) with the same hyperparameters on
the same base model; tokens/s is the median over every 10th step of trained (non-padding)
tokens per step time, on both sides, so model loading and job startup are excluded (the
worker's are reported apart: queue to running, create to succeeded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import write_result
from services.finetune.training import Hooks, TrainSpec, train
from services.stack import ROOT

DATA = ROOT / "tests" / "data" / "codewords.jsonl"
MODEL = "crucible-dev"


def direct(epochs: int, models: Path) -> float:
    rates: list[float] = []

    def on_step(step: int, total: int, loss: float, n: int, s: float) -> None:
        if step % 10 == 0 or step == total:  # the sample the worker's events carry
            rates.append(n / s)

    examples = [json.loads(line) for line in DATA.read_text().splitlines()]
    with tempfile.TemporaryDirectory() as out:
        train(
            TrainSpec(
                base_model=models / MODEL,
                train=examples,
                output_dir=Path(out),
                n_epochs=epochs,
                batch_size=8,
                learning_rate=1e-3,
                seed=1,
                checkpoint_every=10_000,
            ),
            Hooks(on_step=on_step),
        )
    return statistics.median(rates)


def through_worker(http: httpx.Client, file_id: str, epochs: int) -> dict[str, float]:
    start = time.perf_counter()
    job = http.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": MODEL,
            "training_file": file_id,
            "seed": 1,
            "hyperparameters": {
                "n_epochs": epochs,
                "batch_size": 8,
                "learning_rate_multiplier": 5,
            },
            "crucible": {"checkpoint_every": 10_000},
        },
    ).json()
    started = None
    while True:
        status = http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"]
        if status == "running" and started is None:
            started = time.perf_counter() - start
        if status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.25)  # polling costs the stack CPU the worker needs
    assert status == "succeeded", status
    events = http.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1000}).json()
    steps = [
        e["data"]
        for e in events["data"]
        if e["type"] == "metrics" and e["data"] and "tokens_per_s" in e["data"]
    ]
    # Events carry every 10th step's throughput; the median of those is the worker's rate.
    return {
        "tokens_per_s": statistics.median(d["tokens_per_s"] for d in steps),
        "queue_to_running_s": started or 0.0,
        "create_to_succeeded_s": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gateway", default="http://127.0.0.1:8080")
    p.add_argument("--key-file", type=Path, default=ROOT / "var" / "dev-api-key")
    p.add_argument("--models", type=Path, default=ROOT / "var" / "models")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.epochs = 1, 3
    key = args.key_file.read_text().strip()
    with httpx.Client(
        base_url=args.gateway, timeout=120, headers={"authorization": f"Bearer {key}"}
    ) as http:
        upload = http.post(
            "/v1/files",
            files={"file": (DATA.name, DATA.read_bytes())},
            data={"purpose": "fine-tune"},
        ).json()
        direct_tps, worker_runs = [], []
        for _ in range(args.rounds):
            direct_tps.append(direct(args.epochs, args.models))
            worker_runs.append(through_worker(http, upload["id"], args.epochs))
    worker_tps = [r["tokens_per_s"] for r in worker_runs]
    result: dict[str, Any] = {
        "epochs": args.epochs,
        "steps": args.epochs * 3,
        "direct_tokens_per_s": [round(x) for x in direct_tps],
        "worker_tokens_per_s": [round(x) for x in worker_tps],
        "median_ratio_worker_over_direct": round(
            statistics.median(worker_tps) / statistics.median(direct_tps), 3
        ),
        "queue_to_running_s": [round(r["queue_to_running_s"], 2) for r in worker_runs],
        "create_to_succeeded_s": [round(r["create_to_succeeded_s"], 2) for r in worker_runs],
    }
    path = write_result("finetune", result, args.out)
    print(json.dumps(result, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

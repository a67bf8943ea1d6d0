"""The fine-tuning service's own `train()` on a CUDA GPU: NF4 (QLoRA) and bf16 bases side by side.

    python bench/train_gpu.py [--out FILE] [--adapter-dir DIR]

The end-to-end test's data and hyperparameters (tests/data/codewords.jsonl, 150 epochs, batch 8,
lr 1e-3) on the dev model: seconds, first and last loss, median tokens/s of each. With
`--adapter-dir`, the NF4-trained adapter is copied there, to be loaded into vLLM (a CPU one
will do: `POST /v1/load_lora_adapter`) and asked the trained questions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import write_result
from services.finetune.training import Hooks, TrainSpec, train
from services.stack import ROOT


def main(argv: list[str] | None = None) -> int:
    import bitsandbytes
    import peft
    import torch
    import transformers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "var/models/crucible-dev")
    p.add_argument("--adapter-dir", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark needs one", file=sys.stderr)
        return 1
    examples = [json.loads(line) for line in (ROOT / "tests/data/codewords.jsonl").open()]
    result: dict[str, object] = {
        "gpu": torch.cuda.get_device_name(),
        "versions": {
            "bitsandbytes": bitsandbytes.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
        },
    }
    for name, quantize in (("qlora_nf4", True), ("lora_bf16", False)):
        losses: list[float] = []
        rates: list[float] = []

        def on_step(
            step: int,
            total: int,
            loss: float,
            n: int,
            s: float,
            losses: list[float] = losses,
            rates: list[float] = rates,
        ) -> None:
            losses.append(loss)
            if step > 10:  # past the kernels' warm-up
                rates.append(n / s)

        out = Path(tempfile.mkdtemp(prefix=f"train-gpu-{name}-"))
        start = time.perf_counter()
        run = train(
            TrainSpec(
                base_model=args.model,
                train=examples,
                output_dir=out,
                n_epochs=150,
                batch_size=8,
                learning_rate=1e-3,
                seed=7,
                checkpoint_every=100,
                quantize_4bit=quantize,
            ),
            Hooks(on_step=on_step),
        )
        result[name] = {
            "seconds": round(time.perf_counter() - start, 1),
            "steps": run.steps,
            "loss_first": round(losses[0], 3),
            "loss_last": round(losses[-1], 4),
            "tokens_per_s_median": round(statistics.median(rates)),
        }
        print(name, result[name], flush=True)
        if quantize and args.adapter_dir and run.adapter_dir:
            shutil.copytree(run.adapter_dir, args.adapter_dir, dirs_exist_ok=True)
    write_result("qlora_gpu", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

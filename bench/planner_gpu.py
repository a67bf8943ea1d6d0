"""`crucible plan` against vLLM itself on one GPU (H100-class).

vLLM logs the KV cache it allocates at startup ("GPU KV cache size: N tokens"). For an
8B-class dense and a 30B-class MoE configuration with random weights (`--load-format dummy`: no
weights are downloaded or written), this starts vLLM, reads that line, and sets it beside the
planner's prediction for the same GPU, memory fraction and context. Goal: within 10%.

    python bench/planner_gpu.py [--gpu h100] [--vllm-python .venv-vllm/bin/python] [--out FILE]

Where vLLM cannot be installed (a GPU machine with PyTorch but no package index), `--engine torch`
checks the planner's parts instead, with the same two models built by transformers on the GPU
with random weights: weight bytes (allocated), KV bytes per token (the cache of a real prefill),
the activation peak of one `max_num_batched_tokens` forward and the CUDA context outside
PyTorch's allocator; then the KV tokens vLLM's own accounting would give from those measured
parts (fraction x total - weights - peak - non-torch) beside the planner's prediction.

    python bench/planner_gpu.py --engine torch [--gpu h200]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import write_result
from services.inference import planner
from services.stackconfig import ROOT, _free_port

# Architecture numbers of public models of each class (random weights are enough for memory).
DENSE_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
MOE_30B = json.loads((planner.CONFIGS / "Qwen3-30B-A3B-FP8.json").read_text())
MOE_30B.pop("quantization_config")  # bf16: ~57 GiB of weights, fits one 80 GB card
CASES = {"dense-8b": DENSE_8B, "moe-30b-a3b": MOE_30B}
KV_LINE = re.compile(r"GPU KV cache size: ([\d,]+) tokens")


def model_dir(root: Path, config: dict[str, Any]) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    for f in (ROOT / "var/models/crucible-dev").glob("tokenizer*"):  # any tokenizer will do
        shutil.copy(f, root / f.name)
    return root


def vllm_kv_tokens(python: str, path: Path, fraction: float, max_len: int, log: Path) -> int:
    port = _free_port()
    argv = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(path),
        "--load-format",
        "dummy",
        "--gpu-memory-utilization",
        str(fraction),
        "--max-model-len",
        str(max_len),
        "--port",
        str(port),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if found := KV_LINE.findall(log.read_text(errors="replace")):
                return int(found[-1].replace(",", ""))
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        raise RuntimeError("vLLM did not report its KV cache in 10 minutes")
    finally:
        proc.terminate()
        proc.wait(30)


def torch_parts(path: Path, settings: planner.Settings, prefill: int) -> dict[str, Any]:
    """Measure on the GPU what the planner predicts, part by part, for one model folder."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated() - base
    free, total = torch.cuda.mem_get_info()
    non_torch = (total - free) - torch.cuda.memory_reserved()
    vocab = int(config.get_text_config().vocab_size)
    with torch.no_grad():
        ids = torch.randint(0, vocab, (1, prefill), device="cuda")
        before = torch.cuda.memory_allocated()
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or out.past_key_values
        layers = getattr(cache, "layers", None)
        if layers is not None:
            tensors = [t for layer in layers for t in (layer.keys, layer.values)]
        else:  # transformers 4.x
            tensors = [*cache.key_cache, *cache.value_cache]
        kv_bytes = sum(t.numel() * t.element_size() for t in tensors)
        del out, cache, tensors, layers
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - before < 64 << 20, "the cache was not freed"
        # vLLM's profile run: one batch of max_num_batched_tokens, logits for max_num_seqs rows.
        ids = torch.randint(0, vocab, (1, settings.max_num_batched_tokens), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(ids, use_cache=False, logits_to_keep=min(settings.max_num_seqs, ids.shape[1]))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    del model
    torch.cuda.empty_cache()
    per_token = kv_bytes / prefill
    budget = settings.memory_fraction * total
    tokens = int((budget - weights - peak - non_torch) // per_token)
    return {
        "gpu_total_gib": total / planner.GIB,
        "weights_gib": weights / planner.GIB,
        "kv_bytes_per_token": per_token,
        "activation_peak_gib": peak / planner.GIB,
        "non_torch_gib": non_torch / planner.GIB,
        "kv_tokens": tokens // settings.block_size * settings.block_size,
    }


def compare_parts(gpu: str, settings: planner.Settings, prefill: int) -> dict[str, Any]:
    import torch

    name = torch.cuda.get_device_name()
    results: dict[str, Any] = {"device": name}
    with tempfile.TemporaryDirectory(prefix="planner-gpu-") as d:
        for case, config in CASES.items():
            path = model_dir(Path(d) / case, config)
            shape = planner.Shape.from_config(path / "config.json", case)
            predicted = planner.plan(shape, [gpu], planner.Layout(), settings)
            row = predicted.rows[0]
            measured = torch_parts(path, settings, prefill)
            results[case] = {
                "predicted": {
                    "gpu_total_gib": round(row.total_gib, 2),
                    "weights_gib": round(row.weights_gib, 3),
                    "kv_bytes_per_token": row.kv_bytes_per_token,
                    "runtime_gib": round(row.runtime_gib, 3),
                    "kv_tokens": predicted.kv_tokens,
                },
                "measured": {k: round(v, 3) for k, v in measured.items()},
                "kv_tokens_ratio": round(predicted.kv_tokens / measured["kv_tokens"], 4),
            }
            print(case, json.dumps(results[case]), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpu", default="h100", choices=sorted(planner.GPUS))
    p.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm/bin/python"))
    p.add_argument("--memory-fraction", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--engine", choices=["vllm", "torch"], default="vllm")
    p.add_argument("--prefill", type=int, default=2048, help="torch: tokens of the KV probe")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.engine == "torch":
        settings = planner.Settings(
            memory_fraction=args.memory_fraction,
            max_model_len=args.max_model_len,
            max_num_batched_tokens=args.max_num_batched_tokens,
        )
        parts = compare_parts(args.gpu, settings, args.prefill)
        write_result("planner_gpu_parts", {"gpu": args.gpu, "cases": parts}, args.out)
        ratios = [c["kv_tokens_ratio"] for c in parts.values() if isinstance(c, dict)]
        return 0 if all(abs(r - 1) <= 0.1 for r in ratios) else 1
    results = {}
    with tempfile.TemporaryDirectory(prefix="planner-gpu-") as d:
        for name, config in CASES.items():
            path = model_dir(Path(d) / name, config)
            shape = planner.Shape.from_config(path / "config.json", name)
            settings = planner.Settings(
                memory_fraction=args.memory_fraction, max_model_len=args.max_model_len
            )
            predicted = planner.plan(shape, [args.gpu], planner.Layout(), settings)
            actual = vllm_kv_tokens(
                args.vllm_python,
                path,
                args.memory_fraction,
                args.max_model_len,
                Path(d) / f"{name}.log",
            )
            results[name] = {
                "predicted_kv_tokens": predicted.kv_tokens,
                "vllm_kv_tokens": actual,
                "ratio": round(predicted.kv_tokens / actual, 4),
                "weights_gib": round(predicted.rows[0].weights_gib, 2),
            }
            print(name, results[name], flush=True)
    write_result("planner_gpu", {"gpu": args.gpu, "cases": results}, args.out)
    return 0 if all(abs(r["ratio"] - 1) <= 0.1 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

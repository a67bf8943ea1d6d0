"""QLoRA on one H100-class GPU: an 8B-class configuration with random weights, 4-bit NF4 base,
LoRA r=16 on every linear layer. Reports training tokens/s and peak GPU memory.

    python bench/finetune_gpu.py [--steps 30] [--seq 1024] [--batch 4]

Runs in under five minutes on an H100 (most of it writing and loading the random checkpoint).
Needs a CUDA GPU, torch with CUDA, transformers, peft and bitsandbytes; CI never runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import write_result
from services.finetune.training import ALL_LINEAR

# Llama-3-8B's shape (the public config), with random weights: no download.
CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}


def main(argv: list[str] | None = None) -> int:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark needs one", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        config = LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "architectures"})
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(tmp)
        del model
        torch.cuda.empty_cache()
        written = time.perf_counter() - t0
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        model = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quant, device_map={"": 0}
        )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=ALL_LINEAR,
        ),
    )
    loaded = time.perf_counter() - t0
    import bitsandbytes as bnb

    quantized = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model_gib = torch.cuda.memory_allocated() / 2**30
    model.train()  # from_pretrained leaves eval mode, where gradient checkpointing is off
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.seq), device="cuda")
    times = []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    steady = sorted(times[3:])  # the first steps warm up kernels
    median = steady[len(steady) // 2]
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "config": "Llama-3-8B shape, random weights, NF4 + double quant, LoRA r=16 all linear",
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "median_step_s": round(median, 4),
        "tokens_per_s": round(args.batch * args.seq / median),
        "linear4bit_layers": quantized,
        "model_memory_gib": round(model_gib, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "seconds_to_write_random_checkpoint": round(written, 1),
        "seconds_to_load_4bit": round(loaded - written, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    path = write_result("finetune_gpu", result, args.out)
    print(json.dumps(result, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

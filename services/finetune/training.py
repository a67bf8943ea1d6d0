"""`train(spec)`: LoRA (or QLoRA) supervised fine-tuning of a causal LM, resumable.

A plain function: the Celery worker calls it, and so can a test or a notebook. The loss covers
assistant tokens only (chat format) or the completion (prompt/completion format). The batch
order is a pure function of the seed and the epoch, so a run resumed from a checkpoint sees
exactly the batches it would have seen. Checkpoints are written to a temporary directory and
renamed into place, with a marker file written last: a half-written checkpoint is never loaded.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100
COMPLETE = "COMPLETE"


@dataclass
class TrainSpec:
    base_model: Path
    train: list[dict[str, Any]]
    output_dir: Path  # var/adapters/<job-id>: checkpoints/ and adapter/ go under it
    validation: list[dict[str, Any]] | None = None
    n_epochs: int = 3
    batch_size: int = 8
    learning_rate: float = 2e-4
    seed: int = 0
    lora_rank: int = 16
    lora_alpha: int = 32
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    quantize_4bit: bool = False
    checkpoint_every: int = 50
    max_length: int = 2048
    keep_checkpoints: int = 3  # the newest on disk; older ones are removed as new ones land


@dataclass
class Hooks:
    """Callbacks from the training loop; every one is optional."""

    on_step: Callable[[int, int, float, int, float], None] | None = None  # step, total, loss,
    # tokens, seconds
    on_checkpoint: Callable[[int, Path, dict[str, float]], None] | None = None
    on_resume: Callable[[int], None] | None = None
    should_stop: Callable[[], bool] | None = None


@dataclass
class TrainResult:
    adapter_dir: Path | None  # None when stopped before the end
    steps: int
    trained_tokens: int
    train_loss: float | None
    valid_loss: float | None
    resumed_from: int | None


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer (cached: validation checks every job's file with it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def example_limit(model_dir: Path, max_tokens: int) -> int:
    """The longest example (in tokens) training accepts: the setting, within the model's
    context."""
    config = json.loads((model_dir / "config.json").read_text())
    context = config.get("max_position_embeddings") or max_tokens
    return min(max_tokens, int(context))


def encode_example(
    tokenizer: Any, example: dict[str, Any], max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels: only what the model should learn to say is labelled."""
    if "messages" in example:
        messages = example["messages"]
        ids: list[int] = []
        labels: list[int] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = _template(tokenizer, messages[:i], generation_prompt=True)
            upto = _template(tokenizer, messages[: i + 1], generation_prompt=False)
            if ids[: len(before)] != before[: len(ids)]:
                raise ValueError("the chat template is not prefix-stable")
            labels += [IGNORE] * (len(before) - len(ids)) + upto[len(before) :]
            ids = upto
        if not ids:
            raise ValueError("an example needs at least one assistant message")
    else:
        prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
        completion = [*completion, tokenizer.eos_token_id]
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    if len(ids) > max_length:
        raise ValueError(f"an example has {len(ids)} tokens; the limit is {max_length}")
    return ids, labels


def _template(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    )
    return list(out["input_ids"] if isinstance(out, dict) else out)


def schedule(n_examples: int, batch_size: int, n_epochs: int, seed: int) -> list[list[int]]:
    """Every step's example indices, for the whole run; a pure function of its arguments."""
    import numpy as np

    steps: list[list[int]] = []
    for epoch in range(n_epochs):
        order = np.random.default_rng(seed * 100_003 + epoch).permutation(n_examples).tolist()
        steps += [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]
    return steps


def latest_checkpoint(output_dir: Path) -> Path | None:
    return max(_complete(output_dir), key=_step, default=None)


def prune_checkpoints(output_dir: Path, keep: int) -> list[int]:
    """Remove all but the newest `keep` whole checkpoints (at least one stays, for a resume);
    the steps still on disk."""
    done = sorted(_complete(output_dir), key=_step)
    cut = max(0, len(done) - max(keep, 1))
    for old in done[:cut]:
        shutil.rmtree(old, ignore_errors=True)
    return [_step(p) for p in done[cut:]]


def checkpoint_steps(output_dir: Path) -> list[int]:
    """The steps of the whole checkpoints on disk, oldest first."""
    return sorted(_step(p) for p in _complete(output_dir))


def _complete(output_dir: Path) -> list[Path]:
    return [p for p in (output_dir / "checkpoints").glob("step-*") if (p / COMPLETE).exists()]


def _step(path: Path) -> int:
    return int(path.name.split("-")[1])


def train(spec: TrainSpec, hooks: Hooks | None = None) -> TrainResult:
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    hooks = hooks or Hooks()
    torch.manual_seed(spec.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(spec.base_model))
    model = _load_base(spec, device)
    config = LoraConfig(
        r=spec.lora_rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=0.0,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=spec.learning_rate
    )
    data = [encode_example(tokenizer, e, spec.max_length) for e in spec.train]
    valid = [encode_example(tokenizer, e, spec.max_length) for e in spec.validation or []]
    plan = schedule(len(data), spec.batch_size, spec.n_epochs, spec.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    start_step, resumed = 0, None
    checkpoint = latest_checkpoint(spec.output_dir)
    if checkpoint is not None:
        set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        start_step = resumed = int(checkpoint.name.split("-")[1])
        if hooks.on_resume:
            hooks.on_resume(start_step)

    model.train()
    trained_tokens, loss_value = 0, None
    for step in range(start_step + 1, len(plan) + 1):
        if hooks.should_stop and hooks.should_stop():
            return TrainResult(None, step - 1, trained_tokens, loss_value, None, resumed)
        began = time.perf_counter()
        ids, labels, mask = _batch([data[i] for i in plan[step - 1]], pad, device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        tokens = int(mask.sum())
        trained_tokens += tokens
        if hooks.on_step:
            hooks.on_step(step, len(plan), loss_value, tokens, time.perf_counter() - began)
        if step % spec.checkpoint_every == 0 and step < len(plan):
            metrics = {"train_loss": loss_value}
            if valid:
                metrics["valid_loss"] = _valid_loss(model, valid, pad, device, spec.batch_size)
            path = _save_checkpoint(model, optimizer, spec.output_dir, step)
            prune_checkpoints(spec.output_dir, spec.keep_checkpoints)
            if hooks.on_checkpoint:
                hooks.on_checkpoint(step, path, metrics)
    valid_loss = _valid_loss(model, valid, pad, device, spec.batch_size) if valid else None
    adapter = spec.output_dir / "adapter"
    _atomic_dir(adapter, lambda tmp: model.save_pretrained(str(tmp)))
    return TrainResult(adapter, len(plan), trained_tokens, loss_value, valid_loss, resumed)


def _load_base(spec: TrainSpec, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if spec.quantize_4bit:
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(spec.base_model),
            quantization_config=quant,
            device_map={"": 0} if device == "cuda" else {"": "cpu"},
        )
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(spec.base_model), dtype=dtype)
    return model.to(device)  # type: ignore[arg-type]


def _batch(examples: list[tuple[list[int], list[int]]], pad: int, device: str) -> Any:
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = [x + [pad] * (width - len(x)) for x, _ in examples]
    labels = [y + [IGNORE] * (width - len(y)) for _, y in examples]
    mask = [[1] * len(x) + [0] * (width - len(x)) for x, _ in examples]
    return (
        torch.tensor(ids, device=device),
        torch.tensor(labels, device=device),
        torch.tensor(mask, device=device),
    )


def _valid_loss(
    model: Any, data: list[tuple[list[int], list[int]]], pad: int, device: str, batch_size: int
) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            ids, labels, mask = _batch(data[i : i + batch_size], pad, device)
            n = int((labels[:, 1:] != IGNORE).sum())
            total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
            count += n
    model.train()
    return total / max(count, 1)


def _save_checkpoint(model: Any, optimizer: Any, output_dir: Path, step: int) -> Path:
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(get_peft_model_state_dict(model), str(tmp / "adapter_model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        (tmp / COMPLETE).write_text("")  # last: marks the checkpoint whole

    path = output_dir / "checkpoints" / f"step-{step:06d}"
    _atomic_dir(path, write)
    return path


def _atomic_dir(final: Path, write: Callable[[Path], Any]) -> None:
    """Write a directory next to its final place, then rename it there (one syscall)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def auto_epochs(n_examples: int) -> int:
    """OpenAI's "auto": small datasets get more passes (here: about 400 examples seen at least,
    3 to 300 epochs)."""
    return max(3, min(300, math.ceil(400 / max(n_examples, 1))))

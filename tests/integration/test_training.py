"""`train()` on the real dev model: a resumed run ends where an uninterrupted one does, and the
QLoRA (4-bit NF4) path trains on the CPU too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from services.finetune.training import Hooks, TrainSpec, latest_checkpoint, train
from tests.conftest import MODELS, ROOT

EXAMPLES = [json.loads(line) for line in (ROOT / "tests/data/codewords.jsonl").open()]


def spec(out: Path, **kw: Any) -> TrainSpec:
    base: dict[str, Any] = {
        "n_epochs": 2,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "seed": 5,
        "checkpoint_every": 3,
    }
    return TrainSpec(
        base_model=MODELS / "crucible-dev", train=EXAMPLES, output_dir=out, **{**base, **kw}
    )


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_a_run_stopped_and_resumed_ends_where_an_uninterrupted_run_does(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    train(spec(whole))
    interrupted = tmp_path / "interrupted"
    steps: list[int] = []
    first = train(
        spec(interrupted),
        Hooks(on_step=lambda s, *_: steps.append(s), should_stop=lambda: len(steps) >= 4),
    )
    assert first.adapter_dir is None and first.steps == 4  # stopped after step 4
    checkpoint = latest_checkpoint(interrupted)
    assert checkpoint is not None and checkpoint.name == "step-000003"
    resumed_at: list[int] = []
    second = train(spec(interrupted), Hooks(on_resume=resumed_at.append))
    assert resumed_at == [3] and second.resumed_from == 3 and second.steps == 6
    a, b = weights(whole), weights(interrupted)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_qlora_trains_a_4bit_base_on_the_cpu(tmp_path: Path) -> None:
    losses: list[float] = []
    result = train(
        spec(tmp_path, quantize_4bit=True),
        Hooks(on_step=lambda s, t, loss, *_: losses.append(loss)),
    )
    assert result.adapter_dir is not None and result.steps == 6
    assert all(0 < x < 20 for x in losses) and losses[-1] < losses[0]
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 16 and "q_proj" in config["target_modules"]


def test_validation_loss_is_reported_at_checkpoints_and_at_the_end(tmp_path: Path) -> None:
    seen: dict[int, dict[str, float]] = {}
    result = train(
        spec(tmp_path, validation=EXAMPLES[:4]),
        Hooks(on_checkpoint=lambda step, _path, m: seen.update({step: m})),
    )
    assert result.valid_loss is not None and result.valid_loss > 0
    assert set(seen) == {3} and seen[3]["valid_loss"] > 0

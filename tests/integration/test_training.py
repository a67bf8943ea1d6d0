"""`train()` on the real dev model: a resumed run ends where an uninterrupted one does, and the
QLoRA (4-bit NF4) path trains on the CPU too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
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


def test_only_the_last_checkpoints_are_kept_on_disk(tmp_path: Path) -> None:
    """Every checkpoint holds the adapter and the optimizer's state: a long job checkpointing
    often would fill the disk. The newest `keep_checkpoints` stay (a resume needs one)."""
    saved: list[int] = []
    result = train(
        spec(tmp_path, checkpoint_every=1, keep_checkpoints=2),
        Hooks(on_checkpoint=lambda step, *_: saved.append(step)),
    )
    assert result.adapter_dir is not None and saved == [1, 2, 3, 4, 5]
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-000004", "step-000005"]


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


def test_the_training_process_holds_no_token_or_database_url_and_stops_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the job runner runs: training in a child started with a scrubbed environment,
    reporting through the same hooks, and stopping between steps when the runner says so."""
    from services.finetune import trainproc

    monkeypatch.setenv("CRUCIBLE_INTERNAL_TOKEN", "canary-internal-token")
    monkeypatch.setenv("CRUCIBLE_FINETUNE_DATABASE_URL", "postgresql://u:canary-pw@db/jobs")
    pid: list[int] = []
    environ: list[bytes] = []
    steps: list[int] = []
    checkpoints: list[int] = []

    def on_step(step: int, *_: Any) -> None:
        steps.append(step)
        if not environ:
            environ.append(Path(f"/proc/{pid[0]}/environ").read_bytes())

    stopped = trainproc.run(
        spec(tmp_path / "stopped", n_epochs=20),
        Hooks(on_step=on_step, should_stop=lambda: len(steps) >= 2),
        on_start=pid.append,
    )
    assert stopped.adapter_dir is None and 2 <= stopped.steps < 10  # of 60
    assert b"PATH=" in environ[0] and b"canary" not in environ[0]
    steps.clear()
    whole = trainproc.run(
        spec(tmp_path / "whole"),
        Hooks(on_step=on_step, on_checkpoint=lambda s, *_: checkpoints.append(s)),
    )
    assert whole.adapter_dir == tmp_path / "whole" / "adapter" and whole.steps == 6
    assert steps == [1, 2, 3, 4, 5, 6] and checkpoints == [3]
    in_process = train(spec(tmp_path / "in-process"))  # the same run, without the child
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "in-process")
    assert in_process.steps == 6 and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

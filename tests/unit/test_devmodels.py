"""The dev models: reproducible bytes, a working tokenizer and chat template, fast no-op rebuild."""

from pathlib import Path

import pytest

from services.inference import devmodels


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    for root in (a, b):
        for model in devmodels.MODELS:
            assert devmodels.build(model, root) is True
    return a, b


def test_two_builds_have_identical_checksums(two_builds: tuple[Path, Path]) -> None:
    a, b = two_builds
    for model in devmodels.MODELS:
        sums = devmodels.checksums(a / model.name)
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(sums)
        assert sums == devmodels.checksums(b / model.name)


def test_an_unchanged_rebuild_is_skipped(two_builds: tuple[Path, Path]) -> None:
    a, _ = two_builds
    before = (a / "crucible-dev" / "model.safetensors").stat().st_mtime_ns
    assert devmodels.build(devmodels.MODELS[0], a) is False
    assert (a / "crucible-dev" / "model.safetensors").stat().st_mtime_ns == before


def test_tokenizer_round_trips_text_and_renders_chatml(two_builds: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(two_builds[0] / "crucible-dev")
    text = "Caffeine is Cn1cnc2c1c(=O)n(C)c(=O)n2C — ünïcode too."
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_moe_model_has_eight_experts_top_two(two_builds: tuple[Path, Path]) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(two_builds[0] / "crucible-dev-moe")
    assert cfg.model_type == "qwen3_moe"
    assert cfg.num_experts == 8 and cfg.num_experts_per_tok == 2 and cfg.head_dim == 64

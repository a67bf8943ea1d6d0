"""The memory planner's arithmetic on the shipped GPU profiles' models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from services.cli import main as crucible
from services.inference import planner, profiles
from services.inference.planner import GIB, Layout, Settings, Shape

CONFIGS = planner.CONFIGS


def shape(name: str) -> Shape:
    return Shape.from_config(CONFIGS / f"{name}.json", name)


def test_parameter_counts_match_the_published_sizes() -> None:
    assert shape("Qwen3-32B").total_params() / 1e9 == pytest.approx(32.8, abs=0.1)
    assert shape("Qwen3-30B-A3B-FP8").total_params() / 1e9 == pytest.approx(30.5, abs=0.1)


def test_kv_bytes_per_token_from_layers_heads_and_dtype() -> None:
    dense = shape("Qwen3-32B")  # 64 layers x 8 KV heads x 128 x (K and V) x 2 bytes
    assert planner.kv_bytes_per_token(dense, Layout(), 64, 2) == 256 * 1024
    assert planner.kv_bytes_per_token(dense, Layout(tp=2), 64, 2) == 128 * 1024
    assert planner.kv_bytes_per_token(dense, Layout(tp=16), 64, 2) == 32 * 1024  # replicated
    mla = replace(dense, kv_latent=512 + 64)
    assert planner.kv_bytes_per_token(mla, Layout(tp=8), 61, 2) == 61 * 576 * 2


def test_experts_are_split_across_expert_parallel_ranks() -> None:
    moe = shape("Qwen3-30B-A3B-FP8")
    layers = range(moe.layers)
    ep = planner.weights_bytes(moe, Layout(tp=2, ep=True), layers, True, True)
    alone = planner.weights_bytes(moe, Layout(), layers, True, True)
    assert ep == pytest.approx(alone / 2, rel=0.02)
    assert alone / GIB == pytest.approx(30.5e9 / GIB, rel=0.05)  # FP8: ~1 byte a parameter


def test_the_shipped_ep_profile_fits_and_the_5090_bounds_the_pair() -> None:
    s, gpus, layout, settings = planner.from_profile(profiles.load("gpu-ep"), Path("/none"))
    assert gpus == ["5090", "pro6000"] and layout == Layout(tp=2, ep=True)
    plan = planner.plan(s, gpus, layout, settings)
    assert plan.fits
    small, big = plan.rows
    assert big.kv_tokens > 5 * small.kv_tokens
    assert plan.kv_tokens == small.kv_tokens  # the same block count on every rank
    assert plan.concurrent_sequences >= 4


def test_bf16_weights_do_not_fit_the_5090_and_the_plan_says_by_how_much() -> None:
    s, gpus, layout, settings = planner.from_profile(profiles.load("gpu-ep"), Path("/none"))
    plan = planner.plan(replace(s, quant=None), gpus, layout, settings)
    assert not plan.fits
    [problem] = plan.problems
    assert problem.startswith("RTX 5090 (#0)") and "GiB more than its" in problem
    titles = {
        p.title.split(",")[0]: p
        for p in planner.alternatives(replace(s, quant=None), gpus, layout, settings)
    }
    assert titles["RTX Pro 6000 alone"].fits
    assert titles["fp8 weights"].fits
    split = next(p for t, p in titles.items() if t.startswith("pipeline"))
    assert split.fits and split.kv_tokens > titles["RTX Pro 6000 alone"].kv_tokens
    a, b = map(int, split.flags["env VLLM_PP_LAYER_PARTITION"].split(","))
    assert a + b == s.layers and a < b  # fewer layers on the smaller card


def test_single_gpu_profile_matches_its_own_comment() -> None:
    s, gpus, layout, settings = planner.from_profile(profiles.load("gpu-single"), Path("/none"))
    plan = planner.plan(s, gpus, layout, settings)
    [row] = plan.rows
    assert plan.fits and row.weights_gib == pytest.approx(61.1, abs=1.0)  # 32.8B x 2 bytes
    assert row.kv_bytes_per_token == 256 * 1024


def test_a_too_long_context_is_refused_with_the_gpu_named() -> None:
    s = shape("Qwen3-32B")
    plan = planner.plan(s, ["5090"], Layout(), Settings(max_model_len=8192))
    assert not plan.fits and "RTX 5090" in plan.problems[0]


def test_cpu_profiles_use_the_kv_space_vllm_is_given() -> None:
    s, _, layout, settings = planner.from_profile(profiles.load("cpu-dev"), Path("var/models"))
    plan = planner.plan(s, [], layout, settings)
    # 2 layers x 1 KV head x 64 dims x (K and V) x 4 bytes (float32) = 1 KiB a token.
    assert plan.rows[0].kv_bytes_per_token == 1024 and plan.kv_tokens == 1 << 20


def test_the_cli_prints_the_table_the_verdict_and_the_alternatives(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert crucible(["plan", "--profile", "gpu-ep"]) == 0
    out = capsys.readouterr().out
    assert "RTX 5090 (#0)" in out and "RTX Pro 6000 (#1)" in out and "FITS" in out
    assert "Alternatives:" in out and "VLLM_PP_LAYER_PARTITION" in out
    bf16 = json.loads((CONFIGS / "Qwen3-30B-A3B-FP8.json").read_text())
    del bf16["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(bf16))
    argv = ["plan", "--model", str(tmp_path), "--gpus", "5090,pro6000", "--tp", "2", "--ep"]
    assert crucible([*argv, "--max-model-len", "32768"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out

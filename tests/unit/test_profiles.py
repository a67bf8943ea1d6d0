from pathlib import Path

import pytest

from services.inference import launch, profiles


def test_every_shipped_profile_loads_with_a_served_name() -> None:
    names = profiles.available()
    assert {"cpu-dev", "cpu-dev-moe", "gpu-single", "gpu-ep"} <= set(names)
    for name in names:
        p = profiles.load(name)
        assert p.served_model_name and p.device in ("cpu", "cuda")


def test_cpu_dev_command_enables_runtime_lora_with_several_slots() -> None:
    p = profiles.load("cpu-dev")
    cmd = p.command("py", host="127.0.0.1", port=8123, models_dir=Path("/m"))
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == "/m/crucible-dev"
    assert cmd[cmd.index("--port") + 1] == "8123"
    assert "--enable-lora" in cmd and int(cmd[cmd.index("--max-loras") + 1]) > 1
    assert p.environment()["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_gpu_ep_spans_both_gpus_with_expert_parallel_and_no_p2p() -> None:
    p = profiles.load("gpu-ep")
    cmd = p.command("py", host="0.0.0.0", port=8000, models_dir=Path("/models"))
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    for flag in ("--enable-expert-parallel", "--enable-prefix-caching", "--enable-lora"):
        assert flag in cmd
    env = p.environment()
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["NCCL_P2P_DISABLE"] == "1"


def test_flags_render_booleans_lists_and_values() -> None:
    assert profiles._flag("enforce-eager", True) == ["--enforce-eager"]
    assert profiles._flag("enforce-eager", False) == []
    assert profiles._flag("x", [1, 2]) == ["--x", "1", "2"]
    assert profiles._flag("x", {"a": 1}) == ["--x", '{"a":1}']


def test_unknown_profile_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("model: m\nserved_model_name: m\ndevice: cpu\nvlm: {}\n")
    with pytest.raises(profiles.ProfileError, match="unknown keys"):
        profiles.load("bad", tmp_path)


def test_unknown_profile_names_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(["--profile", "nope", "--dry-run"]) == 2
    assert "cpu-dev" in capsys.readouterr().err


def test_dry_run_prints_env_then_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(["--profile", "cpu-dev-moe", "--port", "9001", "--dry-run"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 ")
    assert "--served-model-name crucible-dev-moe" in out and "--port 9001" in out


def test_launch_refuses_a_missing_model_folder(tmp_path: Path) -> None:
    assert launch.main(["--profile", "cpu-dev", "--models-dir", str(tmp_path)]) == 2

"""A peft adapter for crucible-dev, loaded into the running vLLM at run time."""

from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import DENSE, MODELS

PROMPTS = ["The pH of a solution is", "Aspirin is", "A catalyst lowers"]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(MODELS / DENSE, dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=32,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        # Random A and B (peft's default B=0 would make the adapter a no-op).
        init_lora_weights=False,
    )
    model = get_peft_model(base, config)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(out))
    return out


def _greedy(client: openai.OpenAI, model: str) -> list[str]:
    return [
        client.completions.create(model=model, prompt=p, max_tokens=12, temperature=0)
        .choices[0]
        .text
        for p in PROMPTS
    ]


def test_runtime_lora_is_listed_and_answers_differently(
    inference_url: str, vllm_client: openai.OpenAI, adapter_dir: Path
) -> None:
    r = httpx.post(
        f"{inference_url}/v1/load_lora_adapter",
        json={"lora_name": "test-adapter", "lora_path": str(adapter_dir)},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert "test-adapter" in [m.id for m in vllm_client.models.list()]
    base, tuned = _greedy(vllm_client, DENSE), _greedy(vllm_client, "test-adapter")
    assert base != tuned
    # And the base model is unchanged by the adapter being loaded.
    assert _greedy(vllm_client, DENSE) == base

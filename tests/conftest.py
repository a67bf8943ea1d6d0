"""Fixtures shared by every test. Slow, real processes (vLLM ~45 s) start once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from services.stack import Ports, Stack, StackConfig

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "var" / "models"
DENSE = "crucible-dev"
MOE = "crucible-dev-moe"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The native stack on free ports with its own var dir, so it never meets a `make up` stack."""
    config = StackConfig(
        var_dir=tmp_path_factory.mktemp("stack-var"), ports=Ports.free(), models_dir=MODELS
    )
    s = Stack(config)
    try:
        yield s
    finally:
        s.down()


@pytest.fixture(scope="session")
def inference_url(stack: Stack) -> str:
    stack.up(["inference"], echo=lambda _: None)
    return f"http://127.0.0.1:{stack.config.ports.inference}"


@pytest.fixture(scope="session")
def vllm_client(inference_url: str) -> Iterator[openai.OpenAI]:
    """The official SDK pointed straight at vLLM (no gateway), for the inference tests."""
    client = openai.OpenAI(base_url=f"{inference_url}/v1", api_key="unused", max_retries=0)
    yield client
    client.close()

"""Fixtures shared by every test. Slow, real processes (vLLM ~45 s) start once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from services.gateway.keys import KeyStore
from services.stack import Ports, Stack, StackConfig, dev_key

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "var" / "models"
DENSE = "crucible-dev"
MOE = "crucible-dev-moe"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The native stack on free ports with its own var dir (and its own Redis), so it never
    meets a developer's `make up` stack."""
    config = StackConfig(
        var_dir=tmp_path_factory.mktemp("stack-var"),
        ports=Ports.free(),
        models_dir=MODELS,
        scrape_interval="1s",  # Prometheus sees the tests' traffic within seconds
        env={
            # The cost model at exactly $1 per engine-second, and a hosted price list of $1 and
            # $2 per input and output token, so costs are checked to the cent (test_usage.py).
            "CRUCIBLE_FINETUNE_COST_HOSTING_USD_MONTH": "2629800",
            "CRUCIBLE_FINETUNE_COST_HOSTED_PRICES": '{"*": {"input": 1e6, "output": 2e6}}',
            # Vector store storage recorded every 3 s, so its usage shows within the test.
            "CRUCIBLE_FINETUNE_USAGE_SNAPSHOT_EVERY_S": "3",
            "CRUCIBLE_FINETUNE_USAGE_RUNS_EVERY_S": "2",
        },
    )
    s = Stack(config)
    try:
        yield s
    finally:
        s.down()


@pytest.fixture(scope="session")
def redis_url(stack: Stack) -> str:
    stack.up(["redis"], echo=lambda _: None)
    return f"redis://127.0.0.1:{stack.config.ports.redis}/0"


@pytest.fixture(scope="session")
def inference_url(stack: Stack) -> str:
    stack.up(["redis", "inference"], echo=lambda _: None)
    return f"http://127.0.0.1:{stack.config.ports.inference}"


@pytest.fixture(scope="session")
def vllm_client(inference_url: str) -> Iterator[openai.OpenAI]:
    """The official SDK pointed straight at vLLM (no gateway), for the inference tests."""
    client = openai.OpenAI(base_url=f"{inference_url}/v1", api_key="unused", max_retries=0)
    yield client
    client.close()


@pytest.fixture(scope="session")
def gateway_url(stack: Stack, inference_url: str) -> str:
    stack.up(echo=lambda _: None)
    return f"http://127.0.0.1:{stack.config.ports.gateway}"


@pytest.fixture(scope="session")
def admin_key(stack: Stack, gateway_url: str) -> str:
    return dev_key(stack.config.var_dir)


@pytest.fixture(scope="session")
def keys(stack: Stack, gateway_url: str) -> Iterator[KeyStore]:
    """Direct access to the stack gateway's key database (as `crucible keys` has)."""
    store = KeyStore(f"sqlite:///{stack.config.var_dir / 'gateway.db'}")
    yield store
    store.engine.dispose()


@pytest.fixture(scope="session")
def client(gateway_url: str, admin_key: str) -> Iterator[openai.OpenAI]:
    """The official SDK through the gateway, as a researcher uses it."""
    c = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=admin_key, max_retries=0)
    yield c
    c.close()


def planner_vs_vllm(stack: Stack) -> tuple[int, int]:
    """(tokens `crucible plan` predicts, tokens vLLM logged) for the stack's KV cache."""
    import re

    from services.inference import planner, profiles

    logged = re.findall(r"KV cache size: ([\d,]+) tokens", stack.log_path("inference").read_text())
    assert logged, "vLLM did not log its KV cache size"
    profile = profiles.load(stack.config.profile)
    shape, gpus, layout, settings = planner.from_profile(profile, stack.config.models_dir)
    predicted = planner.plan(shape, gpus, layout, settings).kv_tokens
    return predicted, int(logged[-1].replace(",", ""))

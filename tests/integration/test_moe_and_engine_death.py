"""The cpu-dev-moe profile serves; a dead engine is noticed and restarted; `down` leaves no process
behind."""

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator

import openai
import psutil
import pytest

from bench import structured_outputs as structured
from services.inference import readiness
from services.stack import Ports, Stack, StackConfig
from tests.conftest import MODELS, MOE, planner_vs_vllm


@pytest.fixture(scope="module")
def moe_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = StackConfig(
        var_dir=tmp_path_factory.mktemp("moe-var"),
        ports=Ports.free(),
        profile="cpu-dev-moe",
        models_dir=MODELS,
    )
    stack = Stack(config)
    try:
        stack.up(["inference"], echo=lambda _: None)
        yield stack
    finally:
        stack.down()


def _url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.config.ports.inference}"


def test_moe_profile_serves_chat(moe_stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{_url(moe_stack)}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MOE]
    r = client.chat.completions.create(
        model=MOE, messages=[{"role": "user", "content": "Name a solvent."}], max_tokens=5
    )
    assert r.usage is not None and r.usage.completion_tokens == 5


def test_three_hundred_moe_json_schema_answers_are_strictly_valid_json(moe_stack: Stack) -> None:
    counts = asyncio.run(structured.answers(_url(moe_stack), MOE, 300, 16))
    assert counts["error"] == 0 and counts["finished"] >= 250, counts
    assert counts["not_strict_json"] == counts["not_schema"] == 0, counts


def test_the_planner_predicts_the_moe_kv_cache_vllm_allocates(moe_stack: Stack) -> None:
    predicted, actual = planner_vs_vllm(moe_stack)
    assert abs(predicted - actual) <= 0.1 * actual, (predicted, actual)


def _engine_core(launcher_pid: int) -> psutil.Process:
    for child in psutil.Process(launcher_pid).children(recursive=True):
        if any("EngineCore" in part for part in child.cmdline()[:1]) or "EngineCor" in child.name():
            return child
    raise AssertionError("no EngineCore process under the launcher")


def _alive(pids: set[int]) -> list[int]:
    alive = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
    return alive


def test_killing_the_engine_fails_readiness_restarts_it_and_down_leaves_nothing(
    moe_stack: Stack,
) -> None:
    launcher = moe_stack.pid("inference")
    assert launcher is not None and readiness.is_ready(_url(moe_stack), MOE)
    group = {p.pid for p in psutil.Process(launcher).children(recursive=True)} | {launcher}
    os.kill(_engine_core(launcher).pid, signal.SIGKILL)
    start = time.monotonic()
    while readiness.is_ready(_url(moe_stack), MOE, timeout=3):
        assert time.monotonic() - start < 15, "still ready 15 s after the engine died"
        time.sleep(0.5)
    # The launcher notices too: it exits with vLLM instead of lingering as a zombie service,
    # and the stack starts a new one.
    deadline = time.monotonic() + 30
    while moe_stack.pid("inference") in (None, launcher) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert moe_stack.pid("inference") not in (None, launcher)
    assert moe_stack.restarts() == {"inference": 1}
    # Nothing of the dead engine outlives its launcher: an orphaned worker would hold the
    # device's memory that the new engine needs.
    assert not _alive(group)
    group |= {moe_stack.pid("inference") or 0}
    moe_stack.down()  # mid-start: the new engine is loading
    assert not _alive(group)
    assert moe_stack.status()["inference"] == "stopped"

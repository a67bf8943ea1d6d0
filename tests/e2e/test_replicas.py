"""CRUCIBLE_REPLICAS=2 as `make up` runs it, on a stack of its own (these tests kill its parts):
two gateways behind HAProxy, two vLLM servers, two training workers, one Redis, one Milvus and
one PostgreSQL database, reached through the balancer with the official openai client."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from services.finetune.jobs import JobStore
from services.gateway.keys import KeyStore
from services.stack import Ports, Stack, StackConfig
from tests.conftest import DENSE, MODELS
from tests.finetuning import create_job, wait_job
from tests.metrics import counted
from tests.processes import postgres_database

PARTS = [
    "redis",
    "inference",
    "inference-2",
    "milvus",
    "retrieval",
    "finetune-worker",
    "finetune-worker-2",
    "finetune",
    "gateway",
    "gateway-2",
    "balancer",
]


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """PostgreSQL, as a lab's several processes share it (one fresh database for all services,
    as compose gives them one)."""
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory, database: str) -> Iterator[Stack]:
    config = StackConfig(
        var_dir=tmp_path_factory.mktemp("replicas-var"),
        ports=Ports.free(),
        models_dir=MODELS,
        replicas=2,
        env={
            **{
                f"CRUCIBLE_{service}_DATABASE_URL": database
                for service in ("GATEWAY", "RETRIEVAL", "FINETUNE", "AGENT")
            },
            # A silent worker's job is resumed after 6 s instead of 15: the test waits less.
            "CRUCIBLE_FINETUNE_STALE_AFTER_S": "6",
        },
    )
    stack = Stack(config)
    try:
        stack.up(PARTS, echo=lambda _: None)
        # Each gateway learns an engine is up at its next probe (every 5 s): wait for both.
        ports = config.ports
        gateways = (ports.gateway_1, ports.gateway_2)
        deadline = time.monotonic() + 30
        while not all(_engines_up(g) == 2 for g in gateways):
            assert time.monotonic() < deadline, "the gateways never saw both engines up"
            time.sleep(0.5)
        yield stack
    finally:
        stack.down()


def _engines_up(gateway_port: int) -> int:
    text = httpx.get(f"http://127.0.0.1:{gateway_port}/metrics", timeout=10).text
    return sum(
        line.startswith("crucible_gateway_backend_up{") and line.endswith(" 1.0")
        for line in text.splitlines()
    )


@pytest.fixture(scope="module")
def client(replicated: Stack, database: str) -> Iterator[openai.OpenAI]:
    keys = KeyStore(database)
    secret, _ = keys.create("replicas", admin=True, rpm=0, max_concurrency=256)
    keys.engine.dispose()
    c = openai.OpenAI(
        base_url=f"http://127.0.0.1:{replicated.config.ports.gateway}/v1",
        api_key=secret,
        max_retries=0,
    )
    yield c
    c.close()


def _served(port: int) -> float:
    """Requests the vLLM server on `port` has finished."""
    return counted(f"http://127.0.0.1:{port}", "vllm:request_success")


async def _streams(
    url: str, key: str, seconds: float, kill: Any, errors: list[str]
) -> list[tuple[bool, bool]]:
    """Eight clients streaming one after another for `seconds`, and `kill` (which waits for its
    moment) beside them. Each result: (it succeeded, its response had begun: the engine had
    taken it)."""
    aclient = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
    results: list[tuple[bool, bool]] = []
    end = time.monotonic() + seconds

    async def one(i: int) -> None:
        while time.monotonic() < end:
            started = False
            try:
                stream = await aclient.chat.completions.create(
                    model=DENSE,
                    max_tokens=24,
                    stream=True,
                    messages=[{"role": "user", "content": f"Name a solvent ({i})."}],
                    extra_body={"ignore_eos": True},
                )
                started = True  # its response began: past this, a break reaches the client
                async for _ in stream:
                    pass
                results.append((True, started))
            except openai.APIError as exc:
                results.append((False, started))
                errors.append(f"{type(exc).__name__}: {exc}"[:300])

    async def killer() -> None:
        await asyncio.to_thread(kill)

    await asyncio.gather(*(one(i) for i in range(8)), killer())
    await aclient.close()
    return results


def test_killing_one_engine_under_load_fails_no_request_that_had_not_started(
    replicated: Stack, client: openai.OpenAI
) -> None:
    ports = replicated.config.ports
    before = [_served(ports.inference), _served(ports.inference_2)]

    def kill() -> None:
        """Once both engines have finished requests of this load, SIGKILL the second."""
        deadline = time.monotonic() + 20
        while not (_served(ports.inference) > before[0] and _served(ports.inference_2) > before[1]):
            assert time.monotonic() < deadline, "the load never reached both engines"
            time.sleep(0.1)
        pgid = replicated.pid("inference-2")
        assert pgid is not None
        os.killpg(pgid, signal.SIGKILL)

    errors: list[str] = []
    results = asyncio.run(_streams(str(client.base_url), client.api_key, 8, kill, errors))
    assert len(results) > 30
    # A stream the dead engine had begun breaks (the SDK raises); none that had not begun: the
    # gateway sends those to the other engine.
    assert [r for r in results if not r[0] and not r[1]] == [], errors[:3]
    assert sum(ok for ok, _ in results) >= len(results) - 8


def _worker_of(jobs: JobStore, stack: Stack, job_id: str) -> str | None:
    """Which worker service's process group runs the job now (its row names the process)."""
    worker = jobs.get(job_id).worker or ""
    try:
        pgid = os.getpgid(int(worker.rsplit(":", 1)[1]))
    except (ValueError, IndexError, ProcessLookupError):
        return None
    for name in ("finetune-worker", "finetune-worker-2"):
        if stack.pid(name) == pgid:
            return name
    return None


def _engine_models(port: int) -> set[str]:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
        return {m["id"] for m in r.json()["data"]} if r.is_success else set()
    except httpx.HTTPError:
        return set()


def test_two_jobs_train_at_once_and_what_a_lost_worker_or_engine_had_is_taken_up(
    replicated: Stack, client: openai.OpenAI, database: str
) -> None:
    """Two jobs run at once, one on each worker; the second worker dies mid-job and its job
    resumes on the first from its last checkpoint; an engine that was down while a model was
    registered has the adapter loaded when it returns."""
    ports = replicated.config.ports
    jobs = JobStore(database)
    # The second engine is down (the stack was restarting it after the test above) before any
    # model is registered.
    replicated.down_one("inference-2")
    a, b = create_job(client, 24, 12), create_job(client, 24, 12)
    both: dict[str, str | None] = {}

    def running_apart(_: Any) -> bool:
        both.update({j: _worker_of(jobs, replicated, j) for j in (a.id, b.id)})
        return sorted(filter(None, both.values())) == ["finetune-worker", "finetune-worker-2"]

    wait_job(client, a.id, running_apart)
    lost = next(j for j, w in both.items() if w == "finetune-worker-2")
    wait_job(client, lost, lambda j: bool(list(client.fine_tuning.jobs.checkpoints.list(j.id))))
    # The second worker dies.
    pgid = replicated.pid("finetune-worker-2")
    assert pgid is not None
    os.killpg(pgid, signal.SIGKILL)
    replicated.down_one("finetune-worker-2")  # and stays down: only the first can resume it
    resumed = wait_job(
        client,
        lost,
        lambda j: any(
            "Resumed from the checkpoint" in e.message
            for e in client.fine_tuning.jobs.list_events(j.id, limit=1000)
        ),
    )
    assert _worker_of(jobs, replicated, resumed.id) in (None, "finetune-worker")
    done = [
        wait_job(client, j, lambda x: x.status in ("succeeded", "failed")) for j in (a.id, b.id)
    ]
    assert [d.status for d in done] == ["succeeded", "succeeded"], [d.error for d in done]
    models = {d.fine_tuned_model for d in done}
    assert models <= _engine_models(ports.inference)
    # The engine comes back: the reconciler loads both adapters into it.
    replicated.up(["inference-2"], echo=lambda _: None)
    deadline = time.monotonic() + 60
    while not models <= _engine_models(ports.inference_2) and time.monotonic() < deadline:
        time.sleep(1)
    assert models <= _engine_models(ports.inference_2)
    answer = client.chat.completions.create(
        model=done[0].fine_tuned_model or "",
        max_tokens=4,
        messages=[{"role": "user", "content": "hi"}],
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    replicated.up(["finetune-worker-2"], echo=lambda _: None)
    jobs.engine.dispose()

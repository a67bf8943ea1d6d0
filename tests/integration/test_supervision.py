"""The native stack keeps itself up (#19), on a stack of its own: every managed process is
SIGKILLed in turn and must be back and ready within its time; a hung one is restarted; an outage
of a dependency makes the dependent unready but is never a reason to restart it; a service that
keeps failing at start ends `failed` with its error; `down` leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from services.stack import Ports, Service, Stack, StackConfig, StackError, dev_key
from services.supervise import Policy
from tests.conftest import DENSE, MODELS, ROOT
from tests.finetuning import create_job, wait_job

# Fast liveness for the test: a process that stops answering is restarted after ~3-9 s.
POLICY = Policy(health_interval_s=1, health_timeout_s=2, health_failures=3)
CORPUS = ROOT / "bench" / "data" / "chemistry"
WITHOUT = ["prometheus"]  # not needed here; the session stack's Prometheus is tested elsewhere


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        StackConfig(
            var_dir=tmp_path_factory.mktemp("supervised-var"),
            ports=Ports.free(),
            models_dir=MODELS,
            policy=POLICY,
        )
    )
    names = [s.name for s in stack.config.services() if s.name not in WITHOUT]
    try:
        stack.up(names, echo=lambda _: None)
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="module")
def client(own: Stack) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(
        base_url=f"http://127.0.0.1:{own.config.ports.gateway}/v1",
        api_key=dev_key(own.config.var_dir),
        max_retries=0,
    )
    yield c
    c.close()


@pytest.fixture(scope="module")
def store(client: openai.OpenAI) -> tuple[str, str]:
    """A file in a vector store before anything is killed: it must outlive every kill."""
    path = sorted(CORPUS.glob("*.md"))[0]
    with path.open("rb") as fh:
        f = client.vector_stores.files.upload_and_poll(
            vector_store_id=client.vector_stores.create(name="kept").id,
            file=fh,
            poll_interval_ms=200,
        )
    assert f.status == "completed", f.last_error
    return f.vector_store_id, f.id


def service(stack: Stack, name: str) -> Service:
    return next(s for s in stack.config.services() if s.name == name)


def restarts_metric(stack: Stack, name: str, reason: str = "exited") -> float:
    text = httpx.get(f"http://127.0.0.1:{stack.config.ports.supervisor}/metrics").text
    pattern = rf'crucible_stack_restarts_total{{reason="{reason}",service="{name}"}} (\S+)'
    found = re.search(pattern, text) or re.search(
        rf'crucible_stack_restarts_total{{service="{name}",reason="{reason}"}} (\S+)', text
    )
    assert found, f"no restart counter for {name} in the monitor's /metrics"
    return float(found.group(1))


def back(stack: Stack, name: str, old_pid: int, timeout: float) -> tuple[float, set[str]]:
    """Seconds until `name` runs under a new pid and is ready; the states seen on the way."""
    start, seen = time.monotonic(), set()
    while True:
        state = stack.status()[name]
        seen.add(state)
        if state == "ready" and stack.pid(name) not in (None, old_pid):
            return time.monotonic() - start, seen
        assert state != "failed", stack.explain(name)
        assert time.monotonic() - start < timeout, f"{name} not back in {timeout}s: {seen}"
        time.sleep(0.2)


def everything_ready(stack: Stack) -> None:
    deadline = time.monotonic() + 120
    while (status := stack.status()) and any(
        v != "ready" for k, v in status.items() if k not in WITHOUT
    ):
        assert time.monotonic() < deadline, status
        time.sleep(0.5)


# Milvus first: retrieval depends on it; vLLM last, it is the slowest to come back.
KILLED = ["milvus", "retrieval", "gateway", "agent", "finetune-worker", "inference"]


@pytest.mark.parametrize("name", KILLED)
def test_a_killed_process_is_back_and_ready_within_its_time(
    own: Stack, client: openai.OpenAI, store: tuple[str, str], name: str
) -> None:
    everything_ready(own)
    pid = own.pid(name)
    assert pid is not None
    others = {n: own.pid(n) for n in KILLED if n != name}
    counted, metric = own.restarts().get(name, 0), restarts_metric(own, name)
    os.killpg(pid, signal.SIGKILL)  # the process and all it spawned, as the OOM killer would
    took, seen = back(own, name, pid, service(own, name).ready_timeout)
    print(f"{name}: back and ready {took:.1f} s after SIGKILL; states seen: {sorted(seen)}")
    assert own.restarts()[name] == counted + 1
    assert restarts_metric(own, name) == metric + 1
    if name == "inference":  # slow enough that `make status` shows it coming back
        assert f"restarting ({counted + 1})" in seen
    everything_ready(own)
    # Only the killed process was restarted: its dependents waited (unready), they did not die.
    assert {n: own.pid(n) for n in others} == others
    # And it works for a user: the store made before every kill is searched, a model answers.
    hits = client.vector_stores.search(store[0], query="acetylsalicylic acid synthesis")
    assert store[1] in {h.file_id for h in hits.data}
    reply = client.chat.completions.create(
        model=DENSE, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 3


def test_a_job_submitted_while_the_worker_is_dead_completes(
    own: Stack, client: openai.OpenAI
) -> None:
    everything_ready(own)
    pid = own.pid("finetune-worker")
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    job = create_job(client, epochs=2)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    done = wait_job(client, job.id, lambda j: j.status in ("succeeded", "failed"), timeout=300)
    assert done.status == "succeeded", done.error
    assert own.pid("finetune-worker") not in (None, pid)


def test_a_hung_process_is_restarted(own: Stack) -> None:
    """SIGSTOP: alive to the kernel, silent to every client. Only liveness can tell."""
    everything_ready(own)
    pid = own.pid("agent")
    assert pid is not None
    metric = restarts_metric(own, "agent", reason="unhealthy")
    os.killpg(pid, signal.SIGSTOP)
    limit = POLICY.health_failures * (POLICY.health_interval_s + POLICY.health_timeout_s) + 30
    took, _ = back(own, "agent", pid, limit)
    print(f"agent: hung, restarted and ready in {took:.1f} s")
    assert restarts_metric(own, "agent", reason="unhealthy") == metric + 1


def test_a_dependency_outage_makes_the_dependent_unready_but_never_restarts_it(
    own: Stack,
) -> None:
    everything_ready(own)
    agent = own.pid("agent")
    restarts = own.restarts().get("agent", 0)
    ready = f"http://127.0.0.1:{own.config.ports.agent}/ready"
    own.down_one("gateway")
    try:
        r = httpx.get(ready)
        assert r.status_code == 503 and r.json()["checks"]["gateway"] != "ok"
        # Watch for more than the monitor's whole restart window: the agent stays as it is.
        window = POLICY.health_failures * (POLICY.health_interval_s + POLICY.health_timeout_s) * 2
        end = time.monotonic() + window
        while time.monotonic() < end:
            assert own.pid("agent") == agent
            time.sleep(0.5)
        gauge = httpx.get(f"http://127.0.0.1:{own.config.ports.agent}/metrics").text
        assert 'crucible_ready_check{check="gateway"} 0.0' in gauge
        assert own.status()["gateway"] == "stopped"
    finally:
        own.up(["gateway"], echo=lambda _: None)
    everything_ready(own)
    assert own.pid("agent") == agent and own.restarts().get("agent", 0) == restarts
    gauge = httpx.get(f"http://127.0.0.1:{own.config.ports.agent}/metrics").text
    assert 'crucible_ready_check{check="gateway"} 1.0' in gauge


def test_a_service_that_keeps_failing_at_start_ends_failed_with_its_error(
    tmp_path: Path,
) -> None:
    stack = Stack(
        StackConfig(
            var_dir=tmp_path,
            ports=Ports.free(),
            models_dir=MODELS,
            policy=POLICY,
            env={"CRUCIBLE_AGENT_CHEM_WORKERS": "many"},  # a bad setting
        )
    )
    try:
        start = time.monotonic()
        with pytest.raises(StackError) as failed:
            stack.up(["agent"], echo=lambda _: None)
        took = time.monotonic() - start
        assert "agent failed" in str(failed.value) and "chem_workers" in str(failed.value)
        assert stack.status()["agent"] == "failed"
        assert "chem_workers" in stack.explain("agent")
        text = httpx.get(f"http://127.0.0.1:{stack.config.ports.supervisor}/metrics").text
        assert 'crucible_stack_failed{service="agent"} 1.0' in text
        print(f"agent with a bad setting: failed after {took:.1f} s")
        assert took < 90
    finally:
        stack.down()


def test_down_stops_everything_and_leaves_no_process(own: Stack) -> None:
    pids = {n: own.pid(n) for n in KILLED}
    assert all(pids.values()), pids
    group = set()
    for pid in pids.values():
        assert pid is not None
        group |= {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
    supervisord = int((own.run_dir / "supervisord.pid").read_text())
    stopped = own.down()
    assert set(stopped) >= set(KILLED)
    alive = [p for p in {*group, supervisord} if psutil.pid_exists(p)]
    assert not [p for p in alive if psutil.Process(p).status() != "zombie"]
    assert set(own.status().values()) == {"stopped"}


def test_a_killed_supervisord_leaves_nothing_that_down_or_up_cannot_handle(
    tmp_path: Path,
) -> None:
    """supervisord SIGKILLed: its services run on unsupervised. `make up` must still start (not
    'port taken by a process make up did not start'), and `make down` must still stop them."""
    stack = Stack(StackConfig(var_dir=tmp_path, ports=Ports.free(), policy=POLICY))
    # (A Redis left running is adopted by `up`, as any answering Redis; the trace sink goes
    # with any part of the stack.)
    names = ["milvus", "traces"]

    def kill_supervisord() -> dict[str, int]:
        pids = {n: stack.pid(n) or 0 for n in names}
        assert all(pids.values())
        os.kill(int((stack.run_dir / "supervisord.pid").read_text()), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while stack.pid(names[0]) is not None:  # its socket stops answering
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert all(psutil.pid_exists(p) for p in pids.values())  # orphans, still serving
        return pids

    def gone(pids: dict[str, int]) -> bool:
        return not any(
            psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids.values()
        )

    try:
        stack.up(names, echo=lambda _: None)
        orphans = kill_supervisord()
        said: list[str] = []
        stack.up(names, echo=said.append)
        assert gone(orphans) and all(stack.pid(n) not in (None, orphans[n]) for n in names)
        assert any("was running unsupervised" in line for line in said), said
        assert stack.status()["milvus"] == "ready"
        orphans = kill_supervisord()
        assert sorted(stack.down()) == sorted(names)
        assert gone(orphans)
    finally:
        stack.down()

"""`crucible backup` and `crucible restore`: a deployment's data, restored into an empty one (and
into PostgreSQL), answers as before: keys, files, vector stores and their search, jobs with
their events, adapters, agent runs.

A user's side runs through a gateway (with retrieval, fine-tuning's API and the agent behind it)
and the official `openai` client. The job, its adapter and the run are written with the
services' own stores: a real adapter means training one, which the fine-tuning e2e tests do.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from services import cli
from services.agent.runs import RunRow, RunStore
from services.finetune.jobs import AdapterRow, JobRow, JobStore
from services.gateway.keys import KeyStore
from services.retrieval.catalog import Catalog
from services.stackconfig import _free_port
from tests.processes import behind_a_gateway, postgres_database, service

NOTES = b"Aspirin is acetylsalicylic acid. Caffeine is a methylxanthine stimulant.\n"


@contextlib.contextmanager
def user_side(var: Path, redis_url: str) -> Iterator[openai.OpenAI]:
    """Retrieval, fine-tuning (its API), the agent and a gateway on `var`: the official SDK."""
    gw_port = _free_port()
    with behind_a_gateway(var, redis_url, gw_port) as wiring:
        settings = {"redis_url": redis_url, "inference_urls": '["http://127.0.0.1:9"]', **wiring}
        with service("gateway", var, settings, port=gw_port) as g:
            yield openai.OpenAI(base_url=f"{g.url}/v1", api_key="unset", max_retries=0)


def _completed(client: openai.OpenAI, store_id: str) -> None:
    deadline = time.monotonic() + 120
    while client.vector_stores.retrieve(store_id).file_counts.completed < 1:
        assert time.monotonic() < deadline, "the store's file never finished ingesting"
        time.sleep(0.2)


def _make_source(var: Path, redis_url: str) -> dict[str, object]:
    keys = KeyStore(f"sqlite:///{var / 'gateway.db'}")
    secret, _ = keys.create("alice", rpm=0)
    keys.engine.dispose()
    with user_side(var, redis_url) as client:
        client.api_key = secret
        upload = client.files.create(file=("notes.txt", NOTES), purpose="assistants")
        store = client.vector_stores.create(name="chemistry", file_ids=[upload.id])
        _completed(client, store.id)
        hits = client.vector_stores.search(store.id, query="what is caffeine")
        top = hits.data[0].content[0].text
    jobs = JobStore(f"sqlite:///{var / 'finetune.db'}")
    job = JobRow(
        id="ftjob-backup", owner="alice", model="crucible-dev", training_file=upload.id,
        seed=1, hyperparameters={"n_epochs": 1}, lora={"r": 8}, status="validating_files",
        created_at=1,
    )  # fmt: skip
    jobs.create(job)
    jobs.transition(job.id, "succeeded", fine_tuned_model="ft:crucible-dev:x:ftjob-backup")
    adapter_dir = var / "adapters" / job.id
    adapter_dir.mkdir(parents=True)
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"weights")
    jobs.register_adapter(
        AdapterRow(
            model="ft:crucible-dev:x:ftjob-backup", owner="alice", job_id=job.id,
            base_model="crucible-dev", path=str(adapter_dir.resolve()), created_at=1,
        )
    )  # fmt: skip
    jobs.engine.dispose()
    runs = RunStore(f"sqlite:///{var / 'agent.db'}")
    runs.create(
        RunRow(
            id="run_backup", owner="alice", key_id="key_x", model="crucible-dev", mode="auto",
            instructions="", nonce="n", messages=[{"role": "user", "content": "hi"}], tools=[],
            tool_choice="required", vector_store_ids=[store.id], budgets={}, status="queued",
            usage={}, created_at=1,
        )
    )  # fmt: skip
    runs.add_steps("run_backup", [{"index": 0, "type": "answer"}], {"total_tokens": 9})
    runs.finish("run_backup", "completed", output={"text": "done"})
    runs.engine.dispose()
    return {"key": secret, "file": upload.id, "store": store.id, "top": top}


def _same_records(urls: dict[str, str], adapters: Path, src: dict[str, object]) -> None:
    """What the stores read back, as each service would."""
    keys = KeyStore(urls["gateway"])
    found = keys.lookup(str(src["key"]))
    assert found is not None and found.owner == "alice"
    catalog = Catalog(urls["retrieval"])
    assert catalog.file("alice", str(src["file"])).filename == "notes.txt"
    assert catalog.store("alice", str(src["store"])).name == "chemistry"
    jobs = JobStore(urls["finetune"])
    assert jobs.get("ftjob-backup", "alice").status == "succeeded"
    events = jobs.events("ftjob-backup", "alice", 100, None)["data"]
    assert [e["message"] for e in events] == [
        "Job succeeded",
        "Created fine-tuning job: ftjob-backup",
    ]
    jobs.event("ftjob-backup", "a new event after the restore")  # ids continue past the old ones
    assert len(jobs.events("ftjob-backup", "alice", 100, None)["data"]) == 3
    (adapter,) = jobs.adapters()
    assert Path(adapter.path) == (adapters / "ftjob-backup").resolve()
    assert (Path(adapter.path) / "adapter_model.safetensors").read_bytes() == b"weights"
    runs = RunStore(urls["agent"])
    run = runs.get("run_backup", "alice")
    assert run.tool_choice == "required" and runs.steps("run_backup") == [
        {"index": 0, "type": "answer"}
    ]
    for store in (keys, catalog, jobs, runs):
        store.engine.dispose()


def test_a_restored_deployment_answers_as_before(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, target, saved = tmp_path / "source", tmp_path / "target", tmp_path / "backup"
    src = _make_source(source, redis_url)
    monkeypatch.setenv("CRUCIBLE_VAR_DIR", str(source))
    assert cli.main(["backup", str(saved)]) == 0
    assert cli.main(["backup", str(saved)]) == 1  # never over an existing backup

    monkeypatch.setenv("CRUCIBLE_VAR_DIR", str(target))
    assert cli.main(["restore", str(saved)]) == 0
    assert cli.main(["restore", str(saved)]) == 1  # nor over data
    urls = {
        s: f"sqlite:///{target / f'{s}.db'}" for s in ("gateway", "retrieval", "finetune", "agent")
    }
    _same_records(urls, target / "adapters", src)
    with user_side(target, redis_url) as client:
        client.api_key = str(src["key"])  # the same key still works
        assert client.files.content(str(src["file"])).read() == NOTES
        job = client.fine_tuning.jobs.retrieve("ftjob-backup")
        assert (
            job.status == "succeeded" and job.fine_tuned_model == "ft:crucible-dev:x:ftjob-backup"
        )
        events = [e.message for e in client.fine_tuning.jobs.list_events("ftjob-backup")]
        assert "Job succeeded" in events and "a new event after the restore" in events
        run = client.get("/agent/runs/run_backup", cast_to=object)
        assert (run["status"], run["output"]) == ("completed", {"text": "done"})  # type: ignore[index]
        assert run["steps"] == [{"index": 0, "type": "answer"}]  # type: ignore[index]
        _completed(client, str(src["store"]))  # Milvus re-indexed from the restored file
        hits = client.vector_stores.search(str(src["store"]), query="what is caffeine")
        assert hits.data[0].content[0].text == src["top"]
        assert hits.data[0].file_id == src["file"]

    # The same backup, taken of SQLite, restores into PostgreSQL.
    with postgres_database() as pg:
        schemas = ("GATEWAY", "RETRIEVAL", "FINETUNE", "AGENT")
        for schema in schemas:
            monkeypatch.setenv(f"CRUCIBLE_{schema}_DATABASE_URL", pg)
        monkeypatch.setenv("CRUCIBLE_VAR_DIR", str(tmp_path / "on-postgres"))
        assert cli.main(["restore", str(saved)]) == 0
        _same_records({s.lower(): pg for s in schemas}, tmp_path / "on-postgres" / "adapters", src)

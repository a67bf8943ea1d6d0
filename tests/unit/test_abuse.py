"""Hostile and careless input that must be refused at once, not served for minutes (#22): each
case failed on the main it started from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.common.errors import InvalidRequest, QuotaExceeded
from services.finetune import adapters
from services.finetune.api import JobCreate, _new_job
from services.finetune.jobs import JobRow, JobStore, new_job_id
from services.finetune.validation import parse
from services.retrieval.parsing import check_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "expression",
    [
        "round(1, -10**8)",  # 10**100000000 built on the agent's event loop
        "round(7, -(10**9))",
        "(10**300) ** 1024 * 2",
    ],
)
def test_the_calculator_refuses_a_huge_intermediate_at_once(expression: str) -> None:
    """In a subprocess with a deadline: before the fix these ran for minutes."""
    code = (
        "from services.agent.tools.calculator import evaluate\n"
        "from services.agent.tools.base import ToolError\n"
        f"try:\n    evaluate({expression!r})\nexcept ToolError as e:\n    print('refused', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=5
    )
    assert out.stdout.startswith("refused"), (out.stdout, out.stderr[-500:])


LINE_SEPARATED = {  # U+2028 and U+2029 are valid raw inside a JSON string; only \n ends a line
    "messages": [
        {"role": "user", "content": "first\u2028second\u2029third\x85fourth"},
        {"role": "assistant", "content": "ok"},
    ]
}


def test_a_jsonl_line_is_split_on_newline_only() -> None:
    text = json.dumps(LINE_SEPARATED, ensure_ascii=False) + "\r\n"
    assert parse(text, min_examples=1)[0] == LINE_SEPARATED
    check_jsonl(text)  # an upload for retrieval: accepted, not "line 1: not valid JSON"


def test_a_jsonl_eval_file_keeps_its_line_separators() -> None:
    from services.finetune.evals_api import _jsonl_items

    item = {"question": "a\u2028b", "answer": "c"}
    assert _jsonl_items(json.dumps(item, ensure_ascii=False) + "\n") == [{"item": item}]


@pytest.mark.parametrize("model", ["../outside", "dev/../dev", "dev/", "/abs/dev", "."])
def test_a_fine_tuning_model_is_a_name_never_a_path(tmp_path: Path, model: str) -> None:
    models = tmp_path / "models"
    for d in (models / "dev", tmp_path / "outside", Path(tmp_path / "abs" / "dev")):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    settings = SimpleNamespace(models=lambda: models)
    body = JobCreate(model=model, training_file="file-x")
    with pytest.raises(InvalidRequest) as err:
        _new_job(body, "lab", settings, None)
    assert err.value.param == "model" and err.value.code == "model_not_available"


def _check(path: str, **payload: object) -> None:
    from services.gateway.config import GatewaySettings
    from services.gateway.validation import check_request

    check_request(path, {"model": "m", **payload}, GatewaySettings())


@pytest.mark.parametrize(
    ("path", "payload", "param"),
    [
        ("/v1/completions", {"prompt": ["a prompt"] * 5000}, "prompt"),  # 5,000 sequences
        ("/v1/completions", {"prompt": [[1, 2, 3]] * 5000}, "prompt"),  # token-id prompts
        ("/v1/completions", {"prompt": "x" * (2 << 20)}, "prompt"),  # 2 M characters
        ("/v1/completions", {"prompt": ["y" * (600 << 10)] * 4}, "prompt"),
        ("/v1/completions", {"prompt": [1] * 300_000}, "prompt"),  # one prompt of token ids
        ("/v1/completions", {"prompt": [{"not": "a prompt"}]}, "prompt"),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "logit_bias": {str(i): 1 for i in range(5000)},
            },
            "logit_bias",
        ),
        ("/v1/completions", {"prompt": "hi", "logit_bias": []}, "logit_bias"),
    ],
)
def test_the_engine_side_size_of_a_request_is_bounded(
    path: str, payload: dict[str, object], param: str
) -> None:
    with pytest.raises(InvalidRequest) as err:
        _check(path, **payload)
    assert err.value.param == param


def test_ordinary_prompts_pass() -> None:
    _check("/v1/completions", prompt=["a", "b"], logit_bias={"50256": -100})
    _check("/v1/completions", prompt=[1, 2, 3])
    _check("/v1/completions", prompt=[[1, 2], [3]])


def _nested(depth: int) -> dict[str, object]:
    f: dict[str, object] = {"type": "eq", "key": "k", "value": 1}
    for _ in range(depth):
        f = {"type": "and", "filters": [f]}
    return f


@pytest.mark.parametrize(
    ("filters", "why"),
    [
        (_nested(200), "deeper"),  # accepted before, and evaluated per file on the event loop
        (
            {
                "type": "or",
                "filters": [
                    {"type": "and", "filters": [{"type": "eq", "key": "k", "value": 1}] * 32}
                ]
                * 32,
            },
            "comparisons",
        ),  # 1,024 comparisons per file
        ({"type": "in", "key": "k", "value": list(range(5000))}, "values"),
    ],
)
def test_a_search_filter_is_bounded_in_depth_size_and_values(
    filters: dict[str, object], why: str
) -> None:
    from pydantic import ValidationError

    from services.retrieval.stores import SearchRequest

    with pytest.raises(ValidationError, match=why):
        SearchRequest.model_validate({"query": "q", "filters": filters})


def test_an_ordinary_filter_passes() -> None:
    from services.retrieval.stores import SearchRequest

    ok = {"type": "and", "filters": [_nested(6), {"type": "in", "key": "s", "value": ["a", "b"]}]}
    assert SearchRequest.model_validate({"query": "q", "filters": ok}).filters is not None


def test_an_accepted_upload_is_on_stable_storage_before_its_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's bytes and the directory entry of its final name are both fsynced before the
    upload returns (a power cut after the 200 must not lose an accepted file)."""
    import io
    import os

    from fastapi import UploadFile

    from services.retrieval import files

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    upload = UploadFile(io.BytesIO(b"Benzene is aromatic.\n"), filename="notes.txt")
    size, _ = files._store(upload, "notes.txt", "assistants", tmp_path, "file-abc")
    assert size == 21 and (tmp_path / "file-abc").read_bytes() == b"Benzene is aromatic.\n"
    file_synced = [p for p in synced if Path(p).parent == tmp_path and p != str(tmp_path)]
    assert file_synced, synced  # the bytes (under the temporary name, before the rename)
    assert synced[-1] == str(tmp_path)  # then the directory, holding the final name


def test_every_service_reports_the_space_left_on_its_data_disk(tmp_path: Path) -> None:
    """What the disk-space alert (CrucibleDiskAlmostFull) reads, from any service's /metrics."""
    import shutil

    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from services.common.app import build_app
    from services.common.config import ServiceSettings

    with TestClient(build_app("probe", settings=ServiceSettings(var_dir=tmp_path))) as client:
        text = client.get("/metrics").text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    usage = shutil.disk_usage(tmp_path)
    assert values["crucible_disk_size_bytes"] == usage.total
    assert abs(values["crucible_disk_free_bytes"] - usage.free) < 256 << 20


def _jobs(tmp_path: Path, *specs: tuple[str, str]) -> tuple[JobStore, list[str]]:
    """A real job store with one job per (owner, status)."""
    import time

    store = JobStore(f"sqlite:///{tmp_path / 'finetune.db'}")
    ids = []
    for owner, status in specs:
        row = JobRow(
            id=new_job_id(),
            owner=owner,
            model="crucible-dev",
            training_file="file-x",
            seed=1,
            hyperparameters={},
            lora={},
            status=status,
            created_at=int(time.time()),
            attempts=0,
            cancel_requested=False,
            request_hash="-",
        )
        store.create(row)
        ids.append(row.id)
    return store, ids


def test_a_new_job_past_the_owners_adapter_quota_is_refused_naming_the_bytes(
    tmp_path: Path,
) -> None:
    """Adapters and checkpoints of every job count; another owner's do not."""
    store, (first, second, theirs) = _jobs(
        tmp_path, ("ann", "succeeded"), ("ann", "running"), ("bob", "succeeded")
    )
    out = tmp_path / "adapters"
    for job_id, size in ((first, 600), (second, 300), (theirs, 5000)):
        (out / job_id / "checkpoints" / "step-000001").mkdir(parents=True)
        (out / job_id / "checkpoints" / "step-000001" / "adapter.bin").write_bytes(b"x" * size)
    adapters.check_quota(store, out, "ann", quota=1000)  # 900 of 1,000: room for one more
    (out / second / "adapter_model.safetensors").write_bytes(b"x" * 100)
    with pytest.raises(QuotaExceeded) as refused:
        adapters.check_quota(store, out, "ann", quota=1000)
    assert refused.value.status == 429 and refused.value.code == "insufficient_quota"
    assert "1,000 of 1,000 bytes" in refused.value.message
    adapters.check_quota(store, out, "carol", quota=1000)  # an owner with nothing yet


def test_failed_and_cancelled_jobs_leave_no_checkpoints_behind(tmp_path: Path) -> None:
    """Their checkpoints can be neither resumed nor served: the reconciler removes them."""
    store, ids = _jobs(
        tmp_path,
        ("ann", "failed"),
        ("ann", "cancelled"),
        ("ann", "running"),
        ("ann", "succeeded"),
    )
    out = tmp_path / "adapters"
    for job_id in ids:
        (out / job_id / "checkpoints").mkdir(parents=True)
    assert adapters.sweep(store, out) == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(ids[2:])
    assert adapters.sweep(store, out) == 0

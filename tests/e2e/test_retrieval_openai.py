"""Retrieval through the gateway with the official `openai` client, as a researcher uses it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from openai.types.shared_params import CompoundFilter

from services.gateway.keys import KeyStore
from tests.conftest import ROOT

CORPUS = ROOT / "bench" / "data" / "chemistry"
QUERIES = [json.loads(line) for line in (ROOT / "bench/data/chemistry-queries.jsonl").open()]
MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def chemistry_store(client: openai.OpenAI) -> Iterator[tuple[str, dict[str, str]]]:
    """The repo's chemistry corpus in one store, each file with a `topic` attribute."""
    store = client.vector_stores.create(name="chemistry")
    names: dict[str, str] = {}
    for path in sorted(CORPUS.glob("*.md")):
        with path.open("rb") as fh:
            vs_file = client.vector_stores.files.upload_and_poll(
                vector_store_id=store.id,
                file=fh,
                attributes={"topic": path.stem},
                poll_interval_ms=200,
            )
        assert vs_file.status == "completed", vs_file.last_error
        names[vs_file.id] = path.name
    yield store.id, names
    client.vector_stores.delete(store.id)
    for file_id in names:
        client.files.delete(file_id)


def _cos(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_embeddings_in_the_sdk_default_base64_and_as_floats(client: openai.OpenAI) -> None:
    texts = [
        "synthesis of aspirin from salicylic acid",
        "acetylation of salicylic acid gives acetylsalicylic acid",
        "glass transition temperature of polystyrene",
    ]
    default = client.embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1, 2]
    for a, b in zip(default.data, floats.data, strict=True):
        assert len(a.embedding) == 384
        assert np.allclose(a.embedding, b.embedding, atol=1e-6)
        assert abs(np.linalg.norm(a.embedding) - 1) < 1e-3
    v = [d.embedding for d in default.data]
    assert _cos(v[0], v[1]) > _cos(v[0], v[2]) + 0.2  # related texts are closer
    assert default.usage.prompt_tokens == default.usage.total_tokens > 20
    single = client.embeddings.create(model=MODEL, input=texts[0])
    assert np.allclose(single.data[0].embedding, v[0], atol=1e-5)


def test_embedding_errors_are_in_the_envelope(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.embeddings.create(model=MODEL, input=[])
    with pytest.raises(openai.BadRequestError, match="reads at most 256"):
        client.embeddings.create(model=MODEL, input="word " * 400)  # never silently cut
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-large", input="x")


def test_files_create_list_content_delete(client: openai.OpenAI, tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    created = client.files.create(file=path.open("rb"), purpose="fine-tune")
    assert created.filename == "train.jsonl" and created.bytes == path.stat().st_size
    assert created.id in [f.id for f in client.files.list(purpose="fine-tune")]
    assert client.files.retrieve(created.id).purpose == "fine-tune"
    assert client.files.content(created.id).read() == path.read_bytes()
    assert client.files.delete(created.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)


def test_bad_uploads_get_clear_errors_and_leave_nothing(
    client: openai.OpenAI, tmp_path: Path
) -> None:
    before = {f.id for f in client.files.list()}
    exe = tmp_path / "tool.exe"
    exe.write_bytes(b"MZ\x90\x00")
    with pytest.raises(openai.APIStatusError) as err:
        client.files.create(file=exe.open("rb"), purpose="assistants")
    assert err.value.status_code == 415
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"ok": 1}\n{"broken": \n')
    with pytest.raises(openai.BadRequestError, match="line 2"):
        client.files.create(file=bad.open("rb"), purpose="fine-tune")
    assert {f.id for f in client.files.list()} == before


def test_search_with_a_filter_returns_citable_results(
    client: openai.OpenAI, chemistry_store: tuple[str, dict[str, str]]
) -> None:
    store_id, names = chemistry_store
    page = client.vector_stores.search(
        store_id, query="aspirin synthesis acetic anhydride", max_num_results=3
    )
    top = page.data[0]
    assert names[top.file_id] == "aspirin.md" and top.filename == "aspirin.md"
    assert "acetic anhydride" in top.content[0].text
    assert 0 < top.score <= 1 and top.attributes == {"topic": "aspirin"}
    filtered = client.vector_stores.search(
        store_id,
        query="aspirin synthesis acetic anhydride",
        max_num_results=5,
        filters={"type": "eq", "key": "topic", "value": "catalysis"},
    )
    assert filtered.data and all(names[r.file_id] == "catalysis.md" for r in filtered.data)
    high = client.vector_stores.search(
        store_id, query="aspirin synthesis", ranking_options={"score_threshold": 0.99}
    )
    assert all(r.score >= 0.99 for r in high.data)


def test_a_files_new_attributes_are_what_the_next_filtered_search_sees(
    client: openai.OpenAI, tmp_path: Path
) -> None:
    """Filters run inside Milvus over the attributes each chunk carries: an update rewrites
    the file's chunks before it answers."""
    store = client.vector_stores.create(name="reports")
    ids = {}
    for name, text in (("old.txt", "benzene is an aromatic ring"), ("new.txt", "benzene rings")):
        path = tmp_path / name
        path.write_text(text)
        with path.open("rb") as fh:
            done = client.vector_stores.files.upload_and_poll(
                vector_store_id=store.id,
                file=fh,
                attributes={"year": 2023, "lab": 'Smith "B"'},
                poll_interval_ms=200,
            )
        assert done.status == "completed"
        ids[name] = done.id
    recent: CompoundFilter = {
        "type": "and",
        "filters": [
            {"type": "gte", "key": "year", "value": 2024},
            {"type": "eq", "key": "lab", "value": 'Smith "B"'},
        ],
    }
    assert client.vector_stores.search(store.id, query="benzene", filters=recent).data == []
    updated = client.vector_stores.files.update(
        ids["new.txt"], vector_store_id=store.id, attributes={"year": 2025, "lab": 'Smith "B"'}
    )
    assert updated.attributes == {"year": 2025, "lab": 'Smith "B"'}
    found = client.vector_stores.search(store.id, query="benzene", filters=recent).data
    assert [r.file_id for r in found] == [ids["new.txt"]]
    assert found[0].attributes == {"year": 2025, "lab": 'Smith "B"'}
    older = client.vector_stores.search(
        store.id, query="benzene", filters={"type": "lt", "key": "year", "value": 2024}
    ).data
    assert [r.file_id for r in older] == [ids["old.txt"]]
    client.vector_stores.delete(store.id)
    for file_id in ids.values():
        client.files.delete(file_id)


def test_a_search_says_where_its_time_went(
    client: openai.OpenAI, chemistry_store: tuple[str, dict[str, str]]
) -> None:
    """`Server-Timing` through the gateway: the query embedding, Milvus, and the whole."""
    store_id, _ = chemistry_store
    raw = client.vector_stores.with_raw_response.search(store_id, query="caffeine half-life")
    assert raw.parse().data
    timing = {
        name: float(dur.removeprefix("dur="))
        for name, dur in (
            part.strip().split(";") for part in raw.headers["server-timing"].split(",")
        )
    }
    assert set(timing) == {"embed", "milvus", "total"}
    assert timing["embed"] > 0 and timing["milvus"] > 0
    assert timing["embed"] + timing["milvus"] <= timing["total"]


def test_hit_at_5_on_the_labelled_chemistry_queries(
    client: openai.OpenAI, chemistry_store: tuple[str, dict[str, str]]
) -> None:
    store_id, names = chemistry_store
    for ranker in ("none", "auto"):  # dense alone, then hybrid (dense + BM25)
        hits = 0
        for q in QUERIES:
            page = client.vector_stores.search(
                store_id, query=q["query"], max_num_results=5, ranking_options={"ranker": ranker}
            )
            hits += any(
                names[r.file_id] == q["file"] and q["passage"] in r.content[0].text
                for r in page.data
            )
        assert hits / len(QUERIES) >= 0.85, (ranker, hits)


def test_another_owners_ids_are_404(
    client: openai.OpenAI, gateway_url: str, keys: KeyStore, tmp_path: Path
) -> None:
    path = tmp_path / "mine.txt"
    path.write_text("benzene is aromatic")
    mine = client.files.create(file=path.open("rb"), purpose="assistants")
    store = client.vector_stores.create(name="mine", file_ids=[mine.id])
    secret, _ = keys.create("someone-else", rpm=0)
    other = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=secret, max_retries=0)
    for call in (
        lambda: other.files.retrieve(mine.id),
        lambda: other.files.content(mine.id),
        lambda: other.files.delete(mine.id),
        lambda: other.vector_stores.retrieve(store.id),
        lambda: other.vector_stores.search(store.id, query="benzene"),
        lambda: other.vector_stores.files.list(store.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    theirs = other.vector_stores.create(name="theirs")
    with pytest.raises(openai.NotFoundError):  # cannot pull my file into their store
        other.vector_stores.files.create(theirs.id, file_id=mine.id)
    assert mine.id not in [f.id for f in other.files.list()]
    assert client.files.retrieve(mine.id).id == mine.id  # untouched


def test_an_upload_over_the_limit_is_413_and_no_key_is_401(
    gateway_url: str, admin_key: str
) -> None:
    big = b"x" * (65 << 20)
    r = httpx.post(
        f"{gateway_url}/v1/files",
        headers={"authorization": f"Bearer {admin_key}"},
        files={"file": ("big.txt", big)},
        data={"purpose": "assistants"},
        timeout=60,
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    r = httpx.get(f"{gateway_url}/v1/files")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"

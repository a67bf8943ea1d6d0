"""The retrieval service on its own (real Milvus Lite, real embedder): bad input, poisoned
documents, quotas and tenancy. Requests carry the internal token and an owner, as the gateway
sends them. Crashes and outages: test_retrieval_recovery.py."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.integration.retrieval_support import (
    BOMB_PDF,
    MODEL,
    SLOW_PDF,
    TOKEN,
    Client,
    pdf,
)
from tests.processes import Proc, metric, retrieval

QUOTA = 4_000_000  # bytes of files per owner, in this module's service


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    with retrieval(
        tmp_path_factory.mktemp("retrieval"),
        max_upload_bytes=200_000,
        max_inputs_per_request=8,
        parse_timeout_s=2.0,
        parse_memory_mb=128,
        owner_quota_bytes=QUOTA,
    ) as p:
        yield p


@pytest.fixture(scope="module")
def alice(svc: Proc) -> Client:
    return Client(svc.url, "alice")


@pytest.fixture(scope="module")
def bob(svc: Proc) -> Client:
    return Client(svc.url, "bob")


def test_requests_without_the_internal_token_are_refused(svc: Proc) -> None:
    for headers in (
        {},
        {"authorization": "Bearer wrong", "x-crucible-owner": "alice"},
        {"authorization": f"Bearer {TOKEN}"},  # no owner
        {"authorization": f"Bearer {TOKEN}", "x-crucible-owner": 'a b"'},
    ):
        r = httpx.get(f"{svc.url}/v1/files", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{svc.url}/health").status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": MODEL, "input": []}, 400, "input"),
        ({"model": MODEL, "input": 5}, 400, "input"),
        ({"model": MODEL, "input": [[1, 2, 3]]}, 400, "input"),  # token arrays
        ({"model": MODEL, "input": ["fine", ""]}, 400, "input"),
        ({"model": MODEL, "input": ["x"] * 9}, 400, "input"),  # over this service's 8
        ({"model": MODEL, "input": "x", "dimensions": 256}, 400, "dimensions"),
        ({"model": MODEL, "input": "x", "encodng_format": "float"}, 400, "encodng_format"),
        ({"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": "text-embedding-3-small", "input": "x"}, 404, "model"),
    ],
)
def test_embedding_input_errors(
    alice: Client, body: dict[str, Any], status: int, param: str
) -> None:
    r = alice.http.post("/v1/embeddings", json=body)
    assert r.status_code == status and r.json()["error"]["param"] == param


def _wait_for_model(svc: Proc, gauge: str) -> None:
    """Until `gauge` says the ONNX model it names is serving (each is exported or quantized and
    loaded in the background at startup)."""
    deadline = time.monotonic() + 180
    while metric(svc.url, gauge) < 1:
        assert time.monotonic() < deadline, f"{gauge} never became 1"
        time.sleep(0.5)


def test_a_query_on_the_onnx_fast_path_embeds_as_a_batch_on_torch_does(
    svc: Proc, alice: Client
) -> None:
    _wait_for_model(svc, "crucible_retrieval_embedding_small_calls_onnx")
    texts = [
        "What is the boiling point of ethanol?",
        "Aspirin inhibits cyclooxygenase.",
        "benzene",
        "How are polymers made from monomers, and which catalysts speed it up?",
        "caffeine half-life in adults",
        "Le Chatelier's principle",
        "SMILES: CC(=O)Oc1ccccc1C(=O)O",
        "Why do noble gases rarely react?",
    ]
    body = {"model": MODEL, "encoding_format": "float"}
    batch = alice.http.post("/v1/embeddings", json={**body, "input": texts})  # torch
    assert batch.status_code == 200, batch.text
    for text, row in zip(texts, batch.json()["data"], strict=True):
        one = alice.http.post("/v1/embeddings", json={**body, "input": text})  # ONNX
        a, b = np.array(one.json()["data"][0]["embedding"]), np.array(row["embedding"])
        assert float(a @ b) > 0.99999, text


def test_search_queries_on_the_8_bit_model_score_and_rank_as_fp32_does(
    svc: Proc, alice: Client
) -> None:
    _wait_for_model(svc, "crucible_retrieval_embedding_queries_int8")
    docs = {
        "aspirin.md": "Aspirin inhibits cyclooxygenase and so reduces inflammation.",
        "ethanol.md": "Ethanol boils at 78 degrees Celsius at sea level.",
        "benzene.md": "Benzene is an aromatic ring of six carbon atoms.",
        "gases.md": "Noble gases have full valence shells and rarely react.",
    }
    store = alice.store(file_ids=[alice.file_id(n, d.encode()) for n, d in docs.items()])
    alice.wait(store)

    def fp32(texts: list[str]) -> np.ndarray:
        r = alice.http.post("/v1/embeddings", json={"model": MODEL, "input": texts})
        return np.array([row["embedding"] for row in r.json()["data"]])

    names = list(docs)
    chunks = fp32([docs[n] for n in names])
    moved: list[float] = []
    for query in ("what does aspirin block?", "boiling point of alcohol", "inert gases", "ring"):
        data = alice.search(store, query=query, ranking_options={"ranker": "none"}).json()["data"]
        exact = dict(zip(names, (chunks @ fp32([query])[0]).tolist(), strict=True))
        assert data[0]["filename"] == max(names, key=lambda n: exact[n]), query
        for d in data:
            assert d["score"] == pytest.approx(max(exact[d["filename"]], 0.0), abs=0.01), query
            moved.append(abs(d["score"] - max(exact[d["filename"]], 0.0)))
    # Really the 8-bit model: on fp32 the scores would match to ~1e-6.
    assert max(moved) > 1e-4


def test_text_over_the_models_window_is_refused_never_truncated(alice: Client) -> None:
    ok = alice.http.post("/v1/embeddings", json={"model": MODEL, "input": "water " * 254})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 256
    r = alice.http.post("/v1/embeddings", json={"model": MODEL, "input": ["short", "water " * 255]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    assert "input[1] has 257 tokens" in err["message"]


def test_a_search_query_over_the_models_window_is_refused(alice: Client) -> None:
    store = alice.store(file_ids=[alice.file_id("w.md", b"water boils at 100 C")])
    alice.wait(store)
    ok = alice.search(store, query="water " * 254)
    assert ok.status_code == 200 and ok.json()["data"], ok.text
    for query, where in (("water " * 255, "query"), (["water", "water " * 300], "query[1]")):
        r = alice.search(store, query=query)
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded", r.text
        assert err["message"].startswith(f"{where} has ") and err["param"] == "query"


def test_a_search_with_several_queries_finds_each_chunk_once_at_its_best_score(
    svc: Proc, alice: Client
) -> None:
    _wait_for_model(svc, "crucible_retrieval_embedding_queries_int8")  # one query model throughout
    files = {"ring.md": b"Benzene is an aromatic ring.", "drink.md": b"Ethanol is an alcohol."}
    store = alice.store(file_ids=[alice.file_id(n, d) for n, d in files.items()])
    alice.wait(store)
    queries = ["benzene aromatic ring", "ethanol alcohol", "ring", "alcohol", "benzene", "ethanol"]
    r = alice.search(store, query=queries, ranking_options={"ranker": "none"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["search_query"] == queries
    names = [d["filename"] for d in body["data"]]
    assert sorted(names) == sorted(files)  # each chunk once, not once per query
    scores = [d["score"] for d in body["data"]]
    assert scores == sorted(scores, reverse=True)
    # Each chunk's score is its best over the queries, each searched alone.
    alone: dict[str, list[float]] = {name: [] for name in files}
    for q in queries:
        one = alice.search(store, query=q, ranking_options={"ranker": "none"}).json()["data"]
        for x in one:
            alone[x["filename"]].append(x["score"])
    for d in body["data"]:
        assert d["score"] == pytest.approx(max(alone[d["filename"]]), abs=1e-4), d["filename"]


@pytest.mark.parametrize(
    ("name", "data", "purpose", "status", "pattern"),
    [
        ("big.txt", b"a" * 300_000, "assistants", 413, "over"),
        ("tool.exe", b"MZ\x90", "assistants", 415, "unsupported file type"),
        ("notes.txt", b"caf\xe9 au lait", "assistants", 400, "not UTF-8"),
        ("paper.pdf", b"this is not a pdf", "assistants", 400, "not a PDF"),
        ("train.jsonl", b'{"a": 1}\n[1, 2]\n', "fine-tune", 400, "line 2"),
        ("train.txt", b"hello", "fine-tune", 400, "JSONL"),
        ("empty.md", b"", "assistants", 400, "empty"),
        ("notes.md", b"hello", "homework", 400, "purpose"),
    ],
)
def test_bad_uploads_are_refused_and_leave_nothing_behind(
    svc: Proc, alice: Client, name: str, data: bytes, purpose: str, status: int, pattern: str
) -> None:
    before = alice.http.get("/v1/files").json()["data"]
    r = alice.upload(name, data, purpose)
    assert r.status_code == status and re.search(pattern, r.json()["error"]["message"])
    assert alice.http.get("/v1/files").json()["data"] == before
    files_dir = svc.log.parent / "files"
    assert sorted(p.name for p in files_dir.iterdir()) == sorted(f["id"] for f in before)


def test_an_owner_filling_the_quota_gets_429_insufficient_quota_and_keeps_every_file(
    svc: Proc,
) -> None:
    """Uploads of 190 kB until the owner's 4 MB are used: then 429 `insufficient_quota` naming
    the bytes; nothing half-stored; another owner unaffected; deleting a file makes room."""
    carol, dave = Client(svc.url, "quota-carol"), Client(svc.url, "quota-dave")
    block = b"Gallium arsenide is a III-V semiconductor.\n" * 4318  # 190 kB
    accepted: list[str] = []
    while len(accepted) < 40:
        r = carol.upload(f"notes-{len(accepted)}.txt", block)
        if r.status_code != 200:
            break
        accepted.append(r.json()["id"])
    assert len(accepted) == QUOTA // len(block), len(accepted)
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["type"] == error["code"] == "insufficient_quota"
    used = len(accepted) * len(block)
    assert f"{used:,} of {QUOTA:,} bytes" in error["message"], error
    listed = {f["id"] for f in carol.http.get("/v1/files").json()["data"]}
    assert listed == set(accepted)
    files_dir = svc.log.parent / "files"
    assert not [p for p in files_dir.iterdir() if p.name.startswith("tmp")]
    assert dave.upload("mine.txt", block).status_code == 200  # per owner
    assert carol.http.delete(f"/v1/files/{accepted[0]}").status_code == 200
    assert carol.upload("again.txt", block).status_code == 200


def test_a_pdf_is_parsed_and_found(alice: Client) -> None:
    file_id = alice.file_id("note.pdf", pdf("Aspirin irreversibly inhibits cyclooxygenase"))
    store = alice.store(file_ids=[file_id])
    assert alice.wait(store)["file_counts"]["completed"] == 1
    hits = alice.search(store, query="what does aspirin inhibit").json()["data"]
    assert hits[0]["filename"] == "note.pdf"
    assert "cyclooxygenase" in hits[0]["content"][0]["text"]


def test_a_document_that_hangs_or_floods_the_parser_fails_and_nothing_else_waits(
    svc: Proc, alice: Client
) -> None:
    """The service's caps here: 2 s and 128 MiB per parse. The poison files fail with the
    reason; a good file added beside them completes, and the service answers throughout."""
    slow = alice.file_id("slow.pdf", SLOW_PDF)
    bomb = alice.file_id("bomb.pdf", BOMB_PDF)
    good = alice.file_id("good.pdf", pdf("Paracetamol is an analgesic and antipyretic"))
    store = alice.store(file_ids=[slow, bomb, good])
    t0 = time.monotonic()
    while alice.http.get(f"/v1/vector_stores/{store}").json()["file_counts"]["in_progress"]:
        r = httpx.get(f"{svc.url}/ready", timeout=1)  # answers while the parsers spin
        assert r.status_code == 200
        assert time.monotonic() - t0 < 60
        time.sleep(0.1)
    files = {f["id"]: f for f in alice.http.get(f"/v1/vector_stores/{store}/files").json()["data"]}
    assert files[good]["status"] == "completed"
    assert files[slow]["status"] == "failed", files[slow]
    assert "longer than 2 s" in files[slow]["last_error"]["message"]
    assert files[bomb]["status"] == "failed", files[bomb]
    assert "128 MiB" in files[bomb]["last_error"]["message"]
    assert files[slow]["last_error"]["code"] == files[bomb]["last_error"]["code"] == "invalid_file"
    hits = alice.search(store, query="what is paracetamol").json()["data"]
    assert [h["file_id"] for h in hits] == [good]


def test_html_is_indexed_as_its_text_without_markup_scripts_or_styles(alice: Client) -> None:
    page = (
        b"<!doctype html><html><head><title>Caffeine</title>"
        b"<style>.zzstyle { color: red }</style>"
        b'<script>var zzscript = "<p>not text</p>";</script></head>'
        b"<body><h1>Caffeine</h1><p>Caffeine is a central nervous system "
        b"<b>stimulant</b> &amp; an adenosine receptor antagonist.</p>"
        b"<noscript>zznoscript</noscript></body></html>"
    )
    store = alice.store(file_ids=[alice.file_id("caffeine.html", page)])
    assert alice.wait(store)["file_counts"]["completed"] == 1
    [hit] = alice.search(store, query="what kind of drug is caffeine").json()["data"]
    text = hit["content"][0]["text"]
    assert "Caffeine is a central nervous system stimulant & an adenosine" in text, text
    for leaked in ("zzstyle", "zzscript", "zznoscript", "<p>", "<b>", "&amp;"):
        assert leaked not in text, text


def test_a_file_with_no_text_fails_with_the_reason(alice: Client) -> None:
    store = alice.store(file_ids=[alice.file_id("blank.md", b"   \n\n  ")])
    body = alice.wait(store)
    assert body["file_counts"]["failed"] == 1
    vs_file = alice.http.get(f"/v1/vector_stores/{store}/files").json()["data"][0]
    assert vs_file["status"] == "failed" and "no text" in vs_file["last_error"]["message"]


@pytest.mark.parametrize(
    ("strategy", "pattern"),
    [
        (
            {
                "type": "static",
                "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400},
            },
            "at most 254",
        ),
        (
            {
                "type": "static",
                "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 150},
            },
            "half",
        ),
        (
            {"type": "static", "static": {"max_chunk_size_tokens": 50, "chunk_overlap_tokens": 0}},
            "greater than or equal",
        ),
        ({"type": "semantic"}, "chunking_strategy"),
    ],
)
def test_chunking_strategies_the_model_cannot_honour_are_400(
    alice: Client, strategy: dict[str, Any], pattern: str
) -> None:
    store = alice.store()
    file_id = alice.file_id("a.md", b"benzene ring")
    r = alice.http.post(
        f"/v1/vector_stores/{store}/files", json={"file_id": file_id, "chunking_strategy": strategy}
    )
    assert r.status_code == 400 and re.search(pattern, r.json()["error"]["message"])


def test_filters_unknown_operators_and_fields_are_400(alice: Client) -> None:
    store = alice.store()
    for bad in (
        {"type": "like", "key": "k", "value": "v"},
        {"type": "eq", "key": "k", "value": "v", "op": "or"},
        {"type": "and", "filters": [{"type": "eq", "key": "k"}]},
    ):
        r = alice.search(store, query="benzene", filters=bad)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("filters")


def test_another_owner_cannot_reach_or_inject_into_my_data(alice: Client, bob: Client) -> None:
    secret = alice.file_id("secret.md", b"The secret formula is C8H10N4O2 caffeine.")
    mine = alice.store(file_ids=[secret])
    alice.wait(mine)
    for path in (
        f"/v1/files/{secret}",
        f"/v1/files/{secret}/content",
        f"/v1/vector_stores/{mine}",
        f"/v1/vector_stores/{mine}/files",
        f"/v1/vector_stores/{mine}/files/{secret}",
    ):
        r = bob.http.get(path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert bob.search(mine, query="secret formula").status_code == 404
    assert bob.http.delete(f"/v1/files/{secret}").status_code == 404
    theirs = bob.store()
    r = bob.http.post(f"/v1/vector_stores/{theirs}/files", json={"file_id": secret})
    assert r.status_code == 404
    own = bob.file_id("own.md", b"Bob's note about benzene.")
    r = bob.http.post(
        f"/v1/vector_stores/{theirs}/files", json={"file_id": own, "attributes": {"k": "v"}}
    )
    assert r.status_code == 200
    bob.wait(theirs)
    hostile = ['" or owner != "bob', "') or true or ('", "*", "\\", f'{mine}", "{secret}']
    for value in hostile:
        for op in ("eq", "ne", "nin"):
            r = bob.search(
                theirs,
                query="secret formula caffeine",
                filters={"type": op, "key": "k", "value": value},
            )
            assert r.status_code == 200
            assert {h["file_id"] for h in r.json()["data"]} <= {own}
    # And alice's data is intact.
    assert alice.search(mine, query="secret formula").json()["data"][0]["file_id"] == secret

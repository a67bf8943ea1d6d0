"""Attribute filters evaluated inside Milvus's C++ engine give exactly the files the service's
own evaluator (`filters.matches`, OpenAI's semantics) gives: typed comparisons, missing
attributes, integers against floats, booleans apart from numbers, and strings built to break
an expression (quotes, backslashes, newlines, an `or` clause, non-ASCII). Several hundred
random filters over files with random attributes, on a real server."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter

from services.retrieval.filters import (
    Filter,
    NotInEngine,
    check_size,
    compile_filter,
    encode_attributes,
    matches,
)
from services.retrieval.vectors import Hnsw, VectorIndex, _scope
from tests.processes import milvus_lite

OWNER, STORE = "olga", "vs_filters"
KEYS = ["color", "year", "score", "flag", 'we"ird\\key', "ключ"]
STRINGS = ["red", "Red", "", 'x" or owner != "', "a\\b", "line\nbreak", "ünï😀", "2024-05-01"]
NUMBERS: list[Any] = [-3, 0, 1, 2, 1.0, 1.5, -0.5, 1e20, 2**62]
BOOLS = [True, False]
FILTER = TypeAdapter(Filter)


def _value(rng: random.Random) -> Any:
    return rng.choice([STRINGS, NUMBERS, BOOLS])[0 if rng.random() < 0.2 else slice(None)]


def _scalar(rng: random.Random) -> Any:
    return rng.choice(rng.choice([STRINGS, NUMBERS, BOOLS]))


def _attributes(rng: random.Random) -> dict[str, Any]:
    return {k: _scalar(rng) for k in rng.sample(KEYS, rng.randint(0, len(KEYS)))}


def _filter(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    if depth < 2 and rng.random() < 0.3:
        kind = rng.choice(["and", "or"])
        return {
            "type": kind,
            "filters": [_filter(rng, depth + 1) for _ in range(rng.randint(1, 3))],
        }
    kind = rng.choice(["eq", "ne", "gt", "gte", "lt", "lte", "in", "nin"])
    if kind in ("in", "nin") or rng.random() < 0.05:
        value: Any = [_scalar(rng) for _ in range(rng.randint(0, 4))]
    else:
        value = _scalar(rng)
    return {"type": kind, "key": rng.choice(KEYS), "value": value}


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VectorIndex]:
    var: Path = tmp_path_factory.mktemp("filters")
    with milvus_lite(var) as milvus:
        idx = VectorIndex(milvus.url, None, "crucible_chunks", 8, timeout=30)
        idx.ensure()
        yield idx
        idx.close()


def _files(index: VectorIndex, files: dict[str, dict[str, Any]], where: str) -> set[str]:
    rows = index.client.query(
        index.collection,
        filter=_scope(OWNER, [STORE], where=where),
        output_fields=["file_id"],
        limit=1000,
        consistency_level="Strong",
    )
    return {r["file_id"] for r in rows}


def test_filters_in_milvus_select_the_same_files_as_the_services_evaluator(
    index: VectorIndex,
) -> None:
    assert index.engine_filters  # the C++ engine runs them
    rng = random.Random(20261202)
    files = {f"file-{i:03d}": _attributes(rng) for i in range(80)}
    files["file-empty"] = {}
    vectors = np.random.default_rng(1).normal(size=(len(files), 8)).astype(np.float32)
    index.upsert(
        [
            {
                "id": f"c{i}",
                "owner": OWNER,
                "vector_store_id": STORE,
                "file_id": fid,
                "position": 0,
                "text": "a chunk",
                "dense": (v / np.linalg.norm(v)).tolist(),
                "attributes": encode_attributes(attrs),
            }
            for i, ((fid, attrs), v) in enumerate(zip(files.items(), vectors, strict=True))
        ]
    )
    index.flush()
    ran = constant = by_service = 0
    nonempty = 0
    for _ in range(400):
        spec = _filter(rng)
        f = FILTER.validate_python(spec)
        check_size(f)
        want = {fid for fid, attrs in files.items() if matches(f, attrs)}
        try:
            compiled = compile_filter(f)
        except NotInEngine:
            by_service += 1  # an ordering comparison with a string unsafe to write
            continue
        if isinstance(compiled, bool):
            constant += 1
            assert want == (set(files) if compiled else set()), spec
            continue
        got = _files(index, files, compiled)
        assert got == want, (spec, compiled)
        ran += 1
        nonempty += bool(want) and want != set(files)
    assert ran >= 250 and nonempty >= 100, (ran, nonempty)
    assert by_service >= 1 and constant >= 1


def test_an_attribute_update_rewrites_the_files_rows(index: VectorIndex) -> None:
    rows = [
        {
            "id": f"u{i}",
            "owner": OWNER,
            "vector_store_id": "vs_update",
            "file_id": "file-up",
            "position": i,
            "text": f"chunk {i}",
            "dense": [1.0] + [0.0] * 7,
            "attributes": encode_attributes({"year": 2023}),
        }
        for i in range(3)
    ]
    index.upsert(rows)
    year = compile_filter(FILTER.validate_python({"type": "gte", "key": "year", "value": 2024}))
    assert isinstance(year, str)

    def found() -> int:
        expr = _scope(OWNER, ["vs_update"], where=year)
        return len(index.client.query(index.collection, filter=expr, output_fields=["id"]))

    assert found() == 0
    assert index.set_attributes(OWNER, "vs_update", "file-up", encode_attributes({"year": 2025}))
    assert found() == 3
    kept = index.client.get(index.collection, ids=["u1"], output_fields=["text", "position"])
    assert (kept[0]["text"], kept[0]["position"]) == ("chunk 1", 1)  # the rest of the row kept


def test_milvus_lite_3_leaves_filters_to_the_service(tmp_path: Path) -> None:
    """Milvus Lite 3 compares JSON keys by other rules (`!=` false on a missing key, no `in`):
    there the service evaluates filters itself."""
    lite3 = VectorIndex(str(tmp_path / "milvus.db"), None, "crucible_chunks", 8)
    try:
        lite3.ensure()
        assert not lite3.engine_filters
    finally:
        lite3.close()


def test_hnsw_takes_the_configured_graph_and_search_width(tmp_path: Path) -> None:
    """CRUCIBLE_RETRIEVAL_HNSW_*: an HNSW index built with the M and efConstruction set, and a
    search width below the results asked for (ef 1 for 10) widened to them: the top 10 come
    back. On Milvus Lite 3 (milvus-lite 2.5.1 has FLAT and IVF_FLAT only; standalone has
    HNSW)."""
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(2000, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with contextlib.ExitStack() as stack:
        uri = str(tmp_path / "milvus.db")
        index = VectorIndex(uri, None, "hnsw", 8, "HNSW", hnsw=Hnsw(m=8, ef_construction=64, ef=1))
        stack.callback(index.close)
        index.ensure()
        assert index.client.describe_index("hnsw", "dense")["index_type"] == "HNSW"
        index.upsert(
            [
                {
                    "id": f"h{i}",
                    "owner": OWNER,
                    "vector_store_id": STORE,
                    "file_id": "f",
                    "position": i,
                    "text": "x",
                    "dense": v.tolist(),
                    "attributes": {},
                }
                for i, v in enumerate(vectors)
            ]
        )
        index.flush()
        q = vectors[7]
        hits = index.search(q, "", OWNER, [STORE], None, 10, False)
        exact = {f"h{i}" for i in np.argsort(-(vectors @ q))[:10]}
        assert len({h.chunk_id for h in hits} & exact) >= 9

"""Retrieval, measured side by side with its baselines in one run.

    python bench/retrieval.py [--chunks 100000] [--rounds 3] [--search-rounds 12] [--smoke]
                              [--out FILE]

1. search: at N chunks, the service's search (over HTTP, query embedding included) against raw
   Milvus Lite search on the same collection, dense and hybrid; recall@10 against exact numpy
   search; FLAT and HNSW both measured, the faster one with recall >= 0.95 used. Milvus Lite
   runs as its own server process, as in `make up`; raw calls and the service's searches take
   turns on it, query by query.
2. ingestion: end to end (parse, chunk, embed, upsert, reconcile) tokens/s against raw embedding
   of the same chunks with the same model, alternating; where the service's time goes.
3. backends: onnx-int8 against torch fp32 tokens/s, alternating; cosine to fp32; hit@5.
4. quality: hit@5 and MRR on the labelled chemistry queries, dense against hybrid
   (`--quality-by-engine`: only this part, on Milvus Lite 3 and on the C++ engine, writing
   bench/results/retrieval_quality.json).

Chunks for the search part carry random unit vectors and random corpus words (embedding 100k
real chunks would take many minutes on CPU); queries are real embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import write_result
from bench.retrieval_milvus import (
    CORPUS,
    DATA,
    INDEXES,
    OWNER,
    build_collection,
    collection_name,
    cpp_server,
    milvus_server,
    raw_search,
    recall_and_latency,
    release_others,
)
from services.retrieval.catalog import Catalog
from services.retrieval.chunking import chunk_text, resolve
from services.retrieval.embedder import Embedder, export_onnx, packaged_model_dir
from services.retrieval.vectors import _scope
from services.stackconfig import ROOT, _free_port, _http_ok

QUERIES = [json.loads(line) for line in (DATA / "chemistry-queries.jsonl").open()]
TOKEN = "bench-internal-token"  # noqa: S105  (the bench's own service, on a temporary dir)
WINDOW = 256


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def p95_difference_ci90(raw: list[float], svc: list[float], draws: int = 2000) -> list[float]:
    """A 90% bootstrap interval (ms) for the service's p95 minus raw Milvus's: the pairs
    (one query's two searches) are resampled together. A difference of two p95s over a few
    hundred searches swings by tens of milliseconds on this machine; the interval says how far."""
    a, b = np.asarray(raw), np.asarray(svc)
    idx = np.random.default_rng(0).integers(0, len(a), (draws, len(a)))
    diffs = np.percentile(b[idx], 95, axis=1) - np.percentile(a[idx], 95, axis=1)
    return [round(float(np.percentile(diffs, q)) * 1000, 2) for q in (5, 95)]


def ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(values, 50) * 1000, 2),
        "p95_ms": round(pct(values, 95) * 1000, 2),
        "n": len(values),
    }


# --- the search (the raw Milvus side is in retrieval_milvus.py) -------------------------------


def catalog_rows(var: Path) -> str:
    """The store and its 100 files, completed, as the service's catalog knows them."""
    catalog = Catalog(f"sqlite:///{var / 'retrieval.db'}")
    store = catalog.add_store(OWNER, "bench", {}, None)
    for i in range(100):
        file_id = f"file-{i:024x}"
        catalog.add_file(OWNER, file_id, f"doc{i}.md", "assistants", 1, "0" * 64)
        catalog.add_store_file(OWNER, store.id, file_id, resolve(None, WINDOW), {})
        catalog.finish(store.id, file_id, chunk_count=1)
    catalog.engine.dispose()
    return store.id


def search_side_by_side(
    uri: str,
    http: httpx.Client,
    collection: str,
    store_id: str,
    qvecs: np.ndarray,
    texts: list[str],
    rounds: int,
) -> dict[str, dict[str, list[float]]]:
    """Raw Milvus and the service on the same Milvus server, query by query, taking turns at
    going first, so the machine's drift hits both alike (round 0 warms up). "own" is each
    service search's time less its Milvus call (the service's `Server-Timing`): what the
    service itself adds, free of Milvus Lite's own swings."""
    from pymilvus import MilvusClient

    raw = MilvusClient(uri)
    raw.load_collection(collection)
    expr = _scope(OWNER, [store_id])
    out: dict[str, dict[str, list[float]]] = {
        side: {"dense": [], "hybrid": []} for side in ("raw", "service", "own")
    }

    def service_once(text: str, mode: str) -> float:
        resp = http.post(
            f"/v1/vector_stores/{store_id}/search",
            json={
                "query": text,
                "max_num_results": 10,
                "ranking_options": {"ranker": "none" if mode == "dense" else "auto"},
            },
        )
        resp.raise_for_status()
        return milvus_seconds(resp.headers["server-timing"])

    try:
        for r in range(rounds + 1):
            for i, (v, text) in enumerate(zip(qvecs, texts, strict=True)):
                for mode in ("dense", "hybrid"):
                    sides: list[tuple[str, Callable[[], float | None]]] = [
                        ("raw", partial(raw_search, raw, collection, expr, v, text, mode)),
                        ("service", partial(service_once, text, mode)),
                    ]
                    for side, fn in sides if (i + r) % 2 == 0 else sides[::-1]:
                        t = time.perf_counter()
                        in_milvus = fn()
                        elapsed = time.perf_counter() - t
                        if r:
                            out[side][mode].append(elapsed)
                        if r and in_milvus is not None:
                            out["own"][mode].append(elapsed - in_milvus)
    finally:
        raw.close()
    return out


def milvus_seconds(server_timing: str) -> float:
    """The `milvus;dur=` of a search's `Server-Timing` header, in seconds."""
    parts = dict(p.strip().split(";dur=") for p in server_timing.split(","))
    return float(parts["milvus"]) / 1000


# --- the service ------------------------------------------------------------------------------


@contextmanager
def service(var: Path, **settings: str) -> Iterator[httpx.Client]:
    port = _free_port()
    env = {
        **os.environ,
        "CRUCIBLE_VAR_DIR": str(var),
        "CRUCIBLE_RETRIEVAL_PORT": str(port),
        "CRUCIBLE_INTERNAL_TOKEN": TOKEN,
        "CRUCIBLE_RETRIEVAL_LOG_LEVEL": "WARNING",
        **{f"CRUCIBLE_RETRIEVAL_{k.upper()}": v for k, v in settings.items()},
    }
    with open(var / "service.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.retrieval"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _http_ok(f"{url}/ready"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (var / "service.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"retrieval did not start:\n{tail}")
            time.sleep(0.2)
        with httpx.Client(
            base_url=url,
            timeout=300,
            headers={"authorization": f"Bearer {TOKEN}", "x-crucible-owner": OWNER},
        ) as client:
            yield client
    finally:
        proc.terminate()
        proc.wait(30)


def phase_seconds(client: httpx.Client) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("crucible_retrieval_ingestion_phase_seconds_total{"):
            phase = line.split('phase="')[1].split('"')[0]
            out[phase] = float(line.split()[-1])
    return out


def ingest_once(client: httpx.Client, file_ids: list[str]) -> float:
    start = time.perf_counter()
    store = client.post("/v1/vector_stores", json={"file_ids": file_ids}).json()["id"]
    while client.get(f"/v1/vector_stores/{store}").json()["file_counts"]["in_progress"]:
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    counts = client.get(f"/v1/vector_stores/{store}").json()["file_counts"]
    assert counts["completed"] == len(file_ids), counts
    client.delete(f"/v1/vector_stores/{store}")
    return elapsed


# --- quality ----------------------------------------------------------------------------------


def relevant(q: dict[str, str], filename: str, text: str) -> bool:
    return filename == q["file"] and q["passage"] in text


def corpus_store(client: httpx.Client) -> str:
    """The labelled corpus uploaded into a new store, once ingested: its id."""
    files = [
        client.post(
            "/v1/files", files={"file": (p_.name, p_.read_bytes())}, data={"purpose": "assistants"}
        ).json()["id"]
        for p_ in CORPUS
    ]
    store = client.post("/v1/vector_stores", json={"file_ids": files}).json()["id"]
    while client.get(f"/v1/vector_stores/{store}").json()["file_counts"]["in_progress"]:
        time.sleep(0.05)
    return str(store)


def service_quality(client: httpx.Client, store_id: str) -> dict[str, dict[str, float]]:
    out = {}
    for mode, ranker in (("dense", "none"), ("hybrid", "auto")):
        hits, rr = 0, 0.0
        for q in QUERIES:
            data = client.post(
                f"/v1/vector_stores/{store_id}/search",
                json={
                    "query": q["query"],
                    "max_num_results": 10,
                    "ranking_options": {"ranker": ranker},
                },
            ).json()["data"]
            ranks = [
                i
                for i, d in enumerate(data, 1)
                if relevant(q, d["filename"], d["content"][0]["text"])
            ]
            hits += bool(ranks and ranks[0] <= 5)
            rr += 1 / ranks[0] if ranks else 0.0
        out[mode] = {"hit_at_5": round(hits / len(QUERIES), 4), "mrr": round(rr / len(QUERIES), 4)}
    return out


def corpus_chunks(embedder: Embedder) -> list[tuple[str, str]]:
    return [
        (p.name, c.text)
        for p in CORPUS
        for c in chunk_text(embedder.tokenizer, p.read_text(), resolve(None, WINDOW))
    ]


def hit_at_5(embedder: Embedder, chunks: list[tuple[str, str]], queries: bool = False) -> float:
    vecs = embedder.encode([t for _, t in chunks])
    # As a search embeds them: one at a time (a search's queries on the 8-bit model, with
    # `queries`).
    qv = np.vstack([embedder.encode([q["query"]], queries=queries) for q in QUERIES])
    hits = 0
    for q, v in zip(QUERIES, qv, strict=True):
        top = np.argsort(-(vecs @ v))[:5]
        hits += any(relevant(q, *chunks[i]) for i in top)
    return round(hits / len(QUERIES), 4)


def alternate(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each measurement once per round, in turn, so drift hits all of them alike."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append(fn())
    return out


def quality_by_engine(out: Path | None) -> int:
    """Hit@5 and MRR on the labelled chemistry set with the service on each native engine:
    the same corpus ingested into each, the same queries."""
    result: dict[str, Any] = {}
    for engine in ("lite3", "cpp"):
        with tempfile.TemporaryDirectory(prefix="crucible-bench-") as tmp, ExitStack() as stack:
            var = Path(tmp)
            if engine == "cpp":
                uri, _ = stack.enter_context(cpp_server(var))
            else:
                uri = stack.enter_context(milvus_server(var))
            with service(var, milvus_uri=uri) as client:
                result[engine] = service_quality(client, corpus_store(client))
    print(result)
    print(f"wrote {write_result('retrieval_quality', result, out)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--search-rounds", type=int, default=12, help="rounds over the 40 queries, search part"
    )
    p.add_argument("--copies", type=int, default=6, help="corpus copies for ingestion")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    p.add_argument(
        "--quality-by-engine", action="store_true", help="only part 4, on each native engine"
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quality_by_engine:
        return quality_by_engine(args.out)
    if args.smoke:
        args.chunks, args.rounds, args.search_rounds, args.copies = 2000, 1, 1, 1
    result: dict[str, Any] = {
        "chunks": args.chunks,
        "rounds": args.rounds,
        "search_rounds": args.search_rounds,
    }
    with tempfile.TemporaryDirectory(prefix="crucible-bench-") as tmp, ExitStack() as stack:
        var = Path(tmp)
        torch_embedder = Embedder(backend="torch")
        texts = [q["query"] for q in QUERIES]
        qvecs = torch_embedder.encode(texts)
        print(f"building {args.chunks} chunks ({', '.join(INDEXES)}) ...", file=sys.stderr)
        store_id = catalog_rows(var)
        # Milvus Lite holds its file until its process ends: the build runs in children.
        for kind in INDEXES:
            in_child(build_collection, var, args.chunks, kind, store_id)
        indexes: dict[str, dict[str, float]] = {}
        with milvus_server(var) as uri:
            for kind in INDEXES:
                recall, times, numpy_s = recall_and_latency(
                    uri, collection_name(kind), args.chunks, qvecs
                )
                indexes[kind] = {
                    "recall_at_10": recall,
                    **ms(times),
                    "numpy_exact_ms": round(numpy_s * 1000, 2),
                }
        # The choice is among what the service can create (CRUCIBLE_RETRIEVAL_DENSE_INDEX, inner
        # product); FLAT-COSINE is measured for comparison only.
        offered = {k: indexes[k] for k in ("FLAT", "HNSW")}
        ok = {k: v for k, v in offered.items() if v["recall_at_10"] >= 0.95}
        chosen = min(ok or offered, key=lambda k: offered[k]["p95_ms"])
        collection = collection_name(chosen)
        result["indexes"] = indexes
        result["index_chosen"] = chosen
        print(f"index {chosen}: {indexes}", file=sys.stderr)

        # The service's fp32 ONNX export for small calls, made before it starts (a first start
        # makes it in the background, serving queries on torch until it is loaded).
        onnx_dir = var / "models" / "all-MiniLM-L6-v2-onnx-fp32"
        in_child(export_onnx, packaged_model_dir(), onnx_dir, False)
        # A fresh server holding only the collection searched, as `make up` runs it for the
        # service: the three collections loaded at once made every search slower and its tail
        # longer (BENCHMARKS.md).
        uri = stack.enter_context(milvus_server(var))
        release_others(uri, collection)
        with service(var, collection=collection, milvus_uri=uri) as client:
            both = search_side_by_side(
                uri, client, collection, store_id, qvecs, texts, args.search_rounds
            )
            file_ids, tokens = [], 0
            for path in CORPUS:
                text = "\n\n".join([path.read_text()] * args.copies)
                tokens += sum(
                    c.tokens + 2
                    for c in chunk_text(torch_embedder.tokenizer, text, resolve(None, WINDOW))
                )
                file_ids.append(
                    client.post(
                        "/v1/files",
                        files={"file": (path.name, text)},
                        data={"purpose": "assistants"},
                    ).json()["id"]
                )
            chunk_texts = [
                c.text
                for p_ in CORPUS
                for c in chunk_text(
                    torch_embedder.tokenizer,
                    "\n\n".join([p_.read_text()] * args.copies),
                    resolve(None, WINDOW),
                )
            ]
            before = phase_seconds(client)
            ingest = alternate(
                {
                    "raw_embedding": lambda: _timed(lambda: torch_embedder.encode(chunk_texts)),
                    "service": lambda: ingest_once(client, file_ids),
                },
                args.rounds,
            )
            after = phase_seconds(client)
            result["quality"] = service_quality(client, corpus_store(client))
        for mode in ("dense", "hybrid"):
            raw, svc = both["raw"][mode], both["service"][mode]
            result.setdefault("search", {})[mode] = {
                "raw_milvus": ms(raw),
                "service": ms(svc),
                "p50_overhead_ms": round((pct(svc, 50) - pct(raw, 50)) * 1000, 2),
                "p95_overhead_ms": round((pct(svc, 95) - pct(raw, 95)) * 1000, 2),
                "p95_overhead_ci90_ms": p95_difference_ci90(raw, svc),
                # The same query's two searches, back to back: what the service adds to each.
                "paired_overhead_ms": {
                    **ms(paired := [b - a for a, b in zip(raw, svc, strict=True)]),
                    "p5_ms": round(pct(paired, 5) * 1000, 2),
                },
                # Each service search less its own Milvus call: the service's own time.
                "service_own_ms": {
                    **ms(own := both["own"][mode]),
                    "p99_ms": round(pct(own, 99) * 1000, 2),
                },
            }
        raw_tps = [tokens / s for s in ingest["raw_embedding"]]
        svc_tps = [tokens / s for s in ingest["service"]]
        spent = {k: round(after.get(k, 0) - before.get(k, 0), 3) for k in after}
        result["ingestion"] = {
            "tokens": tokens,
            "chunks": len(chunk_texts),
            "raw_embedding_tokens_per_s": [round(x) for x in raw_tps],
            "service_tokens_per_s": [round(x) for x in svc_tps],
            "median_ratio_service_over_raw": round(
                statistics.median(svc_tps) / statistics.median(raw_tps), 3
            ),
            "service_seconds_by_phase": spent,
        }
        result["backends"] = compare_backends(torch_embedder, chunk_texts, var, args.rounds)
    path = write_result("retrieval", result, args.out)
    print(
        json.dumps(
            {k: result[k] for k in ("index_chosen", "search", "ingestion", "backends", "quality")},
            indent=1,
        )
    )
    print(f"wrote {path}", file=sys.stderr)
    return 0


def compare_backends(
    torch_embedder: Embedder, texts: list[str], var: Path, rounds: int
) -> dict[str, Any]:
    # The service's models for small calls: the fp32 ONNX export and, for search queries, its
    # 8-bit block quantization (made from it, in the background, as at a service's start).
    small = Embedder(
        backend="torch",
        small_onnx_dir=var / "onnx-fp32",
        query_onnx_dir=var / "onnx-int8-blocks",
    )
    deadline = time.monotonic() + 300
    while not small.queries_on_int8 and time.monotonic() < deadline:
        time.sleep(0.2)
    onnx = Embedder(backend="onnx-int8", onnx_dir=var / "onnx-int8")
    # The same Embedder batching over the 8-bit block export (an ONNX backend loads whatever
    # export its directory holds): a candidate for batches, measured, not used.
    blocks = Embedder(backend="onnx-int8", onnx_dir=var / "onnx-int8-blocks")
    tokens = sum(torch_embedder.count_tokens(texts))
    runs = alternate(
        {
            "torch_fp32": lambda: _timed(lambda: torch_embedder.encode(texts)),
            "onnx_int8": lambda: _timed(lambda: onnx.encode(texts)),
            "onnx_int8_blocks": lambda: _timed(lambda: blocks.encode(texts)),
        },
        rounds,
    )
    tps = {k: [round(tokens / s) for s in v] for k, v in runs.items()}
    exact = torch_embedder.encode(texts)
    cos = (exact * onnx.encode(texts)).sum(axis=1)
    cos_blocks = (exact * blocks.encode(texts)).sum(axis=1)
    chunks = corpus_chunks(torch_embedder)
    # One query at a time, as a search embeds it: torch, the fp32 ONNX export (small
    # embedding calls) and the 8-bit block export (search queries), in turns, query by query.
    queries = [q["query"] for q in QUERIES]
    models: list[tuple[str, Callable[[str], Any]]] = [
        ("torch_fp32", lambda q: torch_embedder.encode([q])),
        ("onnx_fp32", lambda q: small.encode([q])),
        ("onnx_int8_blocks", lambda q: small.encode([q], queries=True)),
    ]
    latency: dict[str, list[float]] = {name: [] for name, _ in models}
    for r in range(rounds + 1):
        for i, q in enumerate(queries):
            k = (i + r) % len(models)
            for name, fn in models[k:] + models[:k]:
                elapsed = _timed(partial(fn, q))
                if r:
                    latency[name].append(elapsed)
    reference = torch_embedder.encode(queries)
    qcos = (reference * np.vstack([small.encode([q]) for q in queries])).sum(1)
    bcos = (reference * np.vstack([small.encode([q], queries=True) for q in queries])).sum(1)
    # int8 quantizes activations per call: a query's vector depends on what it is batched with.
    alone = np.vstack([onnx.encode([q]) for q in queries])
    batched = onnx.encode(queries)
    int8_query = {
        "cosine_to_fp32_min": round(float((alone * reference).sum(1).min()), 4),
        "alone_vs_in_batch_cosine_min": round(float((alone * batched).sum(1).min()), 4),
    }
    med = {k: statistics.median(v) for k, v in latency.items()}
    return {
        "one_query": {
            **{k: ms(v) for k, v in latency.items()},
            "median_ratio_torch_over_onnx_fp32": round(med["torch_fp32"] / med["onnx_fp32"], 3),
            "median_ratio_onnx_fp32_over_int8_blocks": round(
                med["onnx_fp32"] / med["onnx_int8_blocks"], 3
            ),
            "cosine_onnx_fp32_to_torch_min": round(float(qcos.min()), 6),
            "cosine_int8_blocks_to_torch": {
                "min": round(float(bcos.min()), 4),
                "mean": round(float(bcos.mean()), 4),
            },
        },
        "tokens_per_s": tps,
        "median_ratio_onnx_int8_over_torch": round(
            statistics.median(tps["onnx_int8"]) / statistics.median(tps["torch_fp32"]), 3
        ),
        "median_ratio_onnx_int8_blocks_over_torch": round(
            statistics.median(tps["onnx_int8_blocks"]) / statistics.median(tps["torch_fp32"]), 3
        ),
        "cosine_to_fp32": {"min": round(float(cos.min()), 4), "mean": round(float(cos.mean()), 4)},
        "cosine_int8_blocks_to_fp32": {
            "min": round(float(cos_blocks.min()), 4),
            "mean": round(float(cos_blocks.mean()), 4),
        },
        "onnx_int8_queries": int8_query,
        "hit_at_5": {
            "torch_fp32": hit_at_5(torch_embedder, chunks),
            "onnx_int8": hit_at_5(onnx, chunks),
            # The service's case: 8-bit query vectors against torch's chunk vectors.
            "int8_blocks_queries": hit_at_5(small, chunks, queries=True),
        },
    }


def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` in a fresh process (which releases Milvus Lite's lock when it ends)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())

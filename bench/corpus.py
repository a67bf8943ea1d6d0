"""A realistic retrieval corpus for the 500k-chunk benchmarks (#26): real text, real embeddings.

    python bench/corpus.py --count 500000 [--embed] [--backend torch|onnx-int8]

Passages are the documentation that ships inside this checkout's environments: the docstrings of
every Python module, class and function in `.venv`'s and `.venv-vllm`'s site-packages and their
Markdown, reST and text files, cut into windows of 20 to 80 words at sentence ends, exact
duplicates and passages over the model's 256-token window dropped, in a fixed order (sorted
paths), so two machines build the same corpus. One passage in 500 gives a labelled query: its
first sentence (8 to 30 words), whose relevant passage is the one it came from.

Everything goes under `var/bench-corpus/` (never in `make test`): `passages.jsonl` (id, text),
`queries.jsonl` (query, passage id), and with `--embed` the all-MiniLM-L6-v2 vectors in shards
of 10,000 (`vectors-00000.npy`, float32, unit length), each written once complete, so an
interrupted run goes on where it stopped. `--count` passages are kept; fewer if the
environment holds fewer (it says how many it found).

Embedding is the long part: on this 2-core machine ~7k tokens/s (BENCHMARKS.md, "Embedding
backends"); the script prints its rate and the time left as it goes.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.stackconfig import ROOT

OUT = ROOT / "var" / "bench-corpus"
SHARD = 10_000
MIN_WORDS, MAX_WORDS = 20, 80
QUERY_EVERY = 500
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORDY = re.compile(r"[A-Za-z]{3,}")


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _documents(root: Path) -> Iterator[str]:
    for path in sorted(root.rglob("*")):
        if path.suffix == ".py":  # a file's docstrings, one after the other, as one document
            yield "\n".join(_docstrings(path))
        elif path.suffix in (".md", ".rst", ".txt") and path.stat().st_size < 2_000_000:
            try:
                yield path.read_text(errors="ignore")
            except OSError:
                continue


def _prose(text: str) -> bool:
    """Mostly words, not code, tables or licences' boilerplate lines."""
    words = text.split()
    return len(_WORDY.findall(text)) >= 0.7 * len(words)


def _windows(document: str) -> Iterator[str]:
    """Sentence-aligned windows of MIN_WORDS..MAX_WORDS words over one document."""
    window: list[str] = []
    for sentence in _SENTENCE_END.split(" ".join(document.split())):
        words = sentence.split()
        if len(window) + len(words) > MAX_WORDS and len(window) >= MIN_WORDS:
            yield " ".join(window)
            window = []
        window.extend(words[:MAX_WORDS])
    if len(window) >= MIN_WORDS:
        yield " ".join(window[:MAX_WORDS])


def passages(roots: list[Path], count: int, fits: Callable[[str], bool]) -> Iterator[str]:
    seen: set[bytes] = set()
    kept = 0
    for document in (d for root in roots for d in _documents(root)):
        for text in _windows(document):
            digest = hashlib.blake2b(text.lower().encode(), digest_size=12).digest()
            if digest in seen or not _prose(text) or not fits(text):
                continue
            seen.add(digest)
            yield text
            kept += 1
            if kept == count:
                return


def first_sentence(text: str) -> str | None:
    words = _SENTENCE_END.split(text, maxsplit=1)[0].split()
    return " ".join(words) if 8 <= len(words) <= 30 else None


def build_text(count: int) -> tuple[int, int]:
    """passages.jsonl and queries.jsonl; how many of each."""
    from services.retrieval.embedder import load_tokenizer, packaged_model_dir

    OUT.mkdir(parents=True, exist_ok=True)
    model = packaged_model_dir()
    tokenizer = load_tokenizer(model)
    window = json.loads((model / "sentence_bert_config.json").read_text())["max_seq_length"]

    def fits(text: str) -> bool:  # the model reads it whole (the service never cuts a text)
        return len(tokenizer.encode(text).ids) <= window

    # This environment's packages, then the engine's (vLLM, torch, transformers: the most text).
    site = [Path(sysconfig.get_paths()["purelib"])]
    site += sorted((ROOT / ".venv-vllm").glob("lib/python3*/site-packages"))
    n = q = 0
    with (
        open(OUT / "passages.jsonl", "w") as out,
        open(OUT / "queries.jsonl", "w") as queries,
    ):
        for n, text in enumerate(passages(site, count, fits), start=1):
            pid = f"p{n - 1:07d}"
            out.write(json.dumps({"id": pid, "text": text}) + "\n")
            if n % QUERY_EVERY == 0 and (query := first_sentence(text)) is not None:
                queries.write(json.dumps({"query": query, "passage": pid}) + "\n")
                q += 1
    return n, q


def embed(backend: str, batch: int) -> None:
    from services.retrieval.embedder import Embedder

    with open(OUT / "passages.jsonl") as f:
        texts = [json.loads(line)["text"] for line in f]
    embedder = Embedder(backend="torch" if backend == "torch" else "onnx-int8", batch_size=batch)
    print(f"embedding {len(texts)} passages ({backend}) ...", file=sys.stderr)
    start, done_tokens, done = time.monotonic(), 0, 0
    shards = range(0, len(texts), SHARD)
    for first in shards:
        path = OUT / f"vectors-{first // SHARD:05d}.npy"
        if path.exists():
            continue
        part = texts[first : first + SHARD]
        vectors = embedder.encode(part).astype(np.float32)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vectors)
        tmp.rename(path)
        done_tokens, done = done_tokens + sum(embedder.count_tokens(part)), done + len(part)
        rate = done_tokens / (time.monotonic() - start)
        left = sum(1 for f in shards if not (OUT / f"vectors-{f // SHARD:05d}.npy").exists())
        minutes = left * SHARD * (done_tokens / done) / rate / 60
        print(f"{path.name}: {rate:,.0f} tokens/s; {left} shards left, ~{minutes:.0f} min")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=500_000)
    p.add_argument("--embed", action="store_true", help="embed the passages (long)")
    p.add_argument("--backend", choices=["torch", "onnx-int8"], default="torch")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--keep-text", action="store_true", help="embed the passages already built")
    args = p.parse_args(argv)
    if not (args.keep_text and (OUT / "passages.jsonl").exists()):
        t = time.monotonic()
        n, q = build_text(args.count)
        print(f"{n} passages, {q} labelled queries in {time.monotonic() - t:.0f} s -> {OUT}")
        if n < args.count:
            print(f"the environment holds {n} passages, not {args.count}", file=sys.stderr)
    if args.embed:
        embed(args.backend, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())

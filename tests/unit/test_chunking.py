"""Chunks fit the embedding model's window whole, cover the text, and are deterministic."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from services.retrieval.chunking import (
    AutoStrategy,
    ChunkingError,
    StaticParams,
    StaticStrategy,
    chunk_id,
    chunk_text,
    resolve,
    tokenize,
)
from services.retrieval.embedder import load_tokenizer, packaged_model_dir

WINDOW = 256  # all-MiniLM-L6-v2: 254 word pieces plus [CLS] and [SEP]

WORDS = st.sampled_from(
    [
        "acetylsalicylic",
        "acid",
        "C6H6",
        "Hückel's",
        "4n+2",
        "—",
        "pKa",
        "1,3,7-trimethylxanthine",
        "(COX-1)",
        "ΔG°",
        "naïve",
        "x" * 120,
        "日本語",
        "\n\n",
        "the",
        "of",
        "a",
        "-RT",
        "ln",
        "K.",
    ]
)
TEXTS = st.lists(WORDS, min_size=1, max_size=900).map(" ".join)


@cache
def tokenizer() -> Tokenizer:
    return load_tokenizer(packaged_model_dir())


def _static(size: int, overlap: int) -> dict[str, object]:
    return {
        "type": "static",
        "static": {"max_chunk_size_tokens": size, "chunk_overlap_tokens": overlap},
    }


@settings(max_examples=60, deadline=None)
@given(text=TEXTS, size=st.integers(100, 254), overlap_share=st.floats(0, 0.5))
def test_every_chunk_tokenizes_back_within_its_size(
    text: str, size: int, overlap_share: float
) -> None:
    overlap = int(size * overlap_share)
    chunks = chunk_text(tokenizer(), text, _static(size, overlap))
    for c in chunks:
        again = tokenizer().encode(c.text, add_special_tokens=True)
        assert len(again.ids) <= size + 2 <= WINDOW
        assert c.tokens <= size


@settings(max_examples=60, deadline=None)
@given(text=TEXTS, size=st.integers(100, 254))
def test_chunks_cover_every_token_in_order(text: str, size: int) -> None:
    offsets, _ = tokenize(tokenizer(), text)
    chunks = chunk_text(tokenizer(), text, _static(size, size // 4))
    assert [c.position for c in chunks] == list(range(len(chunks)))
    joined = "".join(c.text for c in chunks)
    for start, end in offsets:  # no word piece is left out of every chunk
        assert text[start:end] in joined
    # Chunks follow the text: each begins where the text has it, in order.
    cursor = 0
    for c in chunks:
        found = text.find(c.text, cursor if c.position == 0 else 0)
        assert found >= 0
        cursor = found


def test_chunking_is_deterministic_and_ids_depend_on_store_file_and_content() -> None:
    text = " ".join(f"word{i} is here." for i in range(600))
    a = chunk_text(tokenizer(), text, resolve(None, WINDOW))
    b = chunk_text(tokenizer(), text, resolve(None, WINDOW))
    assert a == b and len(a) > 3
    ids = {chunk_id("vs_1", "file-1", c) for c in a}
    assert len(ids) == len(a)
    assert chunk_id("vs_2", "file-1", a[0]) != chunk_id("vs_1", "file-1", a[0])
    assert chunk_id("vs_1", "file-2", a[0]) != chunk_id("vs_1", "file-1", a[0])


def test_auto_fills_the_model_window() -> None:
    assert resolve(AutoStrategy(), WINDOW)["static"] == {
        "max_chunk_size_tokens": 254,
        "chunk_overlap_tokens": 63,
    }


def test_a_static_size_beyond_the_window_is_refused_not_truncated() -> None:
    with pytest.raises(ChunkingError, match="at most 254"):
        resolve(StaticStrategy(type="static", static=StaticParams()), WINDOW)  # OpenAI's 800


def test_overlap_over_half_the_size_is_refused() -> None:
    strategy = StaticStrategy(
        type="static", static=StaticParams(max_chunk_size_tokens=200, chunk_overlap_tokens=101)
    )
    with pytest.raises(ChunkingError, match="half"):
        resolve(strategy, WINDOW)

"""Chunking by the embedding model's own word pieces, so every chunk fits its window whole.

Pure functions over token spans (character offsets into the text, and whether each token starts
a word). Chunk boundaries fall on word starts, so a chunk's text tokenizes back to the same
pieces it was cut from: its size is exact, and no text is cut off from its embedding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

# OpenAI's bounds for a static strategy; the model's window narrows the upper one (see `resolve`).
MIN_CHUNK, MAX_CHUNK = 100, 4096


class StaticParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_chunk_size_tokens: int = Field(default=800, ge=MIN_CHUNK, le=MAX_CHUNK, strict=True)
    chunk_overlap_tokens: int = Field(default=400, ge=0, strict=True)


class StaticStrategy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["static"]
    static: StaticParams


class AutoStrategy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["auto"] = "auto"


Strategy = AutoStrategy | StaticStrategy


class ChunkingError(ValueError):
    """A strategy that cannot be honoured for this model (a 400 for the client)."""


def resolve(strategy: Strategy | None, window: int) -> dict[str, Any]:
    """The static parameters a strategy means for a model reading `window` tokens (specials
    included), as OpenAI reports them on a vector store file."""
    room = window - 2  # [CLS] and [SEP]
    if strategy is None or isinstance(strategy, AutoStrategy):
        # Auto fills the model's window, with a quarter of it shared between neighbours.
        size, overlap = room, room // 4
    else:
        size = strategy.static.max_chunk_size_tokens
        overlap = strategy.static.chunk_overlap_tokens
        if overlap > size // 2:
            raise ChunkingError(
                "chunk_overlap_tokens must not exceed half of max_chunk_size_tokens"
            )
        if size > room:
            raise ChunkingError(
                f"max_chunk_size_tokens {size} is beyond the embedding model's window: it reads "
                f"at most {room} tokens per chunk, and text past that would be lost. "
                f"Use at most {room}, or the auto strategy."
            )
    return {
        "type": "static",
        "static": {"max_chunk_size_tokens": size, "chunk_overlap_tokens": overlap},
    }


@dataclass(frozen=True)
class Chunk:
    position: int
    text: str
    tokens: int  # word pieces, without the special tokens
    sha256: str


def split(
    text: str, offsets: list[tuple[int, int]], word_starts: list[bool], size: int, overlap: int
) -> list[Chunk]:
    """Cut `text` (tokenized as `offsets`) into chunks of at most `size` tokens, neighbours
    sharing about `overlap` tokens. Deterministic: the same input gives the same chunks."""
    n = len(offsets)
    chunks: list[Chunk] = []
    i = 0
    while i < n:
        j = min(i + size, n)
        if j < n:
            # End before the word that would be split; a single word longer than `size` is cut.
            k = j
            while k > i + 1 and not word_starts[k]:
                k -= 1
            j = k if word_starts[k] else j
        body = text[offsets[i][0] : offsets[j - 1][1]]
        digest = hashlib.sha256(body.encode()).hexdigest()
        chunks.append(Chunk(len(chunks), body, j - i, digest))
        if j == n:
            break
        # The next chunk starts `overlap` tokens back, moved forward to a word start.
        nxt = max(j - overlap, i + 1)
        while nxt < j and not word_starts[nxt]:
            nxt += 1
        i = nxt
    return chunks


def tokenize(tokenizer: Tokenizer, text: str) -> tuple[list[tuple[int, int]], list[bool]]:
    """The spans `split` needs: each word piece's character offsets and whether it starts a
    word (the model's own pre-tokenizer decides what a word is)."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    words = enc.word_ids
    starts = [t == 0 or words[t] != words[t - 1] for t in range(len(words))]
    return list(enc.offsets), starts


def chunk_text(tokenizer: Tokenizer, text: str, chunking: dict[str, Any]) -> list[Chunk]:
    """Chunks of `text` under a resolved strategy (see `resolve`)."""
    offsets, starts = tokenize(tokenizer, text)
    params = chunking["static"]
    return split(
        text, offsets, starts, params["max_chunk_size_tokens"], params["chunk_overlap_tokens"]
    )


def chunk_id(vector_store_id: str, file_id: str, chunk: Chunk) -> str:
    """Deterministic: re-ingesting the same file into the same store upserts the same rows."""
    key = f"{vector_store_id}\0{file_id}\0{chunk.position}\0{chunk.sha256}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]

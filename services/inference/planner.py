"""Memory planner: will a model and its vLLM flags fit on these GPUs, and with how much KV cache?

vLLM gives every rank of a tensor- or expert-parallel group the same memory fraction and the
same number of KV cache blocks, so the smallest GPU of a mixed pair bounds the whole group. The
planner computes, per GPU, from the model's `config.json`:

- weights: dtype- and quantization-aware; attention and dense MLP sharded by tensor parallelism,
  experts split across expert-parallel ranks, layers split by pipeline stage, everything
  replicated under data parallelism;
- LoRA slots: `max_loras` x rank x (in + out) of every adapted matrix (experts included);
- runtime: a fixed allowance for the CUDA context, NCCL and CUDA graphs, plus the activation
  peak of one batch of `max_num_batched_tokens`;
- KV cache: what is left of `memory fraction x total`, in tokens (bytes per token from layers,
  KV heads per rank, head dim and the KV dtype; MLA's compressed latent where the model has one).

On CPU, vLLM's KV cache is exactly `VLLM_CPU_KVCACHE_SPACE` GiB, so only the KV part applies.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

GIB = 1 << 30
CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "inference" / "configs"

# Memory as nvidia-smi reports it (MiB / 1024), not the marketing GB.
GPUS: dict[str, tuple[str, float]] = {
    "5090": ("RTX 5090", 32607 / 1024),
    "pro6000": ("RTX Pro 6000", 97887 / 1024),
    "h100": ("H100 80GB", 81559 / 1024),
    "h200": ("H200", 143771 / 1024),
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
# Bytes per weight of quantized linear layers, scales included (block 128x128 for FP8, groups
# of 128 with a 16-bit scale and zero for 4-bit methods).
QUANT_BYTES = {
    "fp8": 1 + 4 / (128 * 128),
    "awq": 0.5 + 4 / 128,
    "gptq": 0.5 + 4 / 128,
    "bitsandbytes": 0.5 + 4 / 64,
}
# CUDA context, NCCL buffers, CUDA graphs and the allocator's slack, per GPU.
RUNTIME_GIB = 1.5


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class Shape:
    """What memory depends on, read from a Hugging Face `config.json`."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    dtype_bytes: int
    quant: str | None = None
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    dense_layers: frozenset[int] = frozenset()  # MLP-only layers of an MoE model
    kv_latent: int = 0  # MLA: compressed KV width per token and layer (0: ordinary attention)

    @classmethod
    def from_config(cls, path: Path, name: str | None = None) -> Shape:
        c: dict[str, Any] = json.loads(path.read_text())
        text = c.get("text_config", c)
        dtype = str(text.get("torch_dtype") or text.get("dtype") or "bfloat16")
        quant = (c.get("quantization_config") or {}).get("quant_method")
        heads = int(text["num_attention_heads"])
        experts = int(
            text.get("num_experts")
            or text.get("num_local_experts")
            or text.get("n_routed_experts")
            or 0
        )
        latent = 0
        if text.get("kv_lora_rank"):
            latent = int(text["kv_lora_rank"]) + int(text.get("qk_rope_head_dim", 0))
        layers = int(text["num_hidden_layers"])
        dense = set(text.get("mlp_only_layers") or [])
        dense |= set(range(int(text.get("first_k_dense_replace", 0))))
        return cls(
            name=name or path.parent.name,
            layers=layers,
            hidden=int(text["hidden_size"]),
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or int(text["hidden_size"]) // heads),
            intermediate=int(text.get("intermediate_size") or 0),
            vocab=int(text["vocab_size"]),
            tied=bool(text.get("tie_word_embeddings", False)),
            dtype_bytes=DTYPE_BYTES.get(dtype, 2),
            quant=quant,
            experts=experts,
            experts_per_token=int(text.get("num_experts_per_tok") or 0),
            moe_intermediate=int(text.get("moe_intermediate_size") or 0),
            dense_layers=frozenset(i for i in dense if i < layers) if experts else frozenset(),
            kv_latent=latent,
        )

    def moe_layer(self, i: int) -> bool:
        return self.experts > 0 and i not in self.dense_layers

    @property
    def attention_params(self) -> int:
        q_out = self.heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        return self.hidden * q_out + 2 * self.hidden * kv_out + q_out * self.hidden

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_intermediate

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    def total_params(self) -> int:
        mlp = sum(
            self.experts * self.expert_params + self.hidden * self.experts
            if self.moe_layer(i)
            else self.dense_mlp_params
            for i in range(self.layers)
        )
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.attention_params + mlp + embed


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: bool = False
    # Layers per pipeline stage (vLLM's VLLM_PP_LAYER_PARTITION); None: as even as possible.
    pp_layers: tuple[int, ...] | None = None

    @property
    def ranks(self) -> int:
        return self.tp * self.pp * self.dp

    def stage_layers(self, layers: int) -> list[range]:
        split = list(self.pp_layers or _even(layers, self.pp))
        if len(split) != self.pp or sum(split) != layers:
            raise PlanError(f"pipeline split {split} does not cover {layers} layers in {self.pp}")
        out, start = [], 0
        for n in split:
            out.append(range(start, start + n))
            start += n
        return out


@dataclass(frozen=True)
class Settings:
    memory_fraction: float = 0.9
    max_model_len: int = 8192
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    kv_dtype_bytes: int | None = None  # default: the model's dtype
    max_loras: int = 0
    max_lora_rank: int = 0
    block_size: int = 16
    cpu_kv_gib: float | None = None  # device cpu: VLLM_CPU_KVCACHE_SPACE


@dataclass
class GpuRow:
    gpu: str
    total_gib: float
    budget_gib: float
    weights_gib: float
    lora_gib: float
    runtime_gib: float
    kv_gib: float
    kv_bytes_per_token: int
    kv_tokens: int
    stage: int = 0


@dataclass
class Plan:
    title: str
    rows: list[GpuRow]
    kv_tokens: int  # what the engine can hold: the smallest rank's count bounds the group
    max_model_len: int
    flags: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def concurrent_sequences(self) -> float:
        return self.kv_tokens / self.max_model_len


def _even(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def weights_bytes(shape: Shape, layout: Layout, stage: range, first: bool, last: bool) -> float:
    """Weights held by one rank of a pipeline stage."""
    wb = QUANT_BYTES.get(shape.quant or "", shape.dtype_bytes)
    ep_ranks = layout.tp * layout.dp if layout.ep else 1
    total = 0.0
    for i in stage:
        total += shape.attention_params * wb / layout.tp
        if shape.moe_layer(i):
            if layout.ep:  # whole experts per rank
                per_rank = math.ceil(shape.experts / ep_ranks)
                total += per_rank * shape.expert_params * wb
            else:  # every expert sharded by TP
                total += shape.experts * shape.expert_params * wb / layout.tp
            total += shape.hidden * shape.experts * shape.dtype_bytes  # router, unquantized
        else:
            total += shape.dense_mlp_params * wb / layout.tp
        total += 4 * shape.hidden * shape.dtype_bytes  # norms
    embed = shape.vocab * shape.hidden * shape.dtype_bytes / layout.tp  # vocab-parallel
    if first:
        total += embed
    if last and (not shape.tied or not first):
        total += embed
    return total


def kv_bytes_per_token(shape: Shape, layout: Layout, layers: int, kv_bytes: int) -> int:
    if shape.kv_latent:  # MLA: one compressed latent per token and layer, on every rank
        return layers * shape.kv_latent * kv_bytes
    kv_heads = max(1, shape.kv_heads // layout.tp)  # replicated when fewer heads than ranks
    return 2 * layers * kv_heads * shape.head_dim * kv_bytes


def lora_bytes(shape: Shape, layout: Layout, stage: range, s: Settings) -> float:
    if not s.max_loras:
        return 0.0
    q_out, kv_out = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_layer_dense = (
        (shape.hidden + q_out) * 2  # q, o
        + (shape.hidden + kv_out) * 2  # k, v
    )
    total = 0.0
    ep_ranks = layout.tp * layout.dp if layout.ep else 1
    for i in stage:
        mlp = 3 * (
            shape.hidden + (shape.moe_intermediate if shape.moe_layer(i) else shape.intermediate)
        )
        if shape.moe_layer(i):
            mlp *= math.ceil(shape.experts / ep_ranks) if layout.ep else shape.experts
        total += per_layer_dense / layout.tp + mlp / (1 if layout.ep else layout.tp)
    return total * s.max_loras * s.max_lora_rank * shape.dtype_bytes


def activation_bytes(shape: Shape, layout: Layout, s: Settings) -> float:
    """Peak of one forward pass of `max_num_batched_tokens` (the profile run vLLM does)."""
    t = s.max_num_batched_tokens
    width = shape.intermediate
    if shape.experts:
        width = shape.experts_per_token * shape.moe_intermediate
    per_token = (4 * shape.hidden + 2 * width / layout.tp) * shape.dtype_bytes
    logits = s.max_num_seqs * shape.vocab * 4 / layout.tp
    return t * per_token + logits


def plan(shape: Shape, gpus: list[str], layout: Layout, s: Settings, title: str = "") -> Plan:
    """One row per GPU (rank order: data-parallel groups of pipeline stages of TP ranks)."""
    if s.cpu_kv_gib is not None:
        return _plan_cpu(shape, layout, s, title)
    if len(gpus) != layout.ranks:
        raise PlanError(f"{len(gpus)} GPUs for tp*pp*dp = {layout.ranks} ranks")
    unknown = [g for g in gpus if g not in GPUS]
    if unknown:
        raise PlanError(f"unknown GPU {unknown[0]!r}; known: {', '.join(GPUS)}")
    kv_b = s.kv_dtype_bytes or shape.dtype_bytes
    stages = layout.stage_layers(shape.layers)
    rows: list[GpuRow] = []
    for rank, key in enumerate(gpus):
        name, total = GPUS[key]
        stage_i = (rank // layout.tp) % layout.pp
        stage = stages[stage_i]
        weights = weights_bytes(shape, layout, stage, stage_i == 0, stage_i == layout.pp - 1)
        lora = lora_bytes(shape, layout, stage, s)
        runtime = RUNTIME_GIB * GIB + activation_bytes(shape, layout, s)
        budget = total * s.memory_fraction
        kv = budget * GIB - weights - lora - runtime
        per_token = kv_bytes_per_token(shape, layout, len(stage), kv_b)
        tokens = max(0, int(kv // per_token) // s.block_size * s.block_size)
        rows.append(
            GpuRow(
                f"{name} (#{rank})",
                total,
                budget,
                weights / GIB,
                lora / GIB,
                runtime / GIB,
                kv / GIB,
                per_token,
                tokens,
                stage_i,
            )
        )
    # Every rank of the engine gets the same number of blocks: the smallest bounds them all.
    capacity = min(r.kv_tokens for r in rows)
    problems = []
    for r in rows:
        if r.kv_gib <= 0:
            need = r.weights_gib + r.lora_gib + r.runtime_gib
            problems.append(
                f"{r.gpu}: weights, LoRA and runtime need {need:.1f}"
                f" GiB, {-r.kv_gib:.1f} GiB more than its {r.budget_gib:.1f} GiB"
                f" ({s.memory_fraction:.0%} of {r.total_gib:.1f})"
            )
    if not problems and capacity < s.max_model_len:
        worst = min(rows, key=lambda r: r.kv_tokens)
        problems.append(
            f"{worst.gpu}: KV cache holds {capacity:,} tokens, less than one sequence of"
            f" max-model-len {s.max_model_len:,}"
        )
    return Plan(title or shape.name, rows, capacity, s.max_model_len, problems=problems)


def _plan_cpu(shape: Shape, layout: Layout, s: Settings, title: str) -> Plan:
    assert s.cpu_kv_gib is not None
    kv_b = s.kv_dtype_bytes or shape.dtype_bytes
    per_token = kv_bytes_per_token(shape, layout, shape.layers, kv_b)
    tokens = int(s.cpu_kv_gib * GIB // per_token)
    row = GpuRow("CPU", 0.0, s.cpu_kv_gib, 0.0, 0.0, 0.0, s.cpu_kv_gib, per_token, tokens)
    problems = []
    if tokens < s.max_model_len:
        problems.append(f"CPU: KV cache holds {tokens:,} tokens, less than {s.max_model_len:,}")
    return Plan(title or shape.name, [row], tokens, s.max_model_len, problems=problems)


def alternatives(shape: Shape, gpus: list[str], layout: Layout, s: Settings) -> list[Plan]:
    """What else could run this model on these GPUs: the largest card alone, an uneven pipeline
    split across all of them, and quantized weights on the same layout."""
    out: list[Plan] = []
    biggest = max(set(gpus), key=lambda g: GPUS[g][1])
    if len(gpus) > 1:
        alone = plan(shape, [biggest], Layout(), s, f"{GPUS[biggest][0]} alone")
        alone.flags = {"tensor-parallel-size": 1, "enable-expert-parallel": False}
        out.append(alone)
        out.append(best_pipeline_split(shape, gpus, s))
    lighter = {None: "fp8", "fp8": "awq"}.get(shape.quant)
    if lighter:
        q = plan(replace(shape, quant=lighter), gpus, layout, s, f"{lighter} weights, same layout")
        q.flags = {"quantization": lighter, "note": f"needs a {lighter} checkpoint of the model"}
        out.append(q)
    return out


def best_pipeline_split(shape: Shape, gpus: list[str], s: Settings) -> Plan:
    """Pipeline stages, one per GPU, with the layers split so the smallest stage's KV capacity
    is as large as possible (each stage holds only its own layers' KV cache)."""
    n = len(gpus)
    best: Plan | None = None
    for split in _splits(shape.layers, n):
        layout = Layout(pp=n, pp_layers=split)
        p = plan(
            shape, gpus, layout, s, f"pipeline over {n} GPUs, layers {'/'.join(map(str, split))}"
        )
        if best is None or (p.fits, p.kv_tokens) > (best.fits, best.kv_tokens):
            best = p
            best.flags = {
                "pipeline-parallel-size": n,
                "tensor-parallel-size": 1,
                "env VLLM_PP_LAYER_PARTITION": ",".join(map(str, split)),
            }
    assert best is not None
    return best


def _splits(layers: int, parts: int) -> list[tuple[int, ...]]:
    if parts == 1:
        return [(layers,)]
    if parts == 2:
        return [(a, layers - a) for a in range(1, layers)]
    even = tuple(_even(layers, parts))
    return [even]


def render(p: Plan) -> str:
    head = (
        f"{'GPU':<20} {'total':>7} {'budget':>7} {'weights':>8} {'LoRA':>6} {'runtime':>8}"
        f" {'KV GiB':>7} {'KV B/tok':>9} {'KV tokens':>11}"
    )
    lines = [p.title, head, "-" * len(head)]
    for r in p.rows:
        lines.append(
            f"{r.gpu:<20} {r.total_gib:>7.1f} {r.budget_gib:>7.1f} {r.weights_gib:>8.2f}"
            f" {r.lora_gib:>6.2f} {r.runtime_gib:>8.2f} {r.kv_gib:>7.2f}"
            f" {r.kv_bytes_per_token:>9,} {r.kv_tokens:>11,}"
        )
    verdict = "FITS" if p.fits else "DOES NOT FIT"
    lines.append(
        f"{verdict}: KV cache {p.kv_tokens:,} tokens for the engine, "
        f"{p.concurrent_sequences:.1f} concurrent sequences of {p.max_model_len:,} tokens"
    )
    lines += [f"  - {problem}" for problem in p.problems]
    return "\n".join(lines)


def summary(p: Plan) -> str:
    state = "fits" if p.fits else "does not fit"
    flags = ", ".join(f"{k}={v}" for k, v in p.flags.items())
    return (
        f"{p.title}: {state}; KV {p.kv_tokens:,} tokens, {p.concurrent_sequences:.1f} sequences"
        f" of {p.max_model_len:,}"
        + (f"  [{flags}]" if flags else "")
        + "".join(f"\n      {x}" for x in p.problems)
    )


def config_path(model: str, models_dir: Path) -> Path:
    """The model's config.json: on the host when downloaded, else the copy shipped for planning."""
    for path in (
        Path(model) / "config.json",
        models_dir / model / "config.json",
        CONFIGS / f"{Path(model).name}.json",
        Path(model),
    ):
        if path.is_file():
            return path
    raise PlanError(f"no config.json for {model!r} (looked in {models_dir} and {CONFIGS})")


def from_profile(
    profile: Any, models_dir: Path, max_model_len: int | None = None
) -> tuple[Shape, list[str], Layout, Settings]:
    """The planner's inputs from a launch profile (`profiles.Profile`)."""
    v = profile.vllm
    shape = Shape.from_config(config_path(profile.model, models_dir), profile.model)
    if v.get("quantization"):
        shape = replace(shape, quant=str(v["quantization"]))
    if v.get("dtype") in DTYPE_BYTES:
        shape = replace(shape, dtype_bytes=DTYPE_BYTES[v["dtype"]])
    kv = v.get("kv-cache-dtype")
    settings = Settings(
        memory_fraction=float(v.get("gpu-memory-utilization", 0.9)),
        max_model_len=int(max_model_len or v.get("max-model-len") or 8192),
        max_num_batched_tokens=int(v.get("max-num-batched-tokens", 8192)),
        max_num_seqs=int(v.get("max-num-seqs", 256)),
        kv_dtype_bytes=DTYPE_BYTES.get(str(kv)) if kv and kv != "auto" else None,
        max_loras=int(v.get("max-loras", 1)) if v.get("enable-lora") else 0,
        max_lora_rank=int(v.get("max-lora-rank", 16)) if v.get("enable-lora") else 0,
        cpu_kv_gib=float(profile.env.get("VLLM_CPU_KVCACHE_SPACE", 4))
        if profile.device == "cpu"
        else None,
    )
    layout = Layout(
        tp=int(v.get("tensor-parallel-size", 1)),
        pp=int(v.get("pipeline-parallel-size", 1)),
        dp=int(v.get("data-parallel-size", 1)),
        ep=bool(v.get("enable-expert-parallel", False)),
    )
    gpus = list(profile.gpu_models)
    if profile.device == "cuda" and not gpus:
        raise PlanError(f"profile {profile.name} does not name its GPUs (gpu_models)")
    return shape, gpus, layout, settings

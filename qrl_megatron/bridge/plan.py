"""Stage 1 of the bridge: the transfer plan (pure; no processes, no tensors).

From the model's shape, the learner's layout (TP x PP x DP) and the rollout target (format, engine TP, which layers
stay in high precision, bucket size) the plan lists, in one deterministic order that every rank computes alike,
each Megatron parameter to move: the ranks that hold its shards, how they are split, the transforms on the way
(TP gather, GQA-interleaved QKV split, gate/up split, quantization and whether it happens before the gather), the
exact checkpoint tensors (names, shapes, dtypes) that go on the wire and the bucket they travel in.

Because the wire layout is known in advance, the receiver allocates its buffers without any metadata exchange,
and the bytes of a sync are a property of the plan, independent of the learner's layout (tested).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch

from qrl_megatron.models.hf_mapping import (
    megatron_layer_index,
    megatron_param_hf_names,
    megatron_param_shapes,
    tp_split_kind,
)
from qrl_megatron.models.registry import ModelSpec
from qrl_megatron.platform import validate_layout
from te_ext.formats import ROLLOUT_FORMATS as WIRE_FORMATS
from te_ext.formats import format_descriptor

QUANT_FORMATS = tuple(f for f in WIRE_FORMATS if format_descriptor(f).quantized)
# The linears vLLM's Qwen2/Llama load quantized (its packed modules qkv_proj, gate_up_proj and the two row-parallel
# projections); everything else (embeddings, norms, biases) always travels in bf16.
QUANTIZABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Linears kept in bf16 by default (regexes on HF names). Embeddings, the output head (its quantization error lands
# directly on the logits; QeRL and the NVFP4 recipes keep it in high precision), norms and biases are never
# quantized, so nothing needs excluding by default.
DEFAULT_EXCLUDE: tuple[str, ...] = ()

_DTYPE_BYTES = {torch.bfloat16: 2, torch.float32: 4, torch.uint8: 1, torch.int8: 1, torch.float8_e4m3fn: 1}


@dataclass(frozen=True)
class RolloutTarget:
    """What the engine receives."""

    fmt: str = "bf16"
    engine_tp: int = 1
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    bucket_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        if self.fmt not in WIRE_FORMATS:
            raise ValueError(f"rollout.quant must be one of {WIRE_FORMATS}, got {self.fmt!r}")
        if self.engine_tp < 1:
            raise ValueError(f"rollout.tp must be >= 1, got {self.engine_tp}")
        if self.bucket_bytes < 1:
            raise ValueError(f"sync.bucket_mib must be positive, got {self.bucket_bytes} bytes")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"sync.exclude: {pattern!r} is not a valid regular expression ({e})") from None


@dataclass(frozen=True)
class WireTensor:
    """One tensor of the engine's checkpoint format (HF name) as it goes on the wire."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * _DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class TransferUnit:
    """One Megatron parameter on its way to the engine."""

    index: int
    source: str  # Megatron parameter, local-spec norm names, global layer numbering
    shape: tuple[int, ...]  # full (unsharded) shape
    stage: int  # pipeline stage that owns it
    owners: tuple[int, ...]  # world ranks holding its TP shards, in TP order (data-parallel replica 0)
    split: str  # hf_mapping.tp_split_kind: vocab | qkv | fc1 | column | row | replicated
    outputs: tuple[str, ...]  # the HF parameters it becomes
    fmt: str  # "bf16" or the quantized format
    quantize_before_gather: bool  # TP shards quantized locally (shared amax all-reduced), codes gathered
    transforms: tuple[str, ...]  # the steps in order, for humans and logs (the executor reads the fields below)
    wire: tuple[WireTensor, ...]  # what is streamed, in order
    bucket: int
    # executable steps (from te_ext.format_descriptor(fmt)): the statistic of the whole tensor the quantizer takes
    # ("global_amax" | "row_amax" | None; all-reduced MAX over TP when quantize_before_gather), and the checkpoint
    # components that are equal on every TP rank after a shard-local quantization (not gathered)
    shared_stat: str | None = None
    replicated_components: tuple[str, ...] = ()

    @property
    def sender(self) -> int:
        """The rank that holds the assembled tensors and sends them (TP rank 0 of the owning stage)."""
        return self.owners[0]

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.wire)

    @property
    def bf16_bytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return 2 * numel


@dataclass(frozen=True)
class SyncPlan:
    spec: ModelSpec
    tp: int
    pp: int
    dp: int
    target: RolloutTarget
    units: tuple[TransferUnit, ...] = field(repr=False)

    @property
    def num_buckets(self) -> int:
        return 1 + max((u.bucket for u in self.units), default=-1)

    def bucket(self, index: int) -> tuple[TransferUnit, ...]:
        return tuple(u for u in self.units if u.bucket == index)

    @property
    def total_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    @property
    def bf16_bytes(self) -> int:
        """Bytes the same sync would stream in bf16 (the baseline of the compression ratio)."""
        return sum(u.bf16_bytes for u in self.units)

    @property
    def quantized_bytes(self) -> tuple[int, int]:
        """(streamed bytes, bf16 bytes) of the quantized units alone."""
        q = [u for u in self.units if u.fmt != "bf16"]
        return sum(u.nbytes for u in q), sum(u.bf16_bytes for u in q)

    def linear_modules(self, quantized: bool) -> list[str]:
        """HF module names of the quantizable linears the plan quantizes (or, ``quantized=False``, keeps in bf16)."""
        return [
            name.removesuffix(".weight")
            for u in self.units
            if (u.fmt != "bf16") == quantized
            for name in u.outputs
            if name.endswith(".weight") and _module(name)[1] in QUANTIZABLE
        ]

    def wire_names(self) -> list[str]:
        return [w.name for u in self.units for w in u.wire]

    def fingerprint(self) -> str:
        """Hash of everything that decides the bytes on the wire (ranks compare it before the first sync)."""
        text = "|".join(
            f"{u.source}:{u.fmt}:{u.bucket}:" + ",".join(f"{w.name}{w.shape}{w.dtype}" for w in u.wire)
            for u in self.units
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        rows = [
            f"sync plan: {len(self.units)} tensors, {self.num_buckets} buckets, {self.total_bytes / 2**20:.2f} MiB "
            f"({self.total_bytes / max(self.bf16_bytes, 1):.3f}x bf16), learner TP{self.tp} PP{self.pp} DP{self.dp} "
            f"-> engine TP{self.target.engine_tp} {self.target.fmt}"
        ]
        rows += [
            f"  [{u.bucket}] {u.source} stage {u.stage} ranks {list(u.owners)}: {' -> '.join(u.transforms)}"
            for u in self.units
        ]
        return "\n".join(rows)


def world_rank(tp_rank: int, pp_rank: int, dp_rank: int, tp: int, dp: int) -> int:
    """Megatron-core's default rank order (tp-cp-ep-dp-pp, no CP/EP): TP fastest, then DP, then PP."""
    return tp_rank + tp * (dp_rank + dp * pp_rank)


def _stage_of(name: str, spec: ModelSpec, pp: int) -> int:
    layer, _ = megatron_layer_index(name)
    if layer is not None:
        per_stage = spec.num_layers // pp
        return layer // per_stage
    if name == "embedding.word_embeddings.weight":
        return 0
    return pp - 1  # final norm, output layer


def _module(hf_name: str) -> tuple[str, str]:
    module = hf_name.rsplit(".", 1)[0]
    return module, module.rsplit(".", 1)[-1]


def _unit_format(source: str, outputs: tuple[str, ...], target: RolloutTarget) -> str:
    if target.fmt == "bf16":
        return "bf16"
    decisions = []
    for name in outputs:
        module, leaf = _module(name)
        quantizable = name.endswith(".weight") and leaf in QUANTIZABLE
        excluded = any(re.search(p, name) for p in target.exclude)
        decisions.append(quantizable and not excluded)
    if any(decisions) and not all(decisions):
        raise ValueError(
            f"sync.exclude keeps only part of {list(outputs)} in bf16, but vLLM fuses them into one linear layer "
            f"({source}): exclude all of them or none"
        )
    return target.fmt if all(decisions) else "bf16"


def _check_engine_tp(spec: ModelSpec, target: RolloutTarget) -> None:
    """vLLM shards what it receives across its own TP ranks; the quantization groups must not straddle shards."""
    t = target.engine_tp
    if spec.num_attention_heads % t or (spec.num_query_groups % t and t % spec.num_query_groups):
        raise ValueError(
            f"rollout.tp={t} must divide the model's {spec.num_attention_heads} attention heads and divide or be a "
            f"multiple of its {spec.num_query_groups} KV heads"
        )
    if spec.ffn_hidden_size % t:
        raise ValueError(f"rollout.tp={t} must divide ffn_hidden_size={spec.ffn_hidden_size}")
    block = format_descriptor(target.fmt).block_k
    if block is not None:
        for what, k in (
            ("o_proj input", spec.num_attention_heads * spec.kv_channels),
            ("down_proj input", spec.ffn_hidden_size),
        ):
            if (k // t) % block:
                raise ValueError(
                    f"rollout.quant={target.fmt} with rollout.tp={t}: the {what} dimension per engine rank "
                    f"({k // t}) is not a multiple of the {block}-element {target.fmt.upper()} block; use a smaller "
                    "rollout.tp"
                )


def build_plan(spec: ModelSpec, tp: int, pp: int, dp: int, target: RolloutTarget) -> SyncPlan:
    """The ordered transfer units of one sync (see the module docstring). Same result on every rank."""
    validate_layout(tp, pp, dp, tp * pp * dp, model=spec)
    _check_engine_tp(spec, target)
    units: list[TransferUnit] = []
    bucket, bucket_fill = 0, 0
    for index, (source, shape) in enumerate(megatron_param_shapes(spec).items()):
        stage = _stage_of(source, spec, pp)
        kind = tp_split_kind(source)
        owners = tuple(world_rank(t, stage, 0, tp, dp) for t in range(tp))
        if kind == "replicated":
            owners = owners[:1]
        outputs = megatron_param_hf_names(source)
        fmt = _unit_format(source, outputs, target)
        sharded = tp > 1 and kind != "replicated"

        desc = format_descriptor(fmt)
        transforms: list[str] = []
        before_gather = False
        shared_stat: str | None = None
        replicated: tuple[str, ...] = ()
        if not desc.quantized:
            transforms.append(f"cast {fmt}")
            if sharded:
                transforms.append(f"gather TP ({kind})")
        else:
            k_local = shape[1] // tp if kind == "row" else shape[1]
            before_gather = sharded and desc.shard_local(k_local)
            shared_stat = desc.shared_stat(kind, before_gather)
            label = shared_stat.replace("_", " ") if shared_stat else None
            if before_gather:
                replicated = desc.replicated_components(kind)
                if label:
                    transforms.append(f"{label} (all-reduce MAX over TP)")
                transforms += [f"quantize {fmt}", f"gather TP codes ({kind})"]
            else:
                transforms += [f"gather TP ({kind})"] if sharded else []
                transforms += [label] if label else []
                transforms.append(f"quantize {fmt}")
        if len(outputs) == 3:
            transforms.append("split QKV (GQA groups)")
        elif len(outputs) == 2:
            transforms.append("split gate/up")

        wire: list[WireTensor] = []
        hf_shapes = _output_shapes(shape, outputs, spec)
        for name, out_shape in zip(outputs, hf_shapes, strict=True):
            if not desc.quantized:
                wire.append(WireTensor(name, out_shape, torch.bfloat16))
            else:
                module = name[: -len(".weight")]
                wire += [WireTensor(f"{module}.{sfx}", s, d) for sfx, s, d in desc.checkpoint_layout(out_shape)]

        nbytes = sum(w.nbytes for w in wire)
        if bucket_fill and bucket_fill + nbytes > target.bucket_bytes:
            bucket, bucket_fill = bucket + 1, 0
        bucket_fill += nbytes
        units.append(
            TransferUnit(
                index=index,
                source=source,
                shape=shape,
                stage=stage,
                owners=owners,
                split=kind,
                outputs=outputs,
                fmt=fmt,
                quantize_before_gather=before_gather,
                transforms=tuple(transforms),
                wire=tuple(wire),
                bucket=bucket,
                shared_stat=shared_stat,
                replicated_components=replicated,
            )
        )
    return SyncPlan(spec=spec, tp=tp, pp=pp, dp=dp, target=target, units=tuple(units))


def _output_shapes(shape: tuple[int, ...], outputs: tuple[str, ...], spec: ModelSpec) -> list[tuple[int, ...]]:
    tail = shape[1:]
    if len(outputs) == 3:
        d = spec.kv_channels
        return [
            (spec.num_attention_heads * d, *tail),
            (spec.num_query_groups * d, *tail),
            (spec.num_query_groups * d, *tail),
        ]
    if len(outputs) == 2:
        return [(shape[0] // 2, *tail)] * 2
    return [shape]

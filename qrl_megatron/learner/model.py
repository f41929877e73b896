"""Megatron GPTModel construction on this rank, HF weight loading, and the full-model gather (weight sync v0)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from qrl_megatron.models.checkpoint_reader import CheckpointSource, as_checkpoint_reader
from qrl_megatron.models.hf_mapping import (
    HFSlice,
    assemble_megatron_shard,
    check_hf_checkpoint,
    megatron_layer_index,
    megatron_param_shapes,
    megatron_param_to_hf,
    megatron_shard_shape,
    megatron_shard_slices,
    megatron_to_hf,
    pp_layer_offset,
    to_te_norm_name,
    tp_split_kind,
    unshard_from_tp,
)
from qrl_megatron.models.registry import ModelSpec, rope_inv_freq, transformer_config
from qrl_megatron.platform import ParallelLayout, is_cuda_available, validate_layout

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel

__all__ = [
    "build_gpt_model",
    "gather_hf_state_dict",
    "iter_full_params",
    "iter_hf_tensors",
    "load_hf_state_dict",
    "unwrap_model",
]

logger = logging.getLogger(__name__)


def _te_available() -> bool:
    if not is_cuda_available():
        return False
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:
        return False
    return bool(HAVE_TE)


def build_gpt_model(
    spec: ModelSpec,
    layout: ParallelLayout,
    params_dtype: torch.dtype = torch.float32,
    *,
    parallel_output: bool = True,
    use_te: bool | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> GPTModel:
    """This rank's pipeline stage of the GPT model (``pre_process`` on the first stage, ``post_process`` on the last).

    Layer spec: Transformer Engine when CUDA and TE are available (``use_te=None``), else megatron's local spec;
    with ``spec.qk_norm`` (Qwen3) the spec carries the per-head q/k RMSNorm. RoPE frequencies come from
    :func:`~qrl_megatron.models.registry.rope_inv_freq` (the llama3 scaling included), not from megatron's own
    scaling, which hard-codes three of the four llama3 parameters.
    ``parallel_output=True`` leaves the logits vocab-sharded over TP ranks (what vocab-parallel cross entropy and
    logprob code want); ``False`` all-gathers them. Tied embeddings with PP > 1: megatron keeps a copy of the
    embedding as ``output_layer.weight`` on the last stage, all-reduced from the first stage at construction
    (so construction is collective over the embedding group) and kept in sync by grad all-reduce.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    validate_layout(layout.tp, layout.pp, layout.dp, layout.world_size, model=spec)
    config = transformer_config(spec, layout.tp, layout.pp, params_dtype=params_dtype, **dict(config_overrides or {}))
    if use_te is None:
        use_te = _te_available()
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer_spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_norm)
    else:
        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=spec.qk_norm)

    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=layout.is_first_stage,
        post_process=layout.is_last_stage,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope_theta,
    )
    # Every stage applies RoPE (the module exists with or without pre_process). Set before the first forward:
    # RotaryEmbedding.forward is lru-cached on its arguments, not on inv_freq.
    rotary = model.rotary_pos_emb
    rotary.inv_freq = rope_inv_freq(spec, device=rotary.inv_freq.device)
    # The local spec's torch norms are created in the default dtype; keep the whole stage in params_dtype.
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != params_dtype:
            p.data = p.data.to(params_dtype)
    if is_cuda_available():
        model.cuda(torch.cuda.current_device())
    return model


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip wrappers that keep the real model in ``.module`` (megatron DDP, Float16Module)."""
    inner = getattr(model, "module", None)
    while isinstance(inner, torch.nn.Module):
        model, inner = inner, getattr(inner, "module", None)
    return model


def _uses_te_norm_names(module: torch.nn.Module) -> bool:
    return any(name.endswith(".layer_norm_weight") for name, _ in module.named_parameters())


def _local_name(global_name: str, offset: int, layers_per_stage: int) -> str | None:
    """Global Megatron name -> this stage's parameter name (None if the layer lives on another stage)."""
    i, rest = megatron_layer_index(global_name)
    if i is None:
        return global_name
    if offset <= i < offset + layers_per_stage:
        return f"decoder.layers.{i - offset}.{rest}"
    return None


def global_param_name(local_name: str, offset: int) -> str:
    """A stage-local Megatron parameter name with its layer index shifted by the stage's first layer (``offset``)."""
    i, rest = megatron_layer_index(local_name)
    return local_name if i is None else f"decoder.layers.{i + offset}.{rest}"


def load_hf_state_dict(
    model: torch.nn.Module,
    weights: Mapping[str, torch.Tensor] | CheckpointSource,
    spec: ModelSpec,
    layout: ParallelLayout,
) -> None:
    """Read this rank's shard of ``model`` (bare GPTModel, or wrapped: ``model.module``) from HF weights.

    ``weights``: a :class:`~qrl_megatron.models.checkpoint_reader.CheckpointReader` (only this stage's layers and
    this TP rank's rows/columns are read from the files, cast to the parameter dtype slice by slice, so the rank
    never holds more than its shard plus one fused tensor's pieces) or an in-memory HF state dict (same rules).
    Strict: the checkpoint must be exactly a ``spec`` model (a missing, unknown or wrongly shaped tensor is a
    one-line error naming it and its file), and every model parameter gets a value. Load before building the
    optimizer (a DistributedOptimizer keeps its own fp32 copies of the parameters).
    """
    module = unwrap_model(model)
    source = as_checkpoint_reader(weights)
    hf_shapes = {name: source.shape(name) for name in source}
    check_hf_checkpoint(hf_shapes, spec, source.where)
    offset = pp_layer_offset(layout.pp_rank, spec.num_layers, layout.pp)
    per_stage = spec.num_layers // layout.pp

    wanted: dict[str, str] = {}  # local name -> global name
    for global_name in megatron_param_shapes(spec):
        local = _local_name(global_name, offset, per_stage)
        if local is not None:
            wanted[local] = global_name
    if spec.tie_word_embeddings:
        # The last stage's copy of the tied embedding (only a parameter when it is not also the first stage).
        wanted["output_layer.weight"] = "output_layer.weight"
    if _uses_te_norm_names(module):
        wanted = {to_te_norm_name(local): to_te_norm_name(g) for local, g in wanted.items()}

    params = dict(module.named_parameters())
    # Tensors of other stages (embedding / final norm / output layer) are expected to be absent here.
    stage_only = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"}
    missing = sorted(set(params) - set(wanted))
    unexpected = sorted(k for k in set(wanted) - set(params) if k not in stage_only)
    if missing or unexpected:
        raise ValueError(
            f"HF -> Megatron mismatch on pp_rank {layout.pp_rank}: parameters without weights {missing}, "
            f"weights without parameters {unexpected}"
        )
    plan = {}
    bad_shapes = []
    for local, p in params.items():
        slices = megatron_shard_slices(wanted[local], spec, layout.tp, layout.tp_rank, hf_shapes)
        shape = megatron_shard_shape(slices, hf_shapes)
        if shape != tuple(p.shape):
            bad_shapes.append(f"{local}: weight shard {shape} vs parameter {tuple(p.shape)}")
        plan[local] = slices
    if bad_shapes:
        raise ValueError("shape mismatch loading HF weights: " + "; ".join(bad_shapes))
    with torch.no_grad():
        for local, p in params.items():
            slices = plan[local]
            if len(slices) == 1 and p.is_contiguous() and p.device.type == "cpu":
                s = slices[0]  # straight into the parameter: no second copy of the largest tensors
                source.read_slice(s.name, s.dim, s.start, s.stop, out=p.data)
            else:
                pieces = [source.read_slice(s.name, s.dim, s.start, s.stop, dtype=p.dtype) for s in slices]
                p.copy_(assemble_megatron_shard(wanted[local], pieces, spec, layout.tp))
            if (
                spec.tie_word_embeddings
                and "lm_head.weight" in hf_shapes
                and slices[0].name.endswith("embed_tokens.weight")
            ):
                _check_tied_copy(source, slices[0], p)


def _check_tied_copy(source: CheckpointSource, embedding: HFSlice, param: torch.Tensor) -> None:
    """A tied checkpoint that also stores ``lm_head.weight`` must store the embedding again (a copy that differs
    is a checkpoint of an untied model with a wrong config); compared block by block, never a second full shard."""
    rows = max(1, (16 << 20) // max(1, param[0].numel() * param.element_size()))
    for a in range(0, embedding.stop - embedding.start, rows):
        b = min(a + rows, embedding.stop - embedding.start)
        head = source.read_slice("lm_head.weight", 0, embedding.start + a, embedding.start + b, dtype=param.dtype)
        if not torch.equal(head, param[a:b]):
            raise ValueError(
                f"{source.where('lm_head.weight')}: tie_word_embeddings=True but lm_head.weight differs from "
                "model.embed_tokens.weight; set tie_word_embeddings=false in config.json"
            )


def _dtype_from_str(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def iter_full_params(
    model: torch.nn.Module,
    spec: ModelSpec,
    layout: ParallelLayout,
    dst: int | None = 0,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the full (TP-unsharded) Megatron parameters, one at a time, to world rank ``dst``.

    Collective over the world: every rank must run the generator to exhaustion (ranks that receive nothing get
    an empty stream but still take part). Yields ``(global Megatron name, full CPU tensor)`` on ``dst`` (on every
    rank with ``dst=None``), stage by stage in each stage's parameter order. For one parameter at a time the TP
    shards are all-gathered inside the stage's TP group (of data-parallel replica 0) and the stage's owner
    (tp_rank 0, dp_rank 0) sends the full tensor to ``dst``, so no rank ever holds more than one full tensor on
    top of its own shard -- what lets a caller write the model out shard file by shard file. ``dtype`` casts
    before communication (``None``: parameter dtype). With tied embeddings the last stage's copy of the
    embedding (``output_layer.weight``) is not sent.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    module = unwrap_model(model)
    offset = pp_layer_offset(layout.pp_rank, spec.num_layers, layout.pp)
    rank = dist.get_rank()
    owner = layout.tp_rank == 0 and layout.dp_rank == 0
    params: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if spec.tie_word_embeddings and name == "output_layer.weight":
            continue  # last stage's copy of the tied embedding
        params[global_param_name(name, offset)] = p
    device = next(iter(params.values())).device if params else torch.device("cpu")

    def prepared(p: torch.Tensor) -> torch.Tensor:
        t = p.detach()
        return (t.to(dtype) if dtype is not None else t).contiguous()

    # Every rank learns the global stream: (name, full shape, dtype, stage) of each owner's parameters, in order.
    meta: list[tuple[str, tuple[int, ...], str, int]] = []
    if owner:
        for global_name, param in params.items():
            full_shape = list(param.shape)
            kind = tp_split_kind(global_name)
            if layout.tp > 1 and kind != "replicated":
                full_shape[1 if kind == "row" else 0] *= layout.tp
            sent_dtype = dtype if dtype is not None else param.dtype
            meta.append((global_name, tuple(full_shape), str(sent_dtype), layout.pp_rank))
    all_meta: list[list[tuple[str, tuple[int, ...], str, int]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(all_meta, meta)

    tp_group = parallel_state.get_tensor_model_parallel_group() if layout.tp > 1 else None
    for src, entries in enumerate(all_meta):
        for name, shape, dtype_name, stage in entries or []:
            full: torch.Tensor | None = None
            if layout.dp_rank == 0 and layout.pp_rank == stage:  # the TP group that holds this parameter
                t = prepared(params[name])
                if tp_group is not None and tp_split_kind(name) != "replicated":
                    shards = [torch.empty_like(t) for _ in range(layout.tp)]
                    dist.all_gather(shards, t, group=tp_group)
                    t = unshard_from_tp(name, shards, spec)
                full = t
            if dst is None:
                buf = full if rank == src else torch.empty(shape, dtype=_dtype_from_str(dtype_name), device=device)
                assert buf is not None
                dist.broadcast(buf, src=src)
                yield name, buf.cpu()
            elif rank == dst:
                if src == dst:
                    assert full is not None
                    yield name, full.cpu()
                else:
                    buf = torch.empty(shape, dtype=_dtype_from_str(dtype_name), device=device)
                    dist.recv(buf, src=src)
                    yield name, buf.cpu()
            elif rank == src:
                assert full is not None
                dist.send(full, dst=dst)


def iter_hf_tensors(
    model: torch.nn.Module,
    spec: ModelSpec,
    layout: ParallelLayout,
    dst: int | None = 0,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`iter_full_params` under HF names: each full Megatron parameter split into its HF tensors.

    Collective (every rank runs it to the end). The fused QKV yields q/k/v (weights, then biases), fc1 yields
    gate/up; with tied embeddings no ``lm_head.weight``, as HF checkpoints of tied models store it.
    """
    for name, tensor in iter_full_params(model, spec, layout, dst=dst, dtype=dtype):
        yield from megatron_param_to_hf(name, tensor, spec)


def gather_hf_state_dict(
    model: torch.nn.Module,
    spec: ModelSpec,
    layout: ParallelLayout,
    dst: int | None = 0,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor] | None:
    """Gather the full model as an HF state dict (CPU tensors, canonical name order) on world rank ``dst``.

    Collective over the world: every rank must call it. The whole stream of :func:`iter_full_params`, collected
    (``dst=None``: on every rank). Returns None on ranks that do not receive the result. With tied embeddings the
    last stage's copy of the embedding is not sent and no ``lm_head.weight`` is produced.
    """
    import torch.distributed as dist

    collected = dict(iter_full_params(model, spec, layout, dst=dst, dtype=dtype))
    if dst is not None and dist.get_rank() != dst:
        return None
    return megatron_to_hf(collected, spec)

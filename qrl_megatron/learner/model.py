"""Megatron GPTModel construction on this rank, HF weight loading, and the full-model gather (weight sync v0)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from qrl_megatron.models.hf_mapping import (
    hf_to_megatron,
    megatron_layer_index,
    megatron_to_hf,
    pp_layer_offset,
    shard_for_tp,
    to_te_norm_name,
    tp_split_kind,
    unshard_from_tp,
)
from qrl_megatron.models.registry import ModelSpec, transformer_config
from qrl_megatron.platform import ParallelLayout, is_cuda_available, validate_layout

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel

__all__ = ["build_gpt_model", "gather_hf_state_dict", "load_hf_state_dict", "unwrap_model"]

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

    Layer spec: Transformer Engine when CUDA and TE are available (``use_te=None``), else megatron's local spec.
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

        layer_spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")

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
    model: torch.nn.Module, hf_state_dict: Mapping[str, torch.Tensor], spec: ModelSpec, layout: ParallelLayout
) -> None:
    """Copy full HF weights into this rank's shard of ``model`` (bare GPTModel, or wrapped: ``model.module``).

    Strict: any model parameter without a value, any value without a parameter, or any shape mismatch is an
    error naming the parameters. Load before building the optimizer (a DistributedOptimizer keeps its own fp32
    copies of the parameters).
    """
    module = unwrap_model(model)
    full = hf_to_megatron(hf_state_dict, spec)
    offset = pp_layer_offset(layout.pp_rank, spec.num_layers, layout.pp)
    per_stage = spec.num_layers // layout.pp

    wanted: dict[str, tuple[str, torch.Tensor]] = {}  # local name -> (global name, full tensor)
    for global_name, tensor in full.items():
        local = _local_name(global_name, offset, per_stage)
        if local is not None:
            wanted[local] = (global_name, tensor)
    if spec.tie_word_embeddings:
        # The last stage's copy of the tied embedding (only a parameter when it is not also the first stage).
        wanted["output_layer.weight"] = ("output_layer.weight", full["embedding.word_embeddings.weight"])
    if _uses_te_norm_names(module):
        wanted = {to_te_norm_name(local): (to_te_norm_name(g), t) for local, (g, t) in wanted.items()}

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
    shards: dict[str, torch.Tensor] = {}
    bad_shapes = []
    for local, p in params.items():
        global_name, tensor = wanted[local]
        shard = shard_for_tp(global_name, tensor, layout.tp, layout.tp_rank, spec)
        if shard.shape != p.shape:
            bad_shapes.append(f"{local}: weight shard {tuple(shard.shape)} vs parameter {tuple(p.shape)}")
        shards[local] = shard
    if bad_shapes:
        raise ValueError("shape mismatch loading HF weights: " + "; ".join(bad_shapes))
    with torch.no_grad():
        for local, p in params.items():
            p.copy_(shards[local])


def _dtype_from_str(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def gather_hf_state_dict(
    model: torch.nn.Module,
    spec: ModelSpec,
    layout: ParallelLayout,
    dst: int | None = 0,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor] | None:
    """Gather the full model as an HF state dict (CPU tensors, canonical name order) on world rank ``dst``.

    Collective over the world: every rank must call it. TP shards are all-gathered inside each TP group (of
    data-parallel replica 0), then each stage's owner (tp_rank 0, dp_rank 0) sends its tensors to ``dst``
    (``dst=None``: broadcast to every rank). ``dtype`` casts before communication (``None``: parameter dtype).
    Returns None on ranks that do not receive the result. With tied embeddings the last stage's copy of the
    embedding is not sent and no ``lm_head.weight`` is produced.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    module = unwrap_model(model)
    offset = pp_layer_offset(layout.pp_rank, spec.num_layers, layout.pp)
    rank = dist.get_rank()
    owner = layout.tp_rank == 0 and layout.dp_rank == 0
    params = list(module.named_parameters())
    device = params[0][1].device if params else torch.device("cpu")

    local: dict[str, torch.Tensor] = {}
    if layout.dp_rank == 0:  # the TP group of replica 0 assembles full tensors; other replicas hold copies
        tp_group = parallel_state.get_tensor_model_parallel_group()
        for name, p in params:
            if spec.tie_word_embeddings and name == "output_layer.weight":
                continue  # last stage's copy of the tied embedding
            global_name = global_param_name(name, offset)
            t = p.detach()
            if dtype is not None:
                t = t.to(dtype)
            t = t.contiguous()
            if layout.tp > 1 and tp_split_kind(global_name) != "replicated":
                shards = [torch.empty_like(t) for _ in range(layout.tp)]
                dist.all_gather(shards, t, group=tp_group)
                t = unshard_from_tp(global_name, shards, spec)
            if owner:
                local[global_name] = t

    meta = [(name, tuple(t.shape), str(t.dtype)) for name, t in local.items()]
    all_meta: list[list[tuple[str, tuple[int, ...], str]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(all_meta, meta)

    receive = dst is None or rank == dst
    result: dict[str, torch.Tensor] = {}
    for src, entries in enumerate(all_meta):
        for name, shape, dtype_name in entries or []:
            if dst is None:
                buf = (
                    local[name] if rank == src else torch.empty(shape, dtype=_dtype_from_str(dtype_name), device=device)
                )
                dist.broadcast(buf, src=src)
                result[name] = buf
            elif src == dst:
                if rank == dst:
                    result[name] = local[name]
            elif rank == src:
                dist.send(local[name], dst=dst)
            elif rank == dst:
                buf = torch.empty(shape, dtype=_dtype_from_str(dtype_name), device=device)
                dist.recv(buf, src=src)
                result[name] = buf
    if not receive:
        return None
    return megatron_to_hf({k: v.cpu() for k, v in result.items()}, spec)

"""Stage 2 of the bridge: run the plan on the learner ranks and assemble each bucket on the sending rank.

For every unit of a bucket, the TP group of the owning pipeline stage (data-parallel replica 0) assembles the full
tensors and the stage's TP rank 0 sends them point-to-point to the rank that drives the engine. Where the format
allows, each TP rank quantizes its own shard *before* the gather -- the NVFP4 global amax (shared by the fused
QKV / gate-up members, as vLLM requires) and the per-row amax of row-split FP8/INT8 weights are all-reduced (MAX)
first, the per-row and per-block scales are shard-local -- so the TP traffic is the quantized bytes and the
result is bit-identical to quantizing the gathered weight. Buffers on the receiver come from the plan (shapes and
dtypes are known in advance), so no metadata is exchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from qrl_megatron.bridge.plan import SyncPlan, TransferUnit, world_rank
from qrl_megatron.models.hf_mapping import (
    megatron_param_to_hf,
    pp_layer_offset,
    to_local_spec_norm_name,
    unshard_from_tp,
)
from qrl_megatron.platform import ParallelLayout

# gloo has no float8 dtype: such tensors travel as their uint8 bytes
_BYTE_VIEW = (torch.float8_e4m3fn,)


def local_parameters(model: torch.nn.Module, spec: Any, layout: ParallelLayout) -> dict[str, torch.Tensor]:
    """This rank's parameters under their global, local-spec Megatron names (the plan's ``source`` names)."""
    from qrl_megatron.learner.model import global_param_name, unwrap_model

    offset = pp_layer_offset(layout.pp_rank, spec.num_layers, layout.pp)
    return {to_local_spec_norm_name(global_param_name(n, offset)): p for n, p in unwrap_model(model).named_parameters()}


def check_layout(plan: SyncPlan, layout: ParallelLayout) -> None:
    """The plan's rank arithmetic must be Megatron's (it would silently gather the wrong shards otherwise)."""
    expected = world_rank(layout.tp_rank, layout.pp_rank, layout.dp_rank, layout.tp, layout.dp)
    if (plan.tp, plan.pp, plan.dp) != (layout.tp, layout.pp, layout.dp) or expected != layout.rank:
        raise RuntimeError(
            f"sync plan for TP{plan.tp} PP{plan.pp} DP{plan.dp} does not match this rank "
            f"(rank {layout.rank}: tp {layout.tp_rank}, pp {layout.pp_rank}, dp {layout.dp_rank} of "
            f"TP{layout.tp} PP{layout.pp} DP{layout.dp}; plan expects rank {expected})"
        )


def _wire_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in _BYTE_VIEW else t


def _all_gather(t: torch.Tensor, group: Any, tp: int) -> list[torch.Tensor]:
    send = _wire_view(t.contiguous())
    shards = [torch.empty_like(send) for _ in range(tp)]
    dist.all_gather(shards, send, group=group)
    return [s.view(t.dtype) for s in shards] if send.dtype != t.dtype else shards


def _quantize(t: torch.Tensor, unit: TransferUnit, group: Any, sharded: bool) -> dict[str, torch.Tensor]:
    """Quantize a (shard of a) weight with the scale statistics of the whole tensor; returns checkpoint tensors."""
    import te_ext

    def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
        return x

    options = te_ext.split_quantize_options(unit.fmt, t, unit.split, sharded, all_reduce_max)
    return te_ext.quantize(t.detach(), unit.fmt, **options).state_dict("")


def _assemble(
    unit: TransferUnit, param: torch.Tensor, layout: ParallelLayout, group: Any, spec: Any
) -> dict[str, torch.Tensor]:
    """Full checkpoint tensors of one unit (keyed by component suffix per HF output), on every rank of the TP group."""
    sharded = layout.tp > 1 and unit.split != "replicated"
    local = param.detach()
    import te_ext

    if not te_ext.format_descriptor(unit.fmt).quantized:  # passthrough (bf16): the weight itself travels
        t = local.to(torch.bfloat16)
        full = unshard_from_tp(unit.source, _all_gather(t, group, layout.tp), spec) if sharded else t
        return {"": full}
    if unit.quantize_before_gather:
        components = _quantize(local, unit, group, sharded=True)
        out = {}
        for suffix, c in components.items():
            replicated = suffix in unit.replicated_components
            out[suffix] = c if replicated else unshard_from_tp(unit.source, _all_gather(c, group, layout.tp), spec)
        return out
    full = unshard_from_tp(unit.source, _all_gather(local, group, layout.tp), spec) if sharded else local
    return _quantize(full, unit, group, sharded=False)


def _to_wire(unit: TransferUnit, components: dict[str, torch.Tensor], spec: Any) -> dict[str, torch.Tensor]:
    """Split the assembled components into the HF-named wire tensors, checked against the plan."""
    import te_ext

    per_tensor = te_ext.format_descriptor(unit.fmt).per_tensor_components
    by_output: dict[str, dict[str, torch.Tensor]] = {}
    for suffix, tensor in components.items():
        if suffix in per_tensor:  # one per tensor: every fused member carries the shared value
            pieces = [(name, tensor.clone()) for name in unit.outputs]
        else:
            pieces = megatron_param_to_hf(unit.source, tensor, spec)
        for hf_name, piece in pieces:
            by_output.setdefault(hf_name, {})[suffix] = piece
    out: dict[str, torch.Tensor] = {}
    for hf_name, parts in by_output.items():
        module = hf_name[: -len(".weight")] if hf_name.endswith(".weight") else hf_name
        for suffix, piece in parts.items():
            out[hf_name if suffix == "" else f"{module}.{suffix}"] = piece.contiguous()
    for w in unit.wire:
        got = out.get(w.name)
        if got is None or tuple(got.shape) != w.shape or got.dtype != w.dtype:
            desc = "missing" if got is None else f"{tuple(got.shape)} {got.dtype}"
            raise RuntimeError(
                f"bridge: {unit.source} produced {w.name} as {desc}, the plan expects {w.shape} {w.dtype}"
            )
    return {w.name: out[w.name] for w in unit.wire}


def execute_bucket(
    plan: SyncPlan, index: int, params: dict[str, torch.Tensor], layout: ParallelLayout, dst: int = 0
) -> dict[str, torch.Tensor] | None:
    """Collective over the learner world: the wire tensors of bucket ``index`` on rank ``dst`` (None elsewhere)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    received: dict[str, torch.Tensor] = {}
    for unit in plan.bucket(index):
        mine = layout.pp_rank == unit.stage and layout.dp_rank == 0
        wire: dict[str, torch.Tensor] | None = None
        # a TP-sharded unit is a collective of its whole TP group; a replicated one is TP rank 0's copy alone
        if mine and (unit.split != "replicated" or layout.tp_rank == 0):
            wire = _to_wire(unit, _assemble(unit, params[unit.source], layout, group, plan.spec), plan.spec)
        if unit.sender == dst:
            if layout.rank == dst:
                assert wire is not None
                received.update(wire)
            continue
        if layout.rank == unit.sender:
            assert wire is not None
            for w in unit.wire:
                dist.send(_wire_view(wire[w.name]), dst=dst)
        elif layout.rank == dst:
            for w in unit.wire:
                buf = torch.empty(w.shape, dtype=w.dtype)
                dist.recv(_wire_view(buf), src=unit.sender)
                received[w.name] = buf
    return received if layout.rank == dst else None

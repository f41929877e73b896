"""LoRA on Megatron's tensor-parallel linears, over a frozen base held in bf16/fp32 or as NVFP4 codes.

Megatron fuses HF's per-module linears: ``linear_qkv`` = q/k/v (rows interleaved by query group), ``linear_fc1`` =
[gate; up]; ``linear_proj`` (o) and ``linear_fc2`` (down) are row-parallel. The adapter keeps PEFT's per-module
tensors (``A_m: [r, in]``, ``B_m: [out, r]``) so that what the learner trains is exactly the PEFT adapter; each
forward assembles the fused delta with the same rules the weight loader uses for the base
(:func:`~qrl_megatron.models.hf_mapping.megatron_shard_slices` / :func:`assemble_megatron_shard`).

TP split of the adapter (each rank's ``A``/``B`` is a slice of the full PEFT tensor, taken with those same rules):

* column-parallel (qkv, fc1): the input is replicated, so ``A_m`` is whole on every rank and ``B_m`` holds the
  rank's output rows. ``h = x A^T`` passes through ``copy_to_tensor_model_parallel_region`` (identity forward,
  all-reduce backward): every rank's ``B`` rows contribute to ``dA`` and to ``dx``, so the sum is the full gradient
  on every rank (the base's own ``copy_to`` only reduces the base's share of ``dx``).
* row-parallel (o, down): the input is split along its features, so ``A_m`` holds the rank's columns; the partial
  ``x_local A_local^T`` is all-reduced (``reduce_from_tensor_model_parallel_region``) and ``B_m`` is whole.

Initialisation is PEFT's (``A`` Kaiming-uniform with ``a = sqrt(5)``, ``B = 0``), drawn for the *full* tensor from
a generator seeded by (seed, global layer, module) and then sliced, so every TP/PP layout starts from the same
adapter (the layout-invariance tests rely on it).

The frozen NVFP4 base (``learner.base_format=nvfp4``): the rank keeps, per HF member of a fused linear, its slice
of the checkpoint's packed E2M1 codes, E4M3 block scales and global scale -- the very tensors the rollout engine
loaded -- and no dense weight. :func:`te_ext.frozen_linear` dequantizes them in the forward and again in the
backward (only the codes are saved for it), so a dense copy exists for one layer at a time.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from qrl_megatron.lora.adapter import MODULE_PATHS, AdapterSpec, lora_tensor_name, module_shape
from qrl_megatron.models.checkpoint_reader import CheckpointSource, as_checkpoint_reader
from qrl_megatron.models.hf_mapping import (
    HFSlice,
    assemble_megatron_shard,
    megatron_shard_slices,
    pp_layer_offset,
    tp_split_kind,
)
from qrl_megatron.models.registry import ModelSpec
from qrl_megatron.platform import ParallelLayout

__all__ = ["LoRALinear", "apply_lora", "iter_lora_linears", "lora_parameters"]

# Megatron linear (local spec, within a decoder layer) -> the HF members it fuses, in fused order
FUSED_MEMBERS = {
    "self_attention.linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "self_attention.linear_proj": ("o_proj",),
    "mlp.linear_fc1": ("gate_proj", "up_proj"),
    "mlp.linear_fc2": ("down_proj",),
}


def _init_seed(seed: int, layer: int, module: str) -> int:
    return (seed * 1_000_003 + layer * 7_919 + list(MODULE_PATHS).index(module) * 104_729) % (2**63 - 1)


def initial_lora_a(seed: int, layer: int, module: str, spec: ModelSpec, rank: int) -> torch.Tensor:
    """The full ``A`` PEFT would initialise (Kaiming-uniform, a=sqrt(5): bound 1/sqrt(in)), seeded per module."""
    _, fan_in = module_shape(spec, module)
    generator = torch.Generator().manual_seed(_init_seed(seed, layer, module))
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(rank, fan_in, generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).float()


@dataclass
class _FrozenPiece:
    """One HF member's slice of an NVFP4 checkpoint weight (what this rank's shard needs of it)."""

    packed: torch.Tensor  # uint8 [rows, cols/2]
    scale: torch.Tensor  # float8_e4m3fn [rows, cols/16]
    global_scale: torch.Tensor  # float32 [1]
    shape: tuple[int, int]


class LoRALinear(torch.nn.Module):
    """The adapter (and, for an NVFP4 base, the frozen codes) of one Megatron linear on this rank.

    Attached to the Megatron module as its ``lora`` child; the module's ``forward`` is replaced on that instance
    by :meth:`forward_with`, so parameter names, the HF mapping and the base's state stay as they were.
    """

    def __init__(
        self,
        spec: ModelSpec,
        layout: ParallelLayout,
        adapter: AdapterSpec,
        layer: int,
        megatron_name: str,
        split: str,
        seed: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.spec, self.layout, self.adapter, self.layer = spec, layout, adapter, layer
        self.megatron_name, self.split = megatron_name, split  # split: "qkv" | "fc1" | "row"
        self.members = FUSED_MEMBERS[megatron_name.split(".", 3)[3].rsplit(".", 1)[0]]
        self.targets = tuple(m for m in self.members if m in adapter.targets)
        self.scaling = adapter.scaling
        self.frozen: list[_FrozenPiece] | None = None
        self.frozen_dtype = dtype
        # this rank's slice of each member's weight, in HF coordinates (rows for column splits, columns for row)
        hf_shapes = {f"model.layers.{layer}.{MODULE_PATHS[m]}.weight": module_shape(spec, m) for m in self.members}
        self.slices: tuple[HFSlice, ...] = megatron_shard_slices(
            megatron_name, spec, layout.tp, layout.tp_rank, hf_shapes
        )
        for member, piece in zip(self.members, self.slices, strict=True):
            if member not in self.targets:
                continue
            full_a = initial_lora_a(seed, layer, member, spec, adapter.rank)
            out, _ = module_shape(spec, member)
            if split == "row":
                # TP=1 names the whole tensor (dim 0); a real split names this rank's input columns (dim 1)
                a = full_a[:, piece.start : piece.stop] if piece.dim == 1 else full_a
                b = torch.zeros(out, adapter.rank)
            else:
                a = full_a
                b = torch.zeros(piece.stop - piece.start, adapter.rank)
            self.register_parameter(f"A_{member}", torch.nn.Parameter(a.to(dtype).contiguous()))
            self.register_parameter(f"B_{member}", torch.nn.Parameter(b.to(dtype).contiguous()))
        self.dropout = torch.nn.Dropout(adapter.dropout) if adapter.dropout > 0 else torch.nn.Identity()

    # -- the adapter as PEFT tensors ------------------------------------------------------------------------------
    def local_tensors(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """(PEFT name, how it is split over TP: "whole" | "rows" | "cols", this rank's tensor) per adapter tensor."""
        for member in self.targets:
            a, b = getattr(self, f"A_{member}"), getattr(self, f"B_{member}")
            a_split, b_split = ("cols", "whole") if self.split == "row" else ("whole", "rows")
            yield lora_tensor_name(self.layer, member, "A"), a_split, a
            yield lora_tensor_name(self.layer, member, "B"), b_split, b

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``(alpha/r) * dropout(x) A^T B^T`` for this rank's (fused) output features."""
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        a = torch.cat([getattr(self, f"A_{m}") for m in self.targets], dim=0)  # [T*r, in(_local)]
        h = self.dropout(x) @ a.t().to(x.dtype)
        if self.split == "row":
            h = reduce_from_tensor_model_parallel_region(h)
        else:
            h = copy_to_tensor_model_parallel_region(h)
        r = self.adapter.rank
        pieces = []
        for member, piece in zip(self.members, self.slices, strict=True):
            rows = (piece.stop - piece.start) if self.split != "row" else module_shape(self.spec, member)[0]
            block = torch.zeros(rows, len(self.targets) * r, dtype=x.dtype, device=x.device)
            if member in self.targets:
                i = self.targets.index(member)
                block = torch.cat(
                    [block[:, : i * r], getattr(self, f"B_{member}").to(x.dtype), block[:, (i + 1) * r :]], dim=1
                )
            pieces.append(block)
        b = assemble_megatron_shard(self.megatron_name, pieces, self.spec, self.layout.tp)  # [out_local, T*r]
        return (h @ b.t()) * self.scaling

    # -- the frozen NVFP4 base -------------------------------------------------------------------------------------
    def hold_nvfp4_base(self, source: CheckpointSource) -> None:
        """Read this rank's slices of the members' packed codes and scales from an NVFP4 checkpoint."""
        reader = as_checkpoint_reader(source)
        pieces = []
        for piece in self.slices:
            module = piece.name.removesuffix(".weight")
            rows, cols = reader.shape(f"{module}.weight_packed")
            cols *= 2
            block = cols // reader.shape(f"{module}.weight_scale")[1]
            if piece.dim == 0:
                packed = reader.read_slice(f"{module}.weight_packed", 0, piece.start, piece.stop)
                scale = reader.read_slice(f"{module}.weight_scale", 0, piece.start, piece.stop)
                shape = (piece.stop - piece.start, cols)
            else:
                if piece.start % block or piece.stop % block:
                    raise ValueError(
                        f"{piece.name}: the TP split at columns {piece.start}:{piece.stop} cuts an NVFP4 scale block "
                        f"of {block}; choose learner.tp so that each shard's input size is a multiple of {block}"
                    )
                packed = reader.read_slice(f"{module}.weight_packed", 1, piece.start // 2, piece.stop // 2)
                scale = reader.read_slice(f"{module}.weight_scale", 1, piece.start // block, piece.stop // block)
                shape = (rows, piece.stop - piece.start)
            global_scale = reader.read_slice(f"{module}.weight_global_scale", 0, 0, 1)
            pieces.append(_FrozenPiece(packed.contiguous(), scale.contiguous(), global_scale.float(), shape))
        self.frozen = pieces
        for i, p in enumerate(pieces):  # buffers: moved with the module, counted, not trained, not in state_dict
            self.register_buffer(f"base_packed_{i}", p.packed, persistent=False)
            self.register_buffer(f"base_scale_{i}", p.scale, persistent=False)
            self.register_buffer(f"base_global_scale_{i}", p.global_scale, persistent=False)

    def dequantized_base(self, dtype: torch.dtype) -> torch.Tensor:
        """This rank's dense fused base weight, decoded from the held codes (transient)."""
        import te_ext

        assert self.frozen is not None
        pieces = [
            te_ext.dequantize_nvfp4_checkpoint(
                getattr(self, f"base_packed_{i}"),
                getattr(self, f"base_scale_{i}"),
                getattr(self, f"base_global_scale_{i}"),
                p.shape,
                dtype,
            )
            for i, p in enumerate(self.frozen)
        ]
        return assemble_megatron_shard(self.megatron_name, pieces, self.spec, self.layout.tp)

    def base_bytes(self) -> int:
        """Bytes of the frozen NVFP4 base held here (codes + block scales + global scales)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n.startswith("base_"))

    # -- forward of the wrapped Megatron linear -------------------------------------------------------------------
    def forward_with(self, linear: Any, input_: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if self.frozen is None:
            output, bias = type(linear).forward(linear, input_, *args, **kwargs)
        else:
            output, bias = self._frozen_forward(linear, input_)
        if self.targets:
            output = output + self.delta(input_)
        return output, bias

    def _frozen_forward(self, linear: Any, input_: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Megatron's column/row-parallel forward (no sequence parallelism) with the base decoded from NVFP4."""
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        import te_ext

        def weight() -> torch.Tensor:
            return self.dequantized_base(input_.dtype)

        bias = linear.bias
        if self.split == "row":
            output = reduce_from_tensor_model_parallel_region(te_ext.frozen_linear(input_, weight))
            if linear.skip_bias_add:
                return output, bias
            return (output + bias if bias is not None else output), None
        output = te_ext.frozen_linear(copy_to_tensor_model_parallel_region(input_), weight)
        if linear.skip_bias_add:
            return output, bias
        return (output + bias if bias is not None else output), None


def iter_lora_linears(model: torch.nn.Module) -> Iterator[LoRALinear]:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            yield module


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for m in iter_lora_linears(model) for p in m.parameters()]


def apply_lora(
    module: torch.nn.Module,
    spec: ModelSpec,
    layout: ParallelLayout,
    adapter: AdapterSpec,
    *,
    seed: int,
    frozen_base: CheckpointSource | None = None,
) -> None:
    """Freeze ``module`` (a GPTModel stage) and attach the adapter to every targeted linear of its layers.

    ``frozen_base``: an NVFP4 checkpoint (the rollout engine's): each targeted linear then holds its codes and its
    dense weight is dropped. Trainable afterwards: the adapter, and with ``adapter.train_norms`` the two per-layer
    RMSNorm weights (QeRL's scripts train them too). Call after the weights are loaded, before DDP and the optimizer.
    """
    config = getattr(module, "config", None)
    if getattr(config, "sequence_parallel", False):
        raise ValueError("learner.lora does not support sequence parallelism (the adapter's TP reductions assume none)")
    module.requires_grad_(False)
    offset = pp_layer_offset(layout.pp_rank, spec.num_layers, layout.pp)
    dtype = next(module.parameters()).dtype
    for local_index, layer in enumerate(module.decoder.layers):  # type: ignore[union-attr, arg-type]
        index = offset + local_index
        for path in FUSED_MEMBERS:
            parent_path, attr = path.rsplit(".", 1)
            parent = layer.get_submodule(parent_path)
            linear = getattr(parent, attr)
            members = FUSED_MEMBERS[path]
            if not any(m in adapter.targets for m in members) and frozen_base is None:
                continue
            name = f"decoder.layers.{index}.{path}.weight"
            lora = LoRALinear(spec, layout, adapter, index, name, tp_split_kind(name), seed, dtype)
            if frozen_base is not None:
                lora.hold_nvfp4_base(frozen_base)
                # the dense copy goes: the base lives as codes (a frozen parameter would still be counted and saved)
                del linear._parameters["weight"]
                linear.weight = None
            linear.lora = lora
            linear.forward = types.MethodType(lambda self, x, *a, **k: self.lora.forward_with(self, x, *a, **k), linear)
        if adapter.train_norms:
            layer.input_layernorm.weight.requires_grad_(True)
            layer.pre_mlp_layernorm.weight.requires_grad_(True)
    for lora in iter_lora_linears(module):
        for p in lora.parameters():
            p.requires_grad_(True)


def _local_norms(model: torch.nn.Module, layout: ParallelLayout, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """This stage's per-layer RMSNorm weights under their HF names (replicated over TP)."""
    offset = pp_layer_offset(layout.pp_rank, spec.num_layers, layout.pp)
    out = {}
    for i, layer in enumerate(model.decoder.layers):  # type: ignore[union-attr, arg-type]
        out[f"model.layers.{offset + i}.input_layernorm.weight"] = layer.input_layernorm.weight
        out[f"model.layers.{offset + i}.post_attention_layernorm.weight"] = layer.pre_mlp_layernorm.weight
    return out


def gather_adapter(
    model: torch.nn.Module,
    spec: ModelSpec,
    layout: ParallelLayout,
    adapter: AdapterSpec,
    *,
    dst: int = 0,
    norms: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor] | None:
    """Collective: the full PEFT adapter (and with ``norms`` the per-layer norm weights, HF names) on rank ``dst``.

    Every rank calls it. Each tensor is joined over its stage's TP group (rows / columns, in rank order; whole
    tensors are taken from TP rank 0), then sent from that stage's first rank (TP 0, DP 0) to ``dst``, one tensor
    at a time in :func:`~qrl_megatron.lora.adapter.adapter_shapes` order, so the memory on ``dst`` is the adapter.
    ``dst`` must be the first rank of its pipeline (rank 0 is).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from qrl_megatron.lora.adapter import adapter_shapes, norm_shapes

    local: dict[str, tuple[str, torch.Tensor]] = {}
    for lora in iter_lora_linears(model):
        for name, split, param in lora.local_tensors():
            local[name] = (split, param)
    if norms:
        for name, param in _local_norms(model, layout, spec).items():
            local[name] = ("whole", param)
    shapes = dict(adapter_shapes(spec, adapter.rank, adapter.targets))
    if norms:
        shapes.update(norm_shapes(spec))
    per_stage = spec.num_layers // layout.pp
    pp_ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    tp_group = parallel_state.get_tensor_model_parallel_group()
    is_dst = dist.get_rank() == dst
    leader = layout.tp_rank == 0 and layout.dp_rank == 0
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        stage = int(name.split("layers.", 1)[1].split(".", 1)[0]) // per_stage
        tensor: torch.Tensor | None = None
        if stage == layout.pp_rank:
            split, shard = local[name]
            shard = shard.detach().to(dtype).contiguous()
            if split != "whole" and layout.tp > 1:
                parts = [torch.empty_like(shard) for _ in range(layout.tp)]
                dist.all_gather(parts, shard, group=tp_group)
                shard = torch.cat(parts, dim=0 if split == "rows" else 1)
            tensor = shard
        source = pp_ranks[stage] if leader or is_dst else None
        if is_dst:
            if source == dst:
                assert tensor is not None
                out[name] = tensor.clone()
            else:
                buffer = torch.empty(shape, dtype=dtype)
                dist.recv(buffer, src=source)
                out[name] = buffer
        elif leader and stage == layout.pp_rank and layout.pp_rank != 0 and pp_ranks[0] == dst:
            assert tensor is not None
            dist.send(tensor, dst=dst)
    return out if is_dst else None

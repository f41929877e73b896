"""One descriptor per number format: everything outside te_ext needs to know about a format, in one place.

The weight bridge (plan, executor), the learner's precision emulation and the sync probe read these fields instead
of branching on format names, so adding a format is a te_ext change only:

* ``block_k``: elements per scale block along the input (K) dimension, ``None`` for per-row / per-tensor scales.
  A TP shard (or an engine rank's slice) can be quantized on its own only if its K is a multiple of it.
* ``tp_shared_stat``: the statistic that spans a TP split and must be all-reduced (MAX) before quantizing shards:
  ``"global_amax"`` (NVFP4's per-tensor global scale: every split), ``"row_amax"`` (per-channel FP8/INT8: only
  weights split along K, i.e. row-parallel), or ``None``.
* ``replicated_column`` / ``replicated_row``: checkpoint components that are identical on every TP rank after a
  shard-local quantization (not gathered) for column- / row-split weights; ``per_tensor_components``: components
  that exist once per tensor (every fused member gets a copy).
* ``quantize_options``: the options the bridge passes to :func:`te_ext.quantize`.
* ``activation_format``: what the engine does to activations (W8A8: per-token quantization), ``None`` for
  weight-only formats; ``probe_tolerance``: the default mean-logprob gap the sync probe accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from te_ext._common import FORMATS, MXFP4_BLOCK, NVFP4_BLOCK

__all__ = [
    "DESCRIPTORS",
    "EXPORT_FORMATS",
    "ROLLOUT_FORMATS",
    "FormatDescriptor",
    "format_descriptor",
    "split_quantize_options",
]


@dataclass(frozen=True)
class FormatDescriptor:
    name: str
    block_k: int | None = None
    tp_shared_stat: str | None = None  # "global_amax" | "row_amax" | None
    replicated_column: tuple[str, ...] = ()
    replicated_row: tuple[str, ...] = ()
    per_tensor_components: tuple[str, ...] = ()
    quantize_options: tuple[tuple[str, Any], ...] = ()
    activation_format: str | None = None
    probe_tolerance: float = 0.05
    exportable: bool = False  # te_ext.vllm_export writes it (and the weight bridge streams it)
    quantized: bool = True  # False: the passthrough wire format (bf16)

    def options(self) -> dict[str, Any]:
        return dict(self.quantize_options)

    def shared_stat(self, split: str, sharded: bool) -> str | None:
        """The statistic a (shard of a) weight with TP split ``split`` needs from the whole tensor; ``None``: none.

        ``global_amax`` is taken whether or not the weight is sharded (it is then just the tensor's own amax);
        ``row_amax`` only for row-split shards (an unsharded or column-split tensor has its rows whole)."""
        if self.tp_shared_stat == "global_amax":
            return "global_amax"
        if self.tp_shared_stat == "row_amax" and sharded and split == "row":
            return "row_amax"
        return None

    def replicated_components(self, split: str) -> tuple[str, ...]:
        """Checkpoint components equal on every TP rank after a shard-local quantization (sent once, not gathered)."""
        return self.replicated_row if split == "row" else self.replicated_column

    def shard_local(self, k_local: int) -> bool:
        """Whether a shard with ``k_local`` inputs can be quantized on its own (its blocks do not straddle shards)."""
        return self.block_k is None or k_local % self.block_k == 0

    def checkpoint_layout(self, shape: tuple[int, ...] | list[int]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """``(suffix, shape, dtype)`` of the checkpoint tensors of one ``[N, K]`` weight (bf16: the weight itself)."""
        if not self.quantized:
            return [("", tuple(int(s) for s in shape), torch.bfloat16)]
        from te_ext.vllm_export import checkpoint_layout

        return checkpoint_layout(self.name, shape)


_W8A8 = dict(
    tp_shared_stat="row_amax",
    replicated_row=("weight_scale",),
    quantize_options=(("granularity", "channel"),),
    probe_tolerance=0.1,  # W8A8 engines quantize activations per token in bf16; the reference emulates it closely
    exportable=True,
)

DESCRIPTORS: dict[str, FormatDescriptor] = {
    "bf16": FormatDescriptor("bf16", quantized=False),
    "nvfp4": FormatDescriptor(
        "nvfp4",
        block_k=NVFP4_BLOCK,
        tp_shared_stat="global_amax",
        replicated_column=("weight_global_scale",),
        replicated_row=("weight_global_scale",),
        per_tensor_components=("weight_global_scale",),
        # the engine computes in bf16 on the decoded weights; on a 2-core AMD EPYC (AVX2) the warm-started tiny
        # policy read 0.057-0.061 nats mean against the float32 reference (0.019 on the Intel CI machine kind), so
        # 0.05 stopped healthy runs; a stale engine reads 0.3 and more
        probe_tolerance=0.1,
        exportable=True,
    ),
    "mxfp4": FormatDescriptor("mxfp4", block_k=MXFP4_BLOCK),
    "fp8": FormatDescriptor("fp8", activation_format="fp8", **_W8A8),  # type: ignore[arg-type]
    "int8": FormatDescriptor("int8", activation_format="int8", **_W8A8),  # type: ignore[arg-type]
}
assert set(FORMATS) <= set(DESCRIPTORS)

# formats vllm_export writes (and the bridge streams); what rollout.quant accepts (bf16: unquantized passthrough)
EXPORT_FORMATS = tuple(f for f in FORMATS if DESCRIPTORS[f].exportable)
ROLLOUT_FORMATS = ("bf16", *EXPORT_FORMATS)


def format_descriptor(name: str) -> FormatDescriptor:
    try:
        return DESCRIPTORS[name]
    except KeyError:
        raise ValueError(f"te_ext: unknown format {name!r}; expected one of {tuple(DESCRIPTORS)}") from None


def split_quantize_options(
    fmt: str,
    tensor: torch.Tensor,
    split: str,
    sharded: bool,
    all_reduce_max: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, Any]:
    """:func:`te_ext.quantize` options for ``tensor`` (a TP shard when ``sharded``) that reproduce the codes and
    scales of the whole weight: the format's ``quantize_options`` plus its shared statistic, reduced with
    ``all_reduce_max`` (a float32 tensor -> its MAX over the TP group) when sharded."""
    d = format_descriptor(fmt)
    options = d.options()
    stat = d.shared_stat(split, sharded)
    if stat == "global_amax" and sharded:
        # Unsharded, te_ext.quantize takes the very same amax itself: a second full pass here cost 0.14 s per layer
        # of a 1B-shaped model (2.3 s of a 12 s NVFP4 sync on 2 CPU cores).
        amax = all_reduce_max(tensor.detach().abs().amax().float().reshape(1))
        options["global_amax"] = amax.reshape(())
    elif stat == "row_amax":
        options["row_amax"] = all_reduce_max(tensor.detach().abs().amax(dim=1).float())
    return options

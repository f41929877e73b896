"""Patch of vLLM 0.32.0's CPU LoRA kernels (``vllm/lora/ops/torch_ops/lora_ops.py``): one GEMM when every token
uses the same adapter.

Why: the torch reference ops behind vLLM's CPU punica wrapper gather a full copy of the adapter matrix for *every
token* (``lora_b_weights[lora_indices_tensor]`` -> ``[tokens, out, r]``) and contract it with an einsum. QeRL mode
serves exactly one adapter to every request, so all indices are equal and the gather is pure overhead: measured on
the tiny QeRL recipe (2-core CPU, 512 sequences per step), the rollout ran at ~400 tokens/s against ~6 900 for the
same engine without LoRA. With one index the patched ops do ``inputs @ W[k]^T`` -- the same numbers up to the
summation order of one bf16 GEMM -- and fall back to vLLM's own code for mixed batches.

Applied in every vLLM process through our ``vllm.general_plugins`` entry point (``register``); GPU builds use the
Triton/punica kernels and are untouched. Written for vLLM 0.32.0: the wrapper imports the ops by name, so both
modules' names are replaced.
"""

from __future__ import annotations

from typing import Any

import torch

_PATCHED = "_qrl_uniform_index_fast_path"


def _single_index(indices: torch.Tensor) -> int | None:
    if indices.numel() == 0:
        return None
    first = indices.reshape(-1)[0]
    return int(first) if bool((indices == first).all()) else None


def _weight(weights: torch.Tensor, index: int, dtype: torch.dtype) -> torch.Tensor:
    w = weights[index]
    if w.dim() == 3:  # [1, out, in]: the 4-D stacked layout
        w = w.squeeze(0)
    return w.to(dtype)


def _patched_ops(ops: Any) -> dict[str, Any]:
    original_expand, original_shrink, original_slice = ops.bgmv_expand, ops.bgmv_shrink, ops.bgmv_expand_slice

    def bgmv_expand(
        inputs: torch.Tensor,
        lora_b_weights: torch.Tensor,
        output_tensor: torch.Tensor,
        lora_indices_tensor: torch.Tensor,
        add_inputs: bool = True,
    ) -> None:
        k = _single_index(lora_indices_tensor)
        if k is None or inputs.shape[0] != output_tensor.shape[0]:
            return original_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)  # type: ignore[no-any-return]
        outputs = inputs.to(output_tensor.dtype) @ _weight(lora_b_weights, k, output_tensor.dtype).t()
        common = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
        if add_inputs:
            output_tensor[:, :common] += outputs[:, :common]
        else:
            output_tensor[:, :common] = outputs[:, :common]
        return None

    def bgmv_shrink(
        inputs: torch.Tensor,
        lora_b_weights: torch.Tensor,
        output_tensor: torch.Tensor,
        lora_indices_tensor: torch.Tensor,
        scaling: float = 1.0,
    ) -> None:
        k = _single_index(lora_indices_tensor)
        if k is None or inputs.shape[0] != output_tensor.shape[0]:
            return original_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)  # type: ignore[no-any-return]
        outputs = inputs.to(output_tensor.dtype) @ _weight(lora_b_weights, k, output_tensor.dtype).t()
        output_tensor[:, : outputs.shape[1]] = scaling * outputs
        return None

    def bgmv_expand_slice(
        inputs: torch.Tensor,
        lora_b_weights: torch.Tensor,
        output_tensor: torch.Tensor,
        lora_indices_tensor: torch.Tensor,
        slice_offset: int,
        slice_size: int,
        add_inputs: bool = True,
    ) -> None:
        k = _single_index(lora_indices_tensor)
        if k is None or inputs.shape[0] != output_tensor.shape[0]:
            return original_slice(  # type: ignore[no-any-return]
                inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs
            )
        outputs = inputs.to(output_tensor.dtype) @ _weight(lora_b_weights, k, output_tensor.dtype).t()
        if add_inputs:
            output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
        else:
            output_tensor[:, slice_offset : slice_offset + slice_size] = outputs
        return None

    return {"bgmv_expand": bgmv_expand, "bgmv_shrink": bgmv_shrink, "bgmv_expand_slice": bgmv_expand_slice}


def register() -> None:
    """``vllm.general_plugins`` entry point: install the fast path (once per process; a no-op without vLLM's CPU ops)."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return
    if getattr(lora_ops, _PATCHED, False):
        return
    patched = _patched_ops(lora_ops)
    for module in (lora_ops, punica_cpu):
        for name, fn in patched.items():
            if hasattr(module, name):
                setattr(module, name, fn)
    setattr(lora_ops, _PATCHED, True)

"""A frozen quantized weight in a trained network: decoded on the fly, in the forward and again in the backward.

QeRL's learner keeps its base as NVFP4 codes (4.5 bits per weight) and trains LoRA adapters on top. Autograd would
save the decoded dense weight of every layer for the backward (``grad_x = grad_y @ W``) -- a full dense copy of the
base alive between forward and backward, the very memory the codes were meant to save. :func:`frozen_linear`
saves only a way to decode (the codes live in the module) and decodes again in the backward; the weight gets no
gradient.

On CPU the decode is te_ext's torch reference (:func:`te_ext.nvfp4.dequantize`, the numbers vLLM computes from the
same checkpoint); on CUDA the same torch ops run on the device (a fused W4A16 Triton GEMM exists in
``te_ext.triton_kernels`` for inference shapes; the learner's backward needs the decoded weight anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from te_ext.qtensor import QuantizedTensor

__all__ = ["dequantize_nvfp4_checkpoint", "frozen_linear"]


def dequantize_nvfp4_checkpoint(
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale: torch.Tensor,
    shape: tuple[int, int],
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The dense ``[N, K]`` weight an NVFP4 checkpoint's ``weight_packed`` / ``weight_scale`` /
    ``weight_global_scale`` encode (or a row/column slice of them cut at scale-block boundaries), as vLLM decodes it."""
    qt = QuantizedTensor(
        "nvfp4",
        packed,
        {"weight_scale": weight_scale, "weight_global_scale": weight_global_scale},
        torch.Size(shape),
        {},
    )
    return qt.dequantize(dtype)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, decode: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        ctx.decode = decode  # not the decoded tensor: it is rebuilt in backward
        return x @ decode().t()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad_output @ ctx.decode(), None


def frozen_linear(x: torch.Tensor, decode: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``x @ W^T`` for a frozen ``W = decode()`` (``[N, K]``, the dtype of ``x``) that is decoded again for the
    input gradient instead of being kept alive between forward and backward."""
    return _FrozenLinear.apply(x, decode)  # type: ignore[no-any-return]

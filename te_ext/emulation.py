"""CPU (any-device) emulation of low-precision linear layers.

``fake_quant_linear(x, weight, bias, fmt)`` computes ``F.linear(Q_a(x), Q_w(weight), bias)`` where ``Q_w`` is
``te_ext.fake_quantize`` of the weight and ``Q_a`` the activation quantizer of the format, with the exact numerics
of te_ext (and therefore of the reference implementations it matches). The backward pass is straight-through:
quantization is treated as the identity, so ``dL/dx = dL/dy @ Q_w(W)`` and ``dL/dW = dL/dy^T @ Q_a(x)`` -- the
quantized operands are the ones a low-precision GEMM would reuse for dgrad/wgrad.

Activation quantizers per ``fmt`` (default; override with ``act_options``):

* ``fp8``: dynamic per-token FP8 (vLLM W8A8 FP8 dynamic); ``act_options={"granularity": "tensor"}`` gives
  per-tensor current scaling (amax/448, TE ``Float8CurrentScaling``).
* ``int8``: dynamic per-token INT8 (vLLM W8A8 INT8).
* ``nvfp4``: NVFP4 with a per-tensor global scale from the activation's amax, vLLM emulation arithmetic.
* ``mxfp4``: MXFP4.
* ``none`` / ``bf16``: no quantization (weights are still quantized unless fmt is "none"/"bf16").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import te_ext

EMULATED_FORMATS = ("fp8", "int8", "nvfp4", "mxfp4", "none", "bf16")

_DEFAULT_WEIGHT_OPTIONS: dict[str, dict[str, Any]] = {
    "fp8": {"granularity": "channel"},
    "int8": {"granularity": "channel"},
    "nvfp4": {},
    "mxfp4": {},
}


def fake_quant_activation(x: torch.Tensor, fmt: str, options: dict[str, Any] | None = None) -> torch.Tensor:
    options = dict(options or {})
    if fmt in ("none", "bf16"):
        return x
    x2 = x.reshape(-1, x.shape[-1])
    if fmt in ("fp8", "int8"):
        gran = options.pop("granularity", "token")
        if gran == "token":
            out = te_ext.quantize_activation_per_token(x2, fmt).dequantize(x.dtype)
        else:
            out = te_ext.fake_quantize(x2, fmt, granularity=gran, **options)
    elif fmt == "nvfp4":
        options.setdefault("arith", "vllm")
        out = te_ext.fake_quantize(x2, "nvfp4", **options)
    elif fmt == "mxfp4":
        out = te_ext.fake_quantize(x2, "mxfp4", **options)
    else:
        raise ValueError(f"unknown emulated format {fmt!r}; expected one of {EMULATED_FORMATS}")
    return out.reshape(x.shape)


def fake_quant_weight(weight: torch.Tensor, fmt: str, options: dict[str, Any] | None = None) -> torch.Tensor:
    if fmt in ("none", "bf16"):
        return weight
    if fmt not in _DEFAULT_WEIGHT_OPTIONS:
        raise ValueError(f"unknown emulated format {fmt!r}; expected one of {EMULATED_FORMATS}")
    opts = {**_DEFAULT_WEIGHT_OPTIONS[fmt], **(options or {})}
    return te_ext.fake_quantize(weight, fmt, **opts)


class FakeQuantLinearFunction(torch.autograd.Function):
    """``y = Q_a(x) @ Q_w(W)^T + b`` with a straight-through backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        fmt: str,
        weight_options: dict[str, Any] | None = None,
        act_options: dict[str, Any] | None = None,
        quantize_activations: bool = True,
    ) -> torch.Tensor:
        with torch.no_grad():
            wq = fake_quant_weight(weight.detach(), fmt, weight_options).to(x.dtype)
            xq = fake_quant_activation(x.detach(), fmt, act_options) if quantize_activations else x.detach()
        ctx.save_for_backward(xq, wq)
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        return F.linear(xq, wq, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        xq, wq = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ wq).reshape(*grad_out.shape[:-1], wq.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = (g2.t() @ xq.reshape(-1, xq.shape[-1])).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None


def fake_quant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    fmt: str = "fp8",
    *,
    weight_options: dict[str, Any] | None = None,
    act_options: dict[str, Any] | None = None,
    quantize_activations: bool = True,
) -> torch.Tensor:
    """Functional fake-quantized linear (see the module docstring)."""
    if fmt not in EMULATED_FORMATS:
        raise ValueError(f"unknown emulated format {fmt!r}; expected one of {EMULATED_FORMATS}")
    return FakeQuantLinearFunction.apply(x, weight, bias, fmt, weight_options, act_options, quantize_activations)


class FakeQuantLinear(torch.nn.Linear):
    """``nn.Linear`` whose forward is ``fake_quant_linear`` (drop-in for emulated low-precision training)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        fmt: str = "fp8",
        *,
        weight_options: dict[str, Any] | None = None,
        act_options: dict[str, Any] | None = None,
        quantize_activations: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if fmt not in EMULATED_FORMATS:
            raise ValueError(f"unknown emulated format {fmt!r}; expected one of {EMULATED_FORMATS}")
        self.fmt = fmt
        self.weight_options = weight_options
        self.act_options = act_options
        self.quantize_activations = quantize_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_linear(
            x,
            self.weight,
            self.bias,
            self.fmt,
            weight_options=self.weight_options,
            act_options=self.act_options,
            quantize_activations=self.quantize_activations,
        )

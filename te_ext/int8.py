"""INT8: symmetric per-output-channel (or per-tensor) weights and dynamic per-token activations (W8A8).

Weights, ``arith="vllm"`` (default; DESIGN.md and vLLM's own int8 quantizers):
``scale = amax_row / 127`` (float32, true division), ``code = round_half_even(clamp(x / scale, +-127))``.
An all-zero row gets ``scale = finfo(float32).eps`` (as compressed-tensors does) so no kernel divides by zero.

Weights, ``arith="compressed_tensors"``: compressed-tensors' ``calculate_qparams`` for a symmetric 8-bit int
uses the full range [-128, 127]: ``scale = amax_row / 127.5`` and ``code = round(clamp(x / scale, -128, 127))``
(so -amax -> -128, +amax -> 127). vLLM loads either (it only reads ``weight`` and ``weight_scale``).

Activations (``quantize_per_token``): vLLM's ``dynamic_scaled_int8_quant`` CUDA kernel:
``scale = amax_token / 127``, ``code = rne_sat(x * (127 / amax_token))`` (0 for an all-zero token).
"""

from __future__ import annotations

import torch

from te_ext._common import (
    FP32_EPS,
    INT8_MAX,
    as_rows,
    check_arith,
    check_finite_amax,
    check_input,
    row_chunks,
)
from te_ext.qtensor import QuantizedTensor

_FMT = "int8"
GRANULARITIES = ("channel", "tensor")


def _amax_rows(x2: torch.Tensor) -> torch.Tensor:
    lo, hi = x2.aminmax(dim=-1, keepdim=True)
    return torch.maximum(lo.neg_(), hi).float()


def quantize(x: torch.Tensor, *, granularity: str = "channel", arith: str = "vllm") -> QuantizedTensor:
    check_input(x, _FMT)
    check_arith(arith, _FMT)
    if granularity not in GRANULARITIES:
        raise ValueError(f"te_ext.quantize(fmt='int8'): granularity must be one of {GRANULARITIES}, got {granularity!r}")
    shape = x.shape
    x2 = as_rows(x)
    rows, k = x2.shape
    if granularity == "channel":
        amax = _amax_rows(x2)
    else:
        amax = _amax_rows(x2.reshape(1, -1)).reshape(1) if x2.numel() else torch.zeros(1, device=x.device)
    check_finite_amax(amax, x, _FMT)
    if arith == "vllm":
        scale, qmin, qmax = amax / INT8_MAX, -INT8_MAX, INT8_MAX
    else:
        scale, qmin, qmax = amax / 127.5, -128.0, 127.0
    scale = torch.where(scale == 0, torch.tensor(FP32_EPS, device=scale.device), scale)
    codes = torch.empty(rows, k, dtype=torch.int8, device=x.device)
    for sl in row_chunks(rows, k):
        s = scale if granularity == "tensor" else scale[sl]
        codes[sl] = x2[sl].to(torch.float32, copy=True).div_(s).clamp_(qmin, qmax).round_()
    return QuantizedTensor(
        fmt=_FMT,
        codes=codes.reshape(shape),
        scales={"weight_scale": scale},
        shape=torch.Size(shape),
        options={"granularity": granularity, "arith": arith},
    )


def quantize_per_token(x: torch.Tensor) -> QuantizedTensor:
    check_input(x, _FMT)
    shape = x.shape
    x2 = as_rows(x)
    rows, k = x2.shape
    amax = _amax_rows(x2)
    check_finite_amax(amax, x, _FMT)
    qmax = torch.tensor(INT8_MAX, device=amax.device)
    scale = amax / qmax
    inv = torch.where(amax == 0, torch.zeros((), device=amax.device), qmax / amax)
    codes = torch.empty(rows, k, dtype=torch.int8, device=x.device)
    for sl in row_chunks(rows, k):
        codes[sl] = x2[sl].to(torch.float32, copy=True).mul_(inv[sl]).round_().clamp_(-128.0, 127.0)
    return QuantizedTensor(
        fmt=_FMT,
        codes=codes.reshape(shape),
        scales={"input_scale": scale.reshape(*shape[:-1], 1)},
        shape=torch.Size(shape),
        options={"granularity": "token", "arith": "vllm"},
    )


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    gran = qt.options.get("granularity", "channel")
    codes = qt.codes.reshape(-1, qt.codes.shape[-1])
    rows, k = codes.shape
    scale = qt.scales["input_scale"].reshape(rows, 1) if gran == "token" else qt.scales["weight_scale"]
    out = torch.empty(rows, k, dtype=dtype, device=codes.device)
    for sl in row_chunks(rows, k):
        s = scale if gran == "tensor" else scale[sl]
        out[sl] = codes[sl].to(torch.float32).mul_(s)
    return out.reshape(qt.shape)

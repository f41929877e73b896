"""INT8: symmetric per-output-channel (or per-tensor) weights and dynamic per-token activations (W8A8).

Weights, ``arith="vllm"`` (default; vLLM's own int8 quantizers):
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
    cpu_serial,
    parallel_tiles,
    quantize_rows,
    tensor_absmax,
    tiles,
)
from te_ext.qtensor import QuantizedTensor

_FMT = "int8"
GRANULARITIES = ("channel", "tensor")


@cpu_serial
def quantize(
    x: torch.Tensor, *, granularity: str = "channel", arith: str = "vllm", row_amax: torch.Tensor | None = None
) -> QuantizedTensor:
    check_input(x, _FMT)
    if row_amax is not None and granularity != "channel":
        raise ValueError("te_ext.quantize(fmt='int8'): row_amax applies to granularity='channel' only")
    check_arith(arith, _FMT)
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"te_ext.quantize(fmt='int8'): granularity must be one of {GRANULARITIES}, got {granularity!r}"
        )
    shape = x.shape
    x2 = as_rows(x)
    rows, k = x2.shape
    divisor, qmin, qmax = (INT8_MAX, -INT8_MAX, INT8_MAX) if arith == "vllm" else (127.5, -128.0, 127.0)

    def scale_from_amax(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = amax / divisor
        s = torch.where(s == 0, torch.tensor(FP32_EPS, device=s.device), s)
        return s, s

    def apply(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return y.div_(s).clamp_(qmin, qmax).round_()

    codes = torch.empty(rows, k, dtype=torch.int8, device=x.device)
    if granularity == "channel":
        scale = quantize_rows(x2, codes, scale_from_amax, apply, row_amax=row_amax)
        check_finite_amax(scale, x, _FMT)
    else:
        amax = tensor_absmax(x2)
        check_finite_amax(amax, x, _FMT)
        scale, _ = scale_from_amax(amax)

        def work(_: int, t: tuple[slice, slice]) -> None:
            rs, cs = t
            codes[rs, cs] = apply(x2[rs, cs].to(torch.float32, copy=True), scale)

        parallel_tiles(work, tiles(rows, k, device=x.device), x.device)
    return QuantizedTensor(
        fmt=_FMT,
        codes=codes.reshape(shape),
        scales={"weight_scale": scale},
        shape=torch.Size(shape),
        options={"granularity": granularity, "arith": arith},
    )


@cpu_serial
def quantize_per_token(x: torch.Tensor) -> QuantizedTensor:
    check_input(x, _FMT)
    shape = x.shape
    x2 = as_rows(x)
    rows, k = x2.shape
    qmax = torch.tensor(INT8_MAX, device=x.device)

    def scale_from_amax(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = torch.where(amax == 0, torch.zeros((), device=amax.device), qmax / amax)
        return amax / qmax, inv

    codes = torch.empty(rows, k, dtype=torch.int8, device=x.device)
    scale = quantize_rows(x2, codes, scale_from_amax, lambda y, inv: y.mul_(inv).round_().clamp_(-128.0, 127.0))
    check_finite_amax(scale, x, _FMT)
    return QuantizedTensor.per_token(_FMT, codes, scale, shape)


@cpu_serial
def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    gran = qt.options.get("granularity", "channel")
    codes = qt.codes.reshape(-1, qt.codes.shape[-1])
    rows, k = codes.shape
    scale = qt.scales["input_scale"].reshape(rows, 1) if gran == "token" else qt.scales["weight_scale"]
    out = torch.empty(rows, k, dtype=dtype, device=codes.device)

    def work(_: int, t: tuple[slice, slice]) -> None:
        rs, cs = t
        out[rs, cs] = codes[rs, cs].to(torch.float32).mul_(scale if gran == "tensor" else scale[rs])

    parallel_tiles(work, tiles(rows, k, device=codes.device), codes.device)
    return out.reshape(qt.shape)

"""FP8 E4M3 (float8_e4m3fn, max 448) with per-tensor, per-output-channel or 2-D block float32 scales.

``scale = amax / 448`` (float32, true division); ``code = e4m3(clamp(x / scale, +-448))`` (torch's cast: round to
nearest even, E4M3 subnormals included); ``dequant = code * scale``.

Scale layouts (what vLLM's compressed-tensors W8A8/W8A16 FP8 schemes and ``Fp8LinearMethod`` allocate):

* ``granularity="tensor"``: ``weight_scale`` float32 ``[1]``.
* ``granularity="channel"``: ``weight_scale`` float32 ``[rows, 1]`` (one per output channel).
* ``granularity="block"``: ``weight_scale`` float32 ``[ceil(rows/bn), ceil(K/bk)]`` for ``block=(bn, bk)``
  (default 128x128). Shapes that do not divide the block are allowed: the last row/column block covers the
  remaining elements only (compressed-tensors pads with zeros, which leaves its amax unchanged; vLLM allocates
  the ceil-divided scale grid). compressed-tensors checkpoints call it ``weight_scale``; vLLM's ``fp8``
  method with ``weight_block_size`` (DeepSeek-V3 style) calls it ``weight_scale_inv`` -- same value, see
  ``QuantizedTensor.state_dict(naming="fp8")``.

``arith="compressed_tensors"`` (default): ``calculate_qparams`` + ``quantize`` as they run on CPU; an all-zero
tensor/row/block gets scale ``finfo(float32).eps``. ``arith="vllm"`` follows vLLM's own quantizers:
tensor = ``QuantFP8(static=True).forward_native`` (``x * reciprocal(scale)``); channel = online
``_fp8_channel_scale`` / ``_fp8_quant_per_channel`` (scale clamped to >= 1/(448*512), true division);
block = ``per_block_cast_to_fp8`` (block amax clamped to >= 1e-4, ``x * (1.0 / scale)``).
"""

from __future__ import annotations

import torch

from te_ext._common import (
    E4M3_MAX,
    FP8_DEFAULT_BLOCK,
    FP8_MIN_SCALING_FACTOR,
    FP32_EPS,
    as_rows,
    block_absmax,
    check_arith,
    check_finite_amax,
    check_input,
    cpu_serial,
    pad_last_dim,
    parallel_tiles,
    quantize_rows,
    tensor_absmax,
    tiles,
)
from te_ext.qtensor import QuantizedTensor

_FMT = "fp8"
GRANULARITIES = ("tensor", "channel", "block")


def _block_amax(x2: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """float32 amax of every ``bn x bk`` tile ``[ceil(R/bn), ceil(K/bk)]``; partial tiles cover what exists."""
    rows, k = x2.shape
    per_row = block_absmax(pad_last_dim(x2, bk), bk)  # [rows, ceil(K/bk)]
    pr = (-rows) % bn
    if pr:
        per_row = torch.nn.functional.pad(per_row, (0, 0, 0, pr))
    return per_row.view(-1, bn, per_row.shape[1]).amax(dim=1)


def _apply_block(y: torch.Tensor, row_scales: torch.Tensor, bk: int, divide: bool) -> torch.Tensor:
    """In place ``y / s`` (or ``y * s``) with ``row_scales [r, ceil(K/bk)]`` broadcast over each bk columns."""
    r, k = y.shape
    if k % bk == 0:
        yv, m = y.view(r, k // bk, bk), row_scales.unsqueeze(-1)
    else:
        yv, m = y, row_scales.repeat_interleave(bk, dim=1)[:, :k]
    if divide:
        yv.div_(m)
    else:
        yv.mul_(m)
    return y


def _replace_zero(scale: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(scale == 0, torch.tensor(value, dtype=scale.dtype, device=scale.device), scale)


@cpu_serial
def quantize(
    x: torch.Tensor,
    *,
    granularity: str = "channel",
    block: tuple[int, int] = FP8_DEFAULT_BLOCK,
    arith: str = "compressed_tensors",
    row_amax: torch.Tensor | None = None,
) -> QuantizedTensor:
    check_input(x, _FMT)
    if row_amax is not None and granularity != "channel":
        raise ValueError("te_ext.quantize(fmt='fp8'): row_amax applies to granularity='channel' only")
    check_arith(arith, _FMT)
    if granularity not in GRANULARITIES:
        raise ValueError(f"te_ext.quantize(fmt='fp8'): granularity must be one of {GRANULARITIES}, got {granularity!r}")
    shape = x.shape
    x2 = as_rows(x)
    rows, k = x2.shape
    opts: dict = {"granularity": granularity, "arith": arith}

    if granularity == "tensor":
        amax = tensor_absmax(x2)
        check_finite_amax(amax, x, _FMT)
        scale = amax / E4M3_MAX
        if arith == "compressed_tensors":
            scale = _replace_zero(scale, FP32_EPS)
            mult, divide = scale, True
        else:
            scale = scale.clamp(min=FP8_MIN_SCALING_FACTOR)
            mult, divide = scale.reciprocal(), False
    elif granularity == "channel":
        fp8_max = torch.tensor(E4M3_MAX, device=x.device)

        def scale_from_amax(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if arith == "compressed_tensors":
                s = _replace_zero(amax / E4M3_MAX, FP32_EPS)
            else:
                s = (amax / fp8_max).clamp_min(1.0 / (fp8_max * 512))
            return s, s

        codes = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
        scale = quantize_rows(
            x2, codes, scale_from_amax, lambda y, s: y.div_(s).clamp_(-E4M3_MAX, E4M3_MAX), row_amax=row_amax
        )
        check_finite_amax(scale, x, _FMT)
        return QuantizedTensor(
            fmt=_FMT, codes=codes.reshape(shape), scales={"weight_scale": scale}, shape=torch.Size(shape), options=opts
        )
    else:
        if x.ndim != 2:
            raise ValueError(
                f"te_ext.quantize(fmt='fp8', granularity='block'): block scales need a 2-D weight, got shape {tuple(shape)}"
            )
        bn, bk = (int(block[0]), int(block[1]))
        if bn <= 0 or bk <= 0:
            raise ValueError(f"te_ext.quantize(fmt='fp8'): block must be two positive ints, got {block!r}")
        opts["block"] = (bn, bk)
        amax = _block_amax(x2, bn, bk)
        check_finite_amax(amax, x, _FMT)
        if arith == "compressed_tensors":
            scale = _replace_zero(amax / E4M3_MAX, FP32_EPS)
            mult, divide = scale.repeat_interleave(bn, dim=0)[:rows], True
        else:
            scale = amax.clamp(1e-4) / E4M3_MAX
            mult, divide = (1.0 / scale).repeat_interleave(bn, dim=0)[:rows], False

    codes = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    bk = opts["block"][1] if granularity == "block" else 1

    def work(_: int, t: tuple[slice, slice]) -> None:
        rs, cs = t
        y = x2[rs, cs].to(torch.float32, copy=True)
        if granularity == "block":
            _apply_block(y, mult[rs, cs.start // bk : -(-cs.stop // bk)], bk, divide)
        else:
            if divide:
                y.div_(mult)
            else:
                y.mul_(mult)
        codes[rs, cs] = y.clamp_(-E4M3_MAX, E4M3_MAX)

    parallel_tiles(work, tiles(rows, k, bk, device=x.device), x.device)
    return QuantizedTensor(
        fmt=_FMT,
        codes=codes.reshape(shape),
        scales={"weight_scale": scale},
        shape=torch.Size(shape),
        options=opts,
    )


@cpu_serial
def quantize_per_token(x: torch.Tensor) -> QuantizedTensor:
    """Dynamic per-token FP8 for activations, as vLLM's ``QuantFP8(static=False, PER_TOKEN).forward_native``:
    ``scale = max(amax_token / 448, 1/(448*512))``, ``code = e4m3(clamp(x * reciprocal(scale), +-448))``."""
    check_input(x, _FMT)
    shape = x.shape
    x2 = as_rows(x)
    rows, k = x2.shape

    def scale_from_amax(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = (amax / E4M3_MAX).clamp(min=FP8_MIN_SCALING_FACTOR)
        return s, s.reciprocal()

    codes = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = quantize_rows(x2, codes, scale_from_amax, lambda y, inv: y.mul_(inv).clamp_(-E4M3_MAX, E4M3_MAX))
    check_finite_amax(scale, x, _FMT)
    return QuantizedTensor.per_token(_FMT, codes, scale, shape)


@cpu_serial
def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    gran = qt.options.get("granularity", "channel")
    codes = qt.codes.reshape(-1, qt.codes.shape[-1])
    rows, k = codes.shape
    if gran == "token":
        scale = qt.scales["input_scale"].reshape(rows, 1)
    elif gran == "block":
        bn, bk = qt.options["block"]
        scale = qt.scales["weight_scale"].repeat_interleave(bn, dim=0)[:rows]
    else:
        scale = qt.scales["weight_scale"]
    out = torch.empty(rows, k, dtype=dtype, device=codes.device)
    align = bk if gran == "block" else 1

    def work(_: int, t: tuple[slice, slice]) -> None:
        rs, cs = t
        y = codes[rs, cs].to(torch.float32)
        if gran == "block":
            out[rs, cs] = _apply_block(y, scale[rs, cs.start // bk : -(-cs.stop // bk)], bk, divide=False)
        else:
            out[rs, cs] = y.mul_(scale if gran == "tensor" else scale[rs])

    parallel_tiles(work, tiles(rows, k, align, device=codes.device), codes.device)
    return out.reshape(qt.shape)

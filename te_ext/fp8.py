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
    check_arith,
    check_finite_amax,
    check_input,
    row_chunks,
)
from te_ext.qtensor import QuantizedTensor

_FMT = "fp8"
GRANULARITIES = ("tensor", "channel", "block")


def _amax_rows(x2: torch.Tensor) -> torch.Tensor:
    lo, hi = x2.aminmax(dim=-1, keepdim=True)
    return torch.maximum(lo.neg_(), hi).float()


def _block_amax(x2: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    rows, k = x2.shape
    pr, pk = (-rows) % bn, (-k) % bk
    xp = torch.nn.functional.pad(x2, (0, pk, 0, pr)) if (pr or pk) else x2
    nb_r, nb_k = xp.shape[0] // bn, xp.shape[1] // bk
    lo, hi = xp.reshape(nb_r, bn, nb_k, bk).aminmax(dim=3)  # [nb_r, bn, nb_k]
    return torch.maximum(lo.neg_(), hi).amax(dim=1).float()  # [nb_r, nb_k]


def _expand_block(scale: torch.Tensor, rows: int, k: int, bn: int, bk: int) -> torch.Tensor:
    return scale.repeat_interleave(bn, dim=0)[:rows].repeat_interleave(bk, dim=1)[:, :k]


def _replace_zero(scale: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(scale == 0, torch.tensor(value, dtype=scale.dtype, device=scale.device), scale)


def quantize(
    x: torch.Tensor,
    *,
    granularity: str = "channel",
    block: tuple[int, int] = FP8_DEFAULT_BLOCK,
    arith: str = "compressed_tensors",
) -> QuantizedTensor:
    check_input(x, _FMT)
    check_arith(arith, _FMT)
    if granularity not in GRANULARITIES:
        raise ValueError(f"te_ext.quantize(fmt='fp8'): granularity must be one of {GRANULARITIES}, got {granularity!r}")
    shape = x.shape
    x2 = as_rows(x)
    rows, k = x2.shape
    opts: dict = {"granularity": granularity, "arith": arith}

    if granularity == "tensor":
        amax = _amax_rows(x2.reshape(1, -1)).reshape(1) if x2.numel() else torch.zeros(1, device=x.device)
        check_finite_amax(amax, x, _FMT)
        scale = amax / E4M3_MAX
        if arith == "compressed_tensors":
            scale = _replace_zero(scale, FP32_EPS)
            mult, divide = scale, True
        else:
            scale = scale.clamp(min=FP8_MIN_SCALING_FACTOR)
            mult, divide = scale.reciprocal(), False
        row_mult = None
    elif granularity == "channel":
        amax = _amax_rows(x2)  # [rows, 1]
        check_finite_amax(amax, x, _FMT)
        if arith == "compressed_tensors":
            scale = _replace_zero(amax / E4M3_MAX, FP32_EPS)
        else:
            fp8_max = torch.tensor(E4M3_MAX, device=amax.device)
            scale = (amax / fp8_max).clamp_min(1.0 / (fp8_max * 512))
        row_mult, divide = scale, True
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
            mult_full, divide = _expand_block(scale, rows, k, bn, bk), True
        else:
            scale = amax.clamp(1e-4) / E4M3_MAX
            mult_full, divide = _expand_block(1.0 / scale, rows, k, bn, bk), False

    codes = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    for sl in row_chunks(rows, k):
        y = x2[sl].to(torch.float32, copy=True)
        if granularity == "tensor":
            m = mult
        elif granularity == "channel":
            m = row_mult[sl]
        else:
            m = mult_full[sl]
        if divide:
            y.div_(m)
        else:
            y.mul_(m)
        codes[sl] = y.clamp_(-E4M3_MAX, E4M3_MAX)
    return QuantizedTensor(
        fmt=_FMT,
        codes=codes.reshape(shape),
        scales={"weight_scale": scale},
        shape=torch.Size(shape),
        options=opts,
    )


def quantize_per_token(x: torch.Tensor) -> QuantizedTensor:
    """Dynamic per-token FP8 for activations, as vLLM's ``QuantFP8(static=False, PER_TOKEN).forward_native``:
    ``scale = max(amax_token / 448, 1/(448*512))``, ``code = e4m3(clamp(x * reciprocal(scale), +-448))``."""
    check_input(x, _FMT)
    shape = x.shape
    x2 = as_rows(x)
    rows, k = x2.shape
    amax = _amax_rows(x2)
    check_finite_amax(amax, x, _FMT)
    scale = (amax / E4M3_MAX).clamp(min=FP8_MIN_SCALING_FACTOR)
    inv = scale.reciprocal()
    codes = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    for sl in row_chunks(rows, k):
        codes[sl] = x2[sl].to(torch.float32, copy=True).mul_(inv[sl]).clamp_(-E4M3_MAX, E4M3_MAX)
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
    if gran == "token":
        scale = qt.scales["input_scale"].reshape(rows, 1)
    elif gran == "block":
        bn, bk = qt.options["block"]
        scale = _expand_block(qt.scales["weight_scale"], rows, k, bn, bk)
    else:
        scale = qt.scales["weight_scale"]
    out = torch.empty(rows, k, dtype=dtype, device=codes.device)
    for sl in row_chunks(rows, k):
        s = scale if gran == "tensor" else scale[sl]
        out[sl] = codes[sl].to(torch.float32).mul_(s)
    return out.reshape(qt.shape)

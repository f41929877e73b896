"""MXFP4 (OCP Microscaling): E2M1 elements, one power-of-two E8M0 scale per 32 inputs, no tensor scale.

Scale exponent (``scale_rounding``):

* ``"even"`` (default; what both installed references do -- compressed-tensors ``generate_mx_scales`` and
  vLLM's ``downcast_to_mxfp`` Triton kernel): first round the block amax to a power of two, rounding *up* when its
  mantissa is >= 1.75 (float32 bits + 0x200000, keep sign and exponent), then
  ``e = floor(log2(rounded)) - 2`` (2 = the exponent of E2M1's largest value, 6 = 1.5 * 2^2).
* ``"floor"``: the OCP MX v1.0 spec's rule ``e = floor(log2(amax)) - 2``. Blocks whose amax mantissa is >= 1.5
  then saturate their largest elements to 6 * 2^e; "even" avoids most of that clipping.

The stored byte is ``e + 127`` clamped to [0, 254] (255 is E8M0's NaN; an all-zero block gets 0, i.e. 2^-127).
Elements: ``y = x / 2^e`` (exact), ``code = rne_e2m1(clamp(y, +-6))``; dequant ``code * 2^e`` (exact).
``arith="vllm"`` only changes the sign of zero: vLLM's kernel copies the IEEE sign bit (-0.0 -> code 8),
compressed-tensors sets it for y < 0 only (-0.0 -> code 0). Both codes decode to zero.
"""

from __future__ import annotations

import torch

from te_ext import _e2m1
from te_ext._common import (
    E2M1_MAX,
    MXFP4_BLOCK,
    as_rows,
    block_max,
    check_arith,
    check_finite_amax,
    check_input,
    cpu_serial,
    pad_last_dim,
    parallel_tiles,
    require_multiple,
    stochastic_base_seed,
    tile_generator,
    tiles,
)
from te_ext.qtensor import QuantizedTensor

_FMT = "mxfp4"
SCALE_ROUNDINGS = ("even", "floor")


def scale_exponent_bytes(amax_b: torch.Tensor, scale_rounding: str = "even") -> torch.Tensor:
    """float32 block amax -> uint8 biased E8M0 exponents."""
    bits = amax_b.contiguous().view(torch.int32)
    if scale_rounding == "even":
        bits = (bits + 0x200000) & 0x7F800000
    elif scale_rounding == "floor":
        bits = bits & 0x7F800000
    else:
        raise ValueError(f"scale_rounding must be one of {SCALE_ROUNDINGS}, got {scale_rounding!r}")
    biased = (bits >> 23) - 2  # exponent field of the (rounded) amax, minus E2M1's emax
    return biased.clamp_(0, 254).to(torch.uint8)


def scale_from_bytes(e8m0: torch.Tensor) -> torch.Tensor:
    """uint8 biased exponents -> float32 powers of two 2^(e - 127) (byte 0 -> 2^-127, a float32 subnormal)."""
    e = e8m0.to(torch.int32)
    normal = (e << 23).view(torch.float32)  # exact 2^(e-127) for e >= 1
    return torch.where(e == 0, torch.tensor(2.0**-127, dtype=torch.float32, device=e.device), normal)


@cpu_serial
def quantize(
    x: torch.Tensor,
    *,
    scale_rounding: str = "even",
    stochastic_rounding: bool = False,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    pad: bool = False,
    arith: str = "compressed_tensors",
) -> QuantizedTensor:
    check_input(x, _FMT)
    check_arith(arith, _FMT)
    if scale_rounding not in SCALE_ROUNDINGS:
        raise ValueError(f"te_ext.quantize(fmt='mxfp4'): scale_rounding must be one of {SCALE_ROUNDINGS}")
    shape = x.shape
    k = shape[-1]
    if not pad:
        require_multiple(
            k,
            MXFP4_BLOCK,
            _FMT,
            "MXFP4 has one E8M0 scale per 32 inputs; vLLM allocates weight_packed [N, K/2] and weight_scale [N, K/32].",
        )
    x2 = pad_last_dim(as_rows(x), MXFP4_BLOCK)
    rows, kp = x2.shape
    groups = kp // MXFP4_BLOCK
    # one pass: the 32-blocks never straddle tiles, so each tile computes its own scales from its float32 copy
    amax_b = torch.empty(rows, groups, dtype=torch.float32, device=x.device)
    e8 = torch.empty(rows, groups, dtype=torch.uint8, device=x.device)
    sr_base = stochastic_base_seed(seed, generator) if stochastic_rounding else 0
    packed = torch.empty(rows, kp // 2, dtype=torch.uint8, device=x.device)

    def work(i: int, t: tuple[slice, slice]) -> None:
        rs, cs = t
        r, c = rs.stop - rs.start, cs.stop - cs.start
        g0, gc = cs.start // MXFP4_BLOCK, c // MXFP4_BLOCK
        y = x2[rs, cs].to(torch.float32, copy=True)
        am = block_max(y.abs(), MXFP4_BLOCK)
        amax_b[rs, g0 : g0 + gc] = am
        eb = scale_exponent_bytes(am, scale_rounding)
        e8[rs, g0 : g0 + gc] = eb
        y.view(r, gc, MXFP4_BLOCK).div_(scale_from_bytes(eb).unsqueeze(-1)).clamp_(-E2M1_MAX, E2M1_MAX)
        gen = tile_generator(sr_base, i, x.device) if stochastic_rounding else None
        codes = _e2m1.encode(y, sign_from_signbit=(arith == "vllm"), stochastic=stochastic_rounding, generator=gen)
        packed[rs, cs.start // 2 : cs.stop // 2] = _e2m1.pack(codes)

    parallel_tiles(work, tiles(rows, kp, MXFP4_BLOCK, device=x.device, fixed=stochastic_rounding), x.device)
    check_finite_amax(amax_b, x, _FMT)
    lead = tuple(shape[:-1])
    return QuantizedTensor(
        fmt=_FMT,
        codes=packed.reshape(*lead, kp // 2),
        scales={"weight_scale": e8.reshape(*lead, groups)},
        shape=torch.Size(shape),
        options={
            "arith": arith,
            "scale_rounding": scale_rounding,
            "stochastic_rounding": stochastic_rounding,
            "seed": seed,
            "padded_k": kp,
        },
    )


@cpu_serial
def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    codes = qt.codes.reshape(-1, qt.codes.shape[-1])
    rows, kp = codes.shape[0], codes.shape[1] * 2
    groups = kp // MXFP4_BLOCK
    scale = scale_from_bytes(qt.scales["weight_scale"].reshape(rows, groups))
    out = _e2m1.decode_blocks(codes, scale, MXFP4_BLOCK, dtype)
    k = qt.shape[-1]
    if kp != k:
        out = out[:, :k]
    return out.reshape(qt.shape)

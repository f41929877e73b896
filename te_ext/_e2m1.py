"""FP4 E2M1 element encoding shared by NVFP4 and MXFP4.

A 4-bit code is ``sign << 3 | magnitude`` where magnitude 0..7 stands for 0, 0.5, 1, 1.5, 2, 3, 4, 6 (the index
into that table, as compressed-tensors' ``pack_fp4_to_uint8`` and vLLM's ``break_fp4_bytes`` use). Two codes go
into one byte: element ``2i`` in the low nibble, element ``2i+1`` in the high nibble.

Round-to-nearest-even without a lookup: the magnitude grid is uniform inside each binade (step 0.5 on [0, 2],
1 on [2, 4], 2 on [4, 6]), so with ``a = |y|`` (already clamped to 6)

    code = min(round(2a), round(a) + 2, round(a / 2) + 4)

Each term is the nearest grid index for one binade (``a*2``, ``a/2`` are exact in binary floating point and
``torch.round`` rounds half to even). The three lines cross exactly at the binade edges 2 and 4, the correct index
is the smallest of them, and since rounding is monotone, ``round(min(f, g, h)) == min(round f, round g, round h)``.
An exact tie (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5) lands on an index x.5 and goes to the even index, i.e. the
value with mantissa bit 0 -- exactly E2M1 round-to-nearest-even (the thresholds compressed-tensors' and vLLM's
``cast_to_fp4`` hard-code). ``floor`` in place of ``round`` gives the lower neighbour for stochastic rounding.
"""

from __future__ import annotations

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _mag_index(a: torch.Tensor, op: str) -> torch.Tensor:
    """Grid index (float, 0..7) of a >= 0 with ``op`` in ('round', 'floor'); a is consumed as scratch."""
    t1 = a * 2.0
    t2 = a.mul(0.5)
    getattr(t1, op + "_")()
    getattr(t2, op + "_")().add_(4.0)
    getattr(a, op + "_")().add_(2.0)
    torch.minimum(t1, a, out=t1)
    torch.minimum(t1, t2, out=t1)
    return t1


def _index_to_value(idx: torch.Tensor) -> torch.Tensor:
    """Inverse of the grid index for 0..7 (float): max(0.5 c, c - 2, 2 c - 8)."""
    v = idx * 0.5
    torch.maximum(v, idx - 2.0, out=v)
    torch.maximum(v, idx * 2.0 - 8.0, out=v)
    return v


def encode(
    y: torch.Tensor,
    *,
    sign_from_signbit: bool = False,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """float32 values already scaled and clamped to [-6, 6] -> int32 codes (one per element, 0..15).

    The sign bit is set for ``y < 0`` (what compressed-tensors stores: ``torch.sign(-0.0)`` is +0, so -0.0 gets
    code 0 while a small negative value that rounds to zero gets code 8, "-0"). With ``sign_from_signbit`` the IEEE
    sign bit is copied instead (vLLM's Triton MXFP4 quantizer: -0.0 -> code 8).

    With ``stochastic=True`` (random numbers from ``generator``, or torch's default generator): stochastic rounding
    -- round up to the next grid value with probability (a - lo) / (hi - lo); exact grid values never move.

    (Implementation note: comparisons producing bool and float -> uint8 casts are not vectorized on CPU, so the
    sign comes from the float's bit pattern -- ``y + 0.0`` turns -0.0 into +0.0 -- and the cast goes via int32.)
    """
    sbits = y if sign_from_signbit else y + 0.0
    sign = (sbits.view(torch.int32) >> 28).bitwise_and_(8)
    a = y.abs()
    if not stochastic:
        idx = _mag_index(a, "round")
    else:
        lo_idx = _mag_index(a.clone(), "floor")
        lo = _index_to_value(lo_idx)
        hi = _index_to_value((lo_idx + 1.0).clamp_(max=7.0))
        step = hi - lo
        frac = (a - lo).div_(step.clamp_(min=0.5))  # step is 0 only at the top code (a == 6): frac is then 0
        r = torch.rand(a.shape, generator=generator, dtype=torch.float32, device=a.device)
        idx = lo_idx.add_((r < frac).float())
    return idx.to(torch.int32).bitwise_or_(sign)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """int32 (or any integer) codes ``[..., K]`` (K even) -> packed uint8 ``[..., K/2]``: low nibble = even element."""
    k = codes.shape[-1]
    v = codes.to(torch.int32).contiguous().view(torch.int64)  # little-endian: element 2i is the low word
    p = (v & 0x0F).bitwise_or_((v >> 28).bitwise_and_(0xF0))
    return p.to(torch.uint8).reshape(*codes.shape[:-1], k // 2)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """packed bytes ``[..., K/2]`` -> int32 codes ``[..., K]``."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(torch.int32)


def _pair_table() -> torch.Tensor:
    vals = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    signed = torch.cat([vals, -vals])  # code 0..15
    b = torch.arange(256)
    return torch.stack((signed[b & 0x0F], signed[b >> 4]), dim=-1)  # [256, 2]


_PAIR_TABLE = _pair_table()


def decode(packed: torch.Tensor) -> torch.Tensor:
    """packed bytes ``[..., K/2]`` -> float32 values ``[..., K]`` (a single gather from a 256 x 2 table)."""
    table = _PAIR_TABLE if _PAIR_TABLE.device == packed.device else _PAIR_TABLE.to(packed.device)
    flat = packed.reshape(-1).to(torch.int32)
    out = table.index_select(0, flat)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def decode_blocks(packed: torch.Tensor, multipliers: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Block-scaled FP4 decode: packed ``[R, K/2]`` and per-block multipliers ``[R, K/block]`` -> ``[R, K]``.

    Each block's values are decoded and multiplied by its multiplier (NVFP4: e4m3 scale / global scale; MXFP4: the
    power-of-two scale), tile by tile on the worker threads.
    """
    from te_ext._common import parallel_tiles, tiles

    rows, k = packed.shape[0], packed.shape[1] * 2
    mult = multipliers.reshape(rows, k // block, 1)
    out = torch.empty(rows, k, dtype=dtype, device=packed.device)

    def work(_: int, t: tuple[slice, slice]) -> None:
        rs, cs = t
        r, c = rs.stop - rs.start, cs.stop - cs.start
        g0 = cs.start // block
        vals = decode(packed[rs, cs.start // 2 : cs.stop // 2]).view(r, c // block, block)
        out[rs, cs] = vals.mul_(mult[rs, g0 : g0 + c // block]).view(r, c)

    parallel_tiles(work, tiles(rows, k, block, device=packed.device), packed.device)
    return out

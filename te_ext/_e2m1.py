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


# ------------------------------------------------------------------------------ table-driven round-to-nearest-even
# The fast path of NVFP4 quantize: ``encode`` above costs ~15 elementwise passes over float32 (plus 5 for ``pack``);
# this one costs 5 integer passes, one 4 KiB table gather and one pass over int16 pairs (measured with one thread
# on 2^18-element tiles on the shared 2-core Xeon (AVX-512): 1.4 vs 9.8 ns per element, clamp and pack included).
#
# Why a 12-bit key is exact: every E2M1 decision point -- the ties 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, the clamp
# at 6 (everything >= 5 already encodes to 6) and the sign at 0 -- is a float32 with at most 2 mantissa bits. Round
# each value *to odd* at 3 mantissa bits (truncate, then set the 3rd mantissa bit if any dropped bit was set): a
# value on that grid stays put, any other lands on the odd grid point of the open interval between two 2-bit
# grid points that holds it. No decision point lies inside such an interval, so the rounded value encodes exactly
# like the original one. Its top 12 bits (sign, 8 exponent bits, 3 mantissa bits) index a table built by running
# ``encode`` on each representative; exactly -0.0 keeps its own key (0x800 -> code 0, as ``encode``), and the
# table covers |y| > 6 and inf (clamped to 6 first), so callers need not clamp. Checked against ``encode`` on all
# 2^32 float32 bit patterns (NaN excluded) when written; tests/test_te_ext.py checks the edges of every key.
_KEY_DROP = 20  # float32 bits below the 3rd mantissa bit
_STICKY = (1 << _KEY_DROP) - 1
_KEY_MASK = (1 << (32 - _KEY_DROP)) - 1


def table_keys(bits: torch.Tensor) -> torch.Tensor:
    """int32 float bit patterns -> int32 table keys 0..4095 (round to odd at 3 mantissa bits, then the top 12 bits)."""
    k = bits & _STICKY
    k += _STICKY  # bit 20 is set iff one of bits 0..19 is (the sum is at most 2^21 - 2)
    k |= bits  # ... and ORed into the kept 3rd mantissa bit
    k >>= _KEY_DROP  # arithmetic shift: negative values sign-extend, which the mask removes
    k &= _KEY_MASK
    return k


def _rne_table() -> torch.Tensor:
    """uint8 ``[4096]``: the E2M1 code (sign included) of each key's representative value, clamped to +-6."""
    bits = torch.arange(_KEY_MASK + 1, dtype=torch.int64) << _KEY_DROP
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)  # as int32 two's complement
    rep = torch.nan_to_num(bits.view(torch.float32), nan=0.0)  # NaN keys are unreachable (NaN inputs raise)
    top = E2M1_VALUES[-1]
    return encode(rep.clamp(-top, top)).to(torch.uint8)


_RNE_TABLE = _rne_table()
_RNE_TABLES: dict[torch.device, torch.Tensor] = {}


def encode_packed(y: torch.Tensor) -> torch.Tensor:
    """float32 ``[..., K]`` (K even; need not be clamped) -> packed uint8 ``[..., K/2]``, bit for bit
    ``pack(encode(y.clamp(-6, 6)))`` (round to nearest even, sign bit iff y < 0) via the table above."""
    k = y.shape[-1]
    table = _RNE_TABLE
    if y.device != table.device:
        table = _RNE_TABLES.setdefault(y.device, _RNE_TABLE.to(y.device))
    keys = table_keys(y.contiguous().view(torch.int32))
    codes = table.index_select(0, keys.reshape(-1))  # one uint8 code per element
    v = codes.view(torch.int16)  # little-endian: element 2i is the low byte, 2i+1 the high byte
    # low byte | high byte >> 4 gives the packed nibbles in the low byte; int16 -> uint8 keeps the low byte
    return torch.bitwise_or(v, v >> 4).to(torch.uint8).reshape(*y.shape[:-1], k // 2)


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

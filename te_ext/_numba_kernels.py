"""numba kernels behind ``te_ext._cpu_kernels`` (imported only from there, lazily: importing this module imports numba
and compiles -- or loads from numba's on-disk cache -- every signature). Module-level functions, because numba
caches neither closures nor functions defined at run time. See ``_cpu_kernels`` for why they are bit-exact.
"""

# mypy: ignore-errors
from __future__ import annotations

import numba
import numpy as np

ABS_MASK = np.uint32(0x7FFFFFFF)
CHUNK = 2048  # elements of a row converted at a time (8 KiB of float32 scratch: stays in L1)
# error_model="numpy": IEEE division without numba's ZeroDivisionError check (which also keeps LLVM from
# vectorizing it); no fastmath, so float32 / float32 stays one correctly rounded float32 division
_OPTS = {"nogil": True, "cache": True, "boundscheck": False, "error_model": "numpy"}
_RNG = "int64, int64, int64, int64"


@numba.njit([f"void({t}[:, ::1], uint32[:, ::1], int64, {_RNG})" for t in ("uint16", "uint32")], **_OPTS)
def block_absmax(xb, out, sh, r0, r1, c0, c1):
    """``out[r, b]`` = the float32 bit pattern of max |x| over 16-block b of row r, rows r0..r1, columns c0..c1.

    ``xb`` holds the input's bits (bf16 as uint16 with ``sh=16``, float32 as uint32 with ``sh=0``). An integer max
    of the sign-cleared float32 bits is the float max, and NaN patterns are above +inf, so NaN propagates as in
    ``_common.block_absmax``."""
    for i in range(r0, r1):
        row = xb[i]
        orow = out[i]
        for b in range(c0 // 16, c1 // 16):
            m = np.uint32(0)
            for j in range(b * 16, b * 16 + 16):
                m = max(m, (np.uint32(row[j]) << sh) & ABS_MASK)
            orow[b] = m


@numba.njit(
    [f"void({t}[:, ::1], float32[:, ::1], uint8[:, ::1], int64, boolean, {_RNG})" for t in ("uint16", "uint32")],
    **_OPTS,
)
def encode(xb, mult, out, sh, divide, r0, r1, c0, c1):
    """``out[r, c/2]`` = packed E2M1 codes of ``x / mult`` (``divide``) or ``x * mult`` (one float32 multiplier per
    16-block), rows r0..r1 and columns c0..c1 (multiples of 16), rounded to nearest even as ``_e2m1.encode`` does."""
    # Separate scratch for the bits and the quotients: a float view aliasing the integer scratch keeps LLVM from
    # vectorizing the division (measured 2x slower). The block multiplier is first spread to one per element: a flat x / m loop vectorizes, a 16-element inner
    # loop per block does not (measured 40 -> 23 ms for the widen + divide of a 4096x11008 bf16 tensor, 1 thread).
    u = np.empty(CHUNK, np.uint32)
    q = np.empty(CHUNK, np.float32)
    mm = np.empty(CHUNK, np.float32)
    c = np.empty(CHUNK, np.uint8)
    qi = q.view(np.uint32)
    for i in range(r0, r1):
        for a in range(c0, c1, CHUNK):
            n = min(CHUNK, c1 - a)
            row = xb[i, a : a + n]
            for j in range(n):
                u[j] = np.uint32(row[j]) << sh
            x = u.view(np.float32)
            mrow = mult[i, a // 16 : (a + n) // 16]
            for j in range(n):
                mm[j] = mrow[j >> 4]
            if divide:
                for j in range(n):
                    q[j] = x[j] / mm[j]
            else:
                for j in range(n):
                    q[j] = x[j] * mm[j]
            # E2M1 round-to-nearest-even by counting the thresholds |q| passes (ties to the even code: > at
            # 0.25, 1.25, 2.5, 5; >= at 0.75, 1.75, 3.5), as _e2m1.encode's min-of-rounds does; the sign where
            # q < 0 (so -0.0 -> 0, a negative that rounds to zero -> 8). Compares vectorize where the
            # 4096-entry table gather of _e2m1.table_keys did not (2.8x on this stage, same codes).
            for j in range(n):
                bits = qi[j]
                av = abs(q[j])
                code = (
                    np.uint8(av > np.float32(0.25))
                    + np.uint8(av >= np.float32(0.75))
                    + np.uint8(av > np.float32(1.25))
                    + np.uint8(av >= np.float32(1.75))
                    + np.uint8(av > np.float32(2.5))
                    + np.uint8(av >= np.float32(3.5))
                    + np.uint8(av > np.float32(5.0))
                )
                c[j] = code | (np.uint8((bits >> np.uint32(31)) & np.uint32((bits & ABS_MASK) != 0)) << np.uint8(3))
            orow = out[i, a // 2 : (a + n) // 2]
            for j in range(n // 2):
                orow[j] = c[2 * j] | (c[2 * j + 1] << np.uint8(4))


@numba.njit("uint8(float32, uint32)", **_OPTS)
def e4m3_byte(s, bits):
    """float8_e4m3fn bits of ``s`` (``bits``: its float32 bit pattern; finite, 0 <= s <= 448), rounded to nearest
    even exactly as torch's conversion does (checked on every float32 in [0, 448] when written)."""
    if s < np.float32(2.0**-6):  # subnormal: multiples of 2^-9 (8 * 2^-9 rounds up to the smallest normal, byte 8)
        return np.uint8(np.rint(s * np.float32(512.0)))
    r = (bits + np.uint32(0x7FFFF) + ((bits >> 20) & np.uint32(1))) >> 20  # exponent and 3 mantissa bits, RNE
    return np.uint8((((r >> 3) - np.uint32(120)) << 3) | (r & np.uint32(7)))  # rebias 127 -> 7


@numba.njit(
    "void(float32[:, ::1], float32, float32, boolean, float32[::1], uint8[:, ::1], float32[:, ::1], "
    "int64, int64, int64, int64)",
    **_OPTS,
)
def nvfp4_scales(amax, gs, inv_gs, divide, e4m3, s8, mult, r0, r1, g0, g1):
    """NVFP4 block scales (e4m3 bits into ``s8``) and multipliers for rows r0..r1, blocks g0..g1, exactly as
    ``nvfp4.quantize``'s torch ``block_scales`` computes them (``e4m3`` is the 256-value decode table)."""
    n = g1 - g0
    sb = np.empty(n, np.float32)
    sbits = sb.view(np.uint32)
    six = np.float32(6.0)
    sixth = np.float32(1.0 / 6.0)
    top = np.float32(448.0)
    for i in range(r0, r1):
        arow = amax[i, g0:g1]
        srow = s8[i, g0:g1]
        mrow = mult[i, g0:g1]
        if divide:  # compressed-tensors: s = gs * (a / 6), a zero scale -> 0.125, y = x / (s / gs)
            for b in range(n):
                sb[b] = min(gs * (arow[b] / six), top)
        else:  # vLLM: s = gs * (a * (1/6))
            for b in range(n):
                sb[b] = min(gs * (arow[b] * sixth), top)
        for b in range(n):
            byte = e4m3_byte(sb[b], sbits[b])
            if divide:
                if byte == 0:
                    byte = np.uint8(0x20)  # E4M3_ZERO_SCALE_EPS = 0.125
                mrow[b] = e4m3[byte] / gs
            else:  # y = x * 1 / (s * (1 / gs)), 1e8 in place of a zero denominator (vLLM's get_reciprocal)
                t = e4m3[byte] * inv_gs
                if t == 0:
                    t = np.float32(1e8)
                mrow[b] = np.float32(1.0) / t
            srow[b] = byte

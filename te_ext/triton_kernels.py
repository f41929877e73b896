"""Triton GPU kernels for NVFP4 / FP8 quantization and an NVFP4 W4A16 matmul.

UNTESTED ON A GPU: the machine these were written on has no GPU. They are exercised only in Triton's interpreter
(``TRITON_INTERPRET=1``, numpy on CPU) by tests/test_te_ext_triton.py, against te_ext's torch path. Nothing in te_ext
calls them implicitly: use them explicitly on CUDA tensors, and keep the torch path (which also runs on CUDA) as
the reference. Triton is imported when this module is imported (lazily: ``te_ext.triton_kernels``).

* ``nvfp4_quantize(x, global_scale)``: compressed-tensors arithmetic (see te_ext.nvfp4), returns packed codes and
  E4M3 block scales. ``x`` 2-D, K a multiple of 16.
* ``fp8_quantize(x, scale)``: ``e4m3(clamp(x / scale, +-448))`` with a per-tensor (``[1]``) or per-row
  (``[rows, 1]``) float32 scale.
* ``nvfp4_w4a16_matmul(x, packed, weight_scale, global_scale)``: ``x @ dequant(W)^T`` with W dequantized on the
  fly tile by tile (``code * (weight_scale * (1/global_scale))``, vLLM's order); x bf16/fp16, fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _e2m1_index(a):
    # a >= 0, already clamped to 6: round-to-nearest-even index into {0,.5,1,1.5,2,3,4,6} by exact comparisons.
    idx = (a > 0.25).to(tl.int32)
    idx += (a >= 0.75).to(tl.int32)
    idx += (a > 1.25).to(tl.int32)
    idx += (a >= 1.75).to(tl.int32)
    idx += (a > 2.5).to(tl.int32)
    idx += (a >= 3.5).to(tl.int32)
    idx += (a > 5.0).to(tl.int32)
    return idx


@triton.jit
def _nvfp4_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    gs_ptr,
    rows,
    K: tl.constexpr,
    BLOCKS_PER_PROG: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    blk0 = tl.program_id(1) * BLOCKS_PER_PROG
    gs = tl.load(gs_ptr).to(tl.float32)
    b = blk0 + tl.arange(0, BLOCKS_PER_PROG)  # block index within the row
    bmask = b < K // 16
    e = tl.arange(0, 16)
    offs = row * K + b[:, None] * 16 + e[None, :]
    x = tl.load(x_ptr + offs, mask=bmask[:, None], other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    s = gs * (amax / 6.0)
    s = tl.minimum(tl.maximum(s, -448.0), 448.0)
    s8 = s.to(tl.float8e4nv)
    sf = s8.to(tl.float32)
    sf = tl.where(sf == 0.0, 0.125, sf)
    s8 = sf.to(tl.float8e4nv)
    y = x / (sf / gs)[:, None]
    y = tl.minimum(tl.maximum(y, -6.0), 6.0)
    code = _e2m1_index(tl.abs(y)) + tl.where(y < 0.0, 8, 0)
    pairs = tl.reshape(code, [BLOCKS_PER_PROG, 8, 2])
    lo, hi = tl.split(pairs)
    packed = (lo | (hi << 4)).to(tl.uint8)
    poffs = row * (K // 2) + b[:, None] * 8 + tl.arange(0, 8)[None, :]
    tl.store(q_ptr + poffs, packed, mask=bmask[:, None])
    tl.store(s_ptr + row * (K // 16) + b, s8.to(tl.uint8, bitcast=True), mask=bmask)


def nvfp4_quantize(x: torch.Tensor, global_scale: torch.Tensor, blocks_per_prog: int = 16):
    """Packed uint8 codes ``[rows, K/2]`` and float8_e4m3fn scales ``[rows, K/16]`` (global scale given)."""
    assert x.ndim == 2 and x.shape[1] % 16 == 0, "x must be 2-D with K a multiple of 16"
    x = x.contiguous()
    rows, k = x.shape
    q = torch.empty(rows, k // 2, dtype=torch.uint8, device=x.device)
    s = torch.empty(rows, k // 16, dtype=torch.uint8, device=x.device)
    gs = global_scale.to(torch.float32).reshape(1).contiguous()
    grid = (rows, triton.cdiv(k // 16, blocks_per_prog))
    _nvfp4_quant_kernel[grid](x, q, s, gs, rows, K=k, BLOCKS_PER_PROG=blocks_per_prog)
    return q, s.view(torch.float8_e4m3fn)


@triton.jit
def _fp8_quant_kernel(x_ptr, q_ptr, scale_ptr, K, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < K
    if PER_ROW:
        scale = tl.load(scale_ptr + row)
    else:
        scale = tl.load(scale_ptr)
    x = tl.load(x_ptr + row * K + col, mask=mask, other=0.0).to(tl.float32)
    y = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
    tl.store(q_ptr + row * K + col, y.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=mask)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """float8_e4m3fn codes of ``x`` (2-D) for a float32 scale of shape ``[1]`` or ``[rows, 1]``."""
    assert x.ndim == 2
    x = x.contiguous()
    rows, k = x.shape
    per_row = scale.numel() != 1
    q = torch.empty(rows, k, dtype=torch.uint8, device=x.device)
    grid = (rows, triton.cdiv(k, block))
    _fp8_quant_kernel[grid](x, q, scale.to(torch.float32).contiguous(), k, PER_ROW=per_row, BLOCK=block)
    return q.view(torch.float8_e4m3fn)


@triton.jit
def _e2m1_value(code):
    mag = code & 7
    v = tl.where(mag < 5, mag.to(tl.float32) * 0.5, 0.0)
    v = tl.where(mag == 5, 3.0, v)
    v = tl.where(mag == 6, 4.0, v)
    v = tl.where(mag == 7, 6.0, v)
    return tl.where((code & 8) != 0, -v, v)


@triton.jit
def _w4a16_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    inv_gs,
    out_ptr,
    M,
    N,
    K,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0).to(
            tl.float32
        )
        rkp = k0 // 2 + tl.arange(0, BK // 2)
        p = tl.load(w_ptr + rn[:, None] * (K // 2) + rkp[None, :], mask=rn[:, None] < N, other=0).to(tl.int32)
        w = tl.interleave(_e2m1_value(p & 15), _e2m1_value(p >> 4))  # [BN, BK]
        rks = k0 // 16 + tl.arange(0, BK // 16)
        sraw = tl.load(s_ptr + rn[:, None] * (K // 16) + rks[None, :], mask=rn[:, None] < N, other=0)
        sc = sraw.to(tl.float8e4nv, bitcast=True).to(tl.float32) * inv_gs  # [BN, BK/16]
        w = tl.reshape(tl.reshape(w, [BN, BK // 16, 16]) * sc[:, :, None], [BN, BK])
        acc += tl.dot(x, tl.trans(w))
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def nvfp4_w4a16_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    global_scale: torch.Tensor,
    *,
    bm: int = 32,
    bn: int = 32,
    bk: int = 64,
) -> torch.Tensor:
    """``x [M, K] @ dequant(W [N, K])^T -> [M, N]`` (float32 accumulate, output in x.dtype). K % bk == 0."""
    assert x.ndim == 2 and packed.ndim == 2
    m, k = x.shape
    n = packed.shape[0]
    assert packed.shape[1] * 2 == k and k % bk == 0 and bk % 16 == 0
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    inv_gs = float(global_scale.float().reshape(()).reciprocal())
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _w4a16_kernel[grid](
        x.contiguous(),
        packed.contiguous(),
        weight_scale.contiguous().view(torch.uint8),
        inv_gs,
        out,
        m,
        n,
        k,
        BM=bm,
        BN=bn,
        BK=bk,
    )
    return out.to(x.dtype)

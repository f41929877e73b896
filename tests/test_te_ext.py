"""te_ext against the reference implementations installed with vLLM, bit for bit.

References (never copies of te_ext code):
* compressed-tensors: ``generate_gparam``, ``compute_dynamic_scales_and_zp`` / ``calculate_qparams``,
  ``quantize`` / ``dequantize`` and the compressors ``NVFP4PackedCompressor`` (nvfp4-pack-quantized),
  ``MXFP4PackedCompressor`` and ``NaiveQuantizationCompressor`` with the preset schemes vLLM loads
  (NVFP4, MXFP4, FP8, FP8_DYNAMIC, FP8_BLOCK, INT8).
* vLLM: ``ref_nvfp4_quant`` / ``dequantize_to_dtype`` (NVFP4 emulation), ``QuantFP8.forward_native``
  (per-tensor and per-token FP8), the online FP8 per-channel quantizer, ``per_block_cast_to_fp8``.
  vLLM's Triton MXFP4 quantizer is checked in tests/test_te_ext_triton.py (Triton interpreter).

compressed-tensors' ``cast_to_fp4`` is wrapped in ``torch.compile``; the tests run it eagerly
(``torch.compiler.set_stance("force_eager")``, same Python code) except ``test_nvfp4_matches_compiled_reference``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import types

import pytest
import torch

import te_ext
from te_ext import emulation, recipes

pytestmark = pytest.mark.unit

HAVE_CT = importlib.util.find_spec("compressed_tensors") is not None
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_ct = pytest.mark.skipif(not HAVE_CT, reason="the compressed-tensors reference (installed with vLLM) is missing")
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM (whose quantizers are the reference) is missing")

if HAVE_CT:
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils import (
        calculate_qparams,
        compute_dynamic_scales_and_zp,
        generate_gparam,
        maybe_pad_tensor_for_block_quant,
    )
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def eager():
    return torch.compiler.set_stance("force_eager")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of float8 tensors (so NaN / -0 compare bit-exactly)."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    a, b = bits(a), bits(b)
    if a.is_floating_point():
        a, b = (
            a.contiguous().view(torch.int32 if a.dtype == torch.float32 else torch.int16),
            b.contiguous().view(torch.int32 if b.dtype == torch.float32 else torch.int16),
        )
    diff = (a != b).sum().item()
    assert diff == 0, f"{what}: {diff} of {a.numel()} elements differ"


def weight(shape, dtype, seed=0, *, zero_block=True, spread=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    if spread:  # rows (and blocks) of very different magnitude
        w = w * torch.exp(torch.randn(*shape[:-1], 1, generator=g) * 2)
    if zero_block and shape[-1] >= 32:
        w.reshape(-1, shape[-1])[0, :32] = 0
    return w.to(dtype)


# ------------------------------------------------------------------------------------------------ references
def _scheme(name):
    return preset_name_to_scheme(name, ["Linear"])


def ct_nvfp4(w: torch.Tensor, global_amax: torch.Tensor | None = None):
    """compressed-tensors NVFP4: gparam + dynamic group qparams + NVFP4PackedCompressor.compress."""
    scheme = _scheme("NVFP4")
    wf = w.float()
    if global_amax is None:
        lo, hi = torch.aminmax(wf)
    else:
        lo, hi = -global_amax.reshape(()), global_amax.reshape(())
    gs = generate_gparam(lo.reshape(1), hi.reshape(1))
    with eager():
        scale, zp = compute_dynamic_scales_and_zp(value=wf, args=scheme.weights, module=None, global_scale=gs)
        out = NVFP4PackedCompressor.compress(
            {"weight": w, "weight_scale": scale, "weight_global_scale": gs, "weight_zero_point": zp}, scheme
        )
    return out


def ct_nvfp4_decompress(state: dict) -> torch.Tensor:
    return NVFP4PackedCompressor.decompress(dict(state), _scheme("NVFP4"))["weight"]


def vllm_nvfp4(w: torch.Tensor, gs: torch.Tensor):
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import ref_nvfp4_quant

    q, s = ref_nvfp4_quant(w, gs, 16)
    with eager():
        packed = pack_fp4_to_uint8(q)
    return packed, s.to(torch.float8_e4m3fn)


def vllm_nvfp4_dequant(packed, scale, gs, dtype):
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype

    inv = 1.0 / gs.max().to(torch.float32)  # CompressedTensorsW4A4Fp4.process_weights_after_loading
    return dequantize_to_dtype(packed, scale, inv, dtype, 16, swizzle=False)


def ct_mxfp4(w: torch.Tensor):
    scheme = _scheme("MXFP4")
    with eager():
        scale, zp = compute_dynamic_scales_and_zp(value=w.float(), args=scheme.weights, module=None)
        return MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)


def ct_naive(w: torch.Tensor, preset: str):
    """FP8 / INT8 weights: observer min/max (float32) + calculate_qparams + NaiveQuantizationCompressor."""
    scheme = _scheme(preset)
    args = scheme.weights
    wf = w.float()
    if args.strategy == "tensor":
        lo, hi = torch.aminmax(wf)
    elif args.strategy == "channel":
        lo, hi = wf.amin(dim=-1, keepdim=True), wf.amax(dim=-1, keepdim=True)
    else:  # block
        bh, bw = args.block_structure
        wp = maybe_pad_tensor_for_block_quant(wf, (bh, bw))
        tiles = wp.reshape(wp.shape[0] // bh, bh, wp.shape[1] // bw, bw)
        lo, hi = tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))
    scale, zp = calculate_qparams(lo, hi, args)
    out = NaiveQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
    return out, scheme


# ------------------------------------------------------------------------------------------------ E2M1 rounding
@needs_ct
def test_e2m1_rounding_matches_cast_to_fp4_on_every_threshold():
    ties = torch.tensor([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    offs = torch.arange(-4, 5, dtype=torch.int32)
    around = (ties.view(torch.int32)[:, None] + offs[None, :]).view(torch.float32).flatten()
    dense = torch.linspace(0, 6, 20001)
    a = torch.cat([around, dense, torch.tensor([0.0, 1e-38, 1e-45])]).clamp(0, 6)
    y = torch.cat([a, -a])
    y = y[: y.numel() // 2 * 2].reshape(1, -1)
    with eager():
        ref_vals = FP4_E2M1_DATA.cast_to_fp4(y.clone())
        ref = pack_fp4_to_uint8(ref_vals)
    from te_ext import _e2m1

    ours = _e2m1.pack(_e2m1.encode(y))
    assert_bits_equal(ours, ref, "E2M1 codes")
    assert torch.equal(_e2m1.decode(ours), ref_vals)
    assert torch.equal(_e2m1.unpack(ours), _e2m1.encode(y))


@pytest.mark.unit
def test_e2m1_table_encode_matches_encode_at_every_key_edge():
    """The table-driven encode (NVFP4's fast path) against ``encode`` at the edges of each of its 4096 keys (the
    key's own value, its float32 neighbours, the midpoint and the last value of the key) and on random bit
    patterns; an exhaustive run over all 2^32 float32 patterns agreed when the table was written."""
    from te_ext import _e2m1

    keys = torch.arange(4096, dtype=torch.int64) << 20
    offs = torch.tensor([-2, -1, 0, 1, 2, 1 << 19, (1 << 20) - 2, (1 << 20) - 1])
    pats = (keys[:, None] + offs[None, :]).flatten() % 2**32
    rand = torch.randint(0, 2**32, (1 << 20,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    pats = torch.cat([pats, rand])
    y = torch.where(pats >= 2**31, pats - 2**32, pats).to(torch.int32).view(torch.float32)
    y = y[~torch.isnan(y)]  # NaN inputs raise before they get here
    y = y[: y.numel() // 2 * 2].reshape(-1, 2)
    want = _e2m1.pack(_e2m1.encode(y.clamp(-6.0, 6.0)))
    assert_bits_equal(_e2m1.encode_packed(y), want, "table-driven E2M1 codes")


def _e2m1_nearest_even(y: torch.Tensor) -> torch.Tensor:
    """Straightforward E2M1: the nearest of the 8 magnitudes by float64 distance (exact for |y| >= 2^-20; smaller
    values are nowhere near a tie), an exact tie going to the even index; sign bit iff y < 0. int64 codes."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    dist = (y.double().abs().unsqueeze(-1) - grid).abs()
    nearest = dist == dist.amin(dim=-1, keepdim=True)
    prefer_even = nearest.double() * torch.tensor([2.0, 1.0] * 4, dtype=torch.float64)
    return prefer_even.argmax(dim=-1) + 8 * (y < 0).long()


def _straightforward_nvfp4(w: torch.Tensor, arith: str, global_amax=None, global_scale=None, block_2d=False):
    """NVFP4 written from the formulas in te_ext/nvfp4.py's docstring, one whole-tensor op at a time (no tiles, no
    tables, no integer tricks): (packed codes, e4m3 block scales, global scale)."""
    x = w.float().reshape(-1, w.shape[-1])
    rows, k = x.shape
    amax_b = x.abs().reshape(rows, k // 16, 16).amax(dim=-1)
    if block_2d:
        r16 = -(-rows // 16) * 16
        a = torch.zeros(r16, k // 16)
        a[:rows] = amax_b
        amax_b = a.reshape(r16 // 16, 16, k // 16).amax(dim=1).repeat_interleave(16, dim=0)[:rows]
    if global_scale is not None:
        gs = torch.tensor([float(global_scale)], dtype=torch.float32)
    else:
        amax = torch.tensor([float(x.abs().max() if global_amax is None else global_amax)], dtype=torch.float32)
        gs = 2688.0 / torch.clamp(amax, min=torch.finfo(torch.float32).tiny)  # torch: reciprocal() * 2688
        gs = torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0)
    if arith == "compressed_tensors":
        s8 = torch.clamp(gs * (amax_b / 6.0), -448.0, 448.0).to(torch.float8_e4m3fn)
        s8 = torch.where(s8.float() == 0, torch.tensor(0.125), s8.float()).to(torch.float8_e4m3fn)
        y = x.reshape(rows, k // 16, 16) / (s8.float() / gs).unsqueeze(-1)
    else:
        s8 = torch.clamp(gs * (amax_b * (1.0 / 6.0)), -448.0, 448.0).to(torch.float8_e4m3fn)
        t = s8.float() * (1.0 / gs)
        y = x.reshape(rows, k // 16, 16) * (1.0 / torch.where(t == 0, torch.tensor(1e8), t)).unsqueeze(-1)
    codes = _e2m1_nearest_even(torch.clamp(y.reshape(rows, k), -6.0, 6.0))
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    return packed, s8, gs


def _nvfp4_hard_inputs() -> list[torch.Tensor]:
    """Spread magnitudes, zero blocks/rows, outliers, tiny values, signed zeros and exact E2M1 ties (with a global
    scale of 1 and a block amax of 6 * 2^q the block scale is 2^q, so y = w / 2^q hits the ties exactly)."""
    g = torch.Generator().manual_seed(42)
    spread = torch.randn(48, 256, generator=g) * torch.exp(torch.randn(48, 1, generator=g) * 3)
    spread[0] = 0.0
    spread[1, :48] = 0.0
    spread[2, 16:32] = -0.0
    spread[3, 5] = 1e4
    spread[4] *= 1e-6
    ties = torch.tensor([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, 0.0])
    near = torch.stack(
        [ties, ties.view(torch.int32).add(1).view(torch.float32), ties.view(torch.int32).sub(1).view(torch.float32)]
    )
    near[1:, 0] = 6.0  # keep the block amax (and so the scale) exact
    near[1:, 15] = 0.0  # (the bit neighbours of 0.0 are a denormal and a NaN)
    tie_rows = torch.cat([near * 2.0**q for q in range(-6, 4)]).repeat(1, 4)  # [30, 64]
    return [spread, tie_rows]


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arith", ["compressed_tensors", "vllm"])
def test_nvfp4_matches_straightforward_reference(arith, dtype):
    """Every NVFP4 option that changes the arithmetic, bit for bit against ``_straightforward_nvfp4`` (independent
    of compressed-tensors / vLLM, so it also runs where they are not installed)."""
    spread, tie_rows = _nvfp4_hard_inputs()
    cases = [
        (spread, {}),
        (spread, {"block_2d": True}),
        (spread, {"global_amax": float(spread.to(dtype).float().abs().max()) * 3}),
        (spread[:, :40], {"pad": True}),
        (tie_rows, {"global_scale": 1.0}),
        (spread[:30].reshape(3, 10, 256), {}),  # 3-D input
        (spread.t().contiguous().t()[:, :128], {}),  # non-contiguous input
    ]
    for w, opts in cases:
        w = w.to(dtype)
        qt = te_ext.quantize(w, "nvfp4", arith=arith, **opts)
        ref_in = torch.nn.functional.pad(w, (0, (-w.shape[-1]) % 16)) if opts.get("pad") else w
        ref_opts = {k: v for k, v in opts.items() if k != "pad"}
        packed, s8, gs = _straightforward_nvfp4(ref_in, arith, **ref_opts)
        what = f"{arith} {dtype} {tuple(w.shape)} {opts}"
        assert_bits_equal(qt.codes.reshape(packed.shape), packed, f"codes, {what}")
        assert_bits_equal(qt.scales["weight_scale"].reshape(s8.shape), s8, f"block scales, {what}")
        assert_bits_equal(qt.scales["weight_global_scale"], gs, f"global scale, {what}")


needs_numba = pytest.mark.skipif(
    importlib.util.find_spec("numba") is None, reason="numba (the compiled CPU NVFP4 path) is not installed"
)


def _nvfp4_fast_cases() -> list[tuple[torch.Tensor, dict]]:
    spread, tie_rows = _nvfp4_hard_inputs()
    g = torch.Generator().manual_seed(7)
    wide = torch.randn(3, (1 << 18) + 48, generator=g)  # rows longer than a tile: column tiles (not whole rows)
    wide[1, 100:116] = 0.0
    return [
        (spread, {}),
        (spread, {"block_2d": True}),
        (spread, {"global_amax": float(spread.abs().max()) * 3}),
        (spread[:, :40], {"pad": True}),
        (tie_rows, {"global_scale": 1.0}),
        (spread[:30].reshape(3, 10, 256), {}),  # 3-D input
        (spread.t().contiguous().t()[:, :128], {}),  # non-contiguous input
        # rows not a multiple of a tile's rows, K a multiple of 16 but not of the kernel's row chunk (2048)
        (torch.randn(37, 2064, generator=g) * torch.exp(torch.randn(37, 1, generator=g) * 4), {}),
        (torch.randn(129, 4112, generator=g) * 1e-30, {}),  # tiny magnitudes: subnormal block scales
        (torch.randn(5, 16, generator=g) * 3e4, {}),
        (wide, {}),
    ]


@needs_numba
@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arith", ["compressed_tensors", "vllm"])
def test_nvfp4_compiled_cpu_path_is_bit_exact(arith, dtype, monkeypatch):
    """The compiled CPU kernels (te_ext/_cpu_kernels.py, forced on for small tensors here) against the
    straightforward reference and against the torch path (TE_EXT_NUMBA=0), codes and both scales bit for bit."""
    from te_ext import _cpu_kernels

    monkeypatch.setattr(_cpu_kernels, "MIN_ELEMS", 1)
    for w, opts in _nvfp4_fast_cases():
        w = w.to(dtype)
        what = f"{arith} {dtype} {tuple(w.shape)} {opts}"
        assert _cpu_kernels.usable(w), what
        fast = te_ext.quantize(w, "nvfp4", arith=arith, **opts)
        monkeypatch.setenv("TE_EXT_NUMBA", "0")
        slow = te_ext.quantize(w, "nvfp4", arith=arith, **opts)
        monkeypatch.delenv("TE_EXT_NUMBA")
        for name, t in slow.state_dict().items():
            assert_bits_equal(fast.state_dict()[name], t, f"{name} vs the torch path, {what}")
        if w.shape[-1] > 1 << 18:
            continue  # the float64 reference of a 800k-element tensor is slow; the torch path covers it
        ref_in = torch.nn.functional.pad(w, (0, (-w.shape[-1]) % 16)) if opts.get("pad") else w
        packed, s8, gs = _straightforward_nvfp4(ref_in, arith, **{k: v for k, v in opts.items() if k != "pad"})
        assert_bits_equal(fast.codes.reshape(packed.shape), packed, f"codes, {what}")
        assert_bits_equal(fast.scales["weight_scale"].reshape(s8.shape), s8, f"block scales, {what}")
        assert_bits_equal(fast.scales["weight_global_scale"], gs, f"global scale, {what}")


@needs_numba
@pytest.mark.unit
def test_nvfp4_compiled_e4m3_rounding_matches_torch():
    """The compiled float32 -> e4m3 conversion of the block scales against torch's at every e4m3 midpoint and its
    float32 neighbours, and on random values in [0, 448] (an exhaustive run over every float32 in [0, 448]
    agreed when it was written)."""
    import numpy as np

    from te_ext import _cpu_kernels

    _cpu_kernels.kernels()
    from te_ext._numba_kernels import e4m3_byte

    vals = torch.arange(127, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (vals[:-1] + vals[1:]) / 2
    around = (mids.view(torch.int32)[:, None] + torch.arange(-2, 3, dtype=torch.int32)).flatten().view(torch.float32)
    rand = torch.rand(20000, generator=torch.Generator().manual_seed(3)) * 448
    tiny = torch.rand(2000, generator=torch.Generator().manual_seed(4)) * 2.0**-6
    s = torch.cat([vals, mids, around, rand, tiny, torch.tensor([0.0, 1e-45, 448.0])]).clamp(0, 448)
    want = s.to(torch.float8_e4m3fn).view(torch.uint8)
    got = torch.tensor(
        [e4m3_byte(np.float32(v), np.uint32(b)) for v, b in zip(s.tolist(), s.view(torch.int32).tolist())],
        dtype=torch.uint8,
    )
    assert_bits_equal(got, want, "e4m3 block-scale bytes")


@needs_numba
@pytest.mark.unit
def test_nvfp4_compiled_e2m1_codes_match_torch_at_every_threshold():
    """The compiled E2M1 code (threshold counting) against ``_e2m1.encode`` (min of rounds) on every rounding
    threshold, the grid values, signed zeros and subnormals with their float32 neighbours, and a dense sample of
    float32 bit patterns in [-6.5, 6.5] (x * 1.0 through the kernel is x exactly)."""
    import numpy as np

    from te_ext import _cpu_kernels
    from te_ext._e2m1 import encode

    ks = _cpu_kernels.kernels()
    edges = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 1e-40, 1e-45])
    near = (edges.view(torch.int32)[:, None] + torch.arange(-2, 3, dtype=torch.int32)).flatten().view(torch.float32)
    near = near[torch.isfinite(near) & (near >= 0)]
    sample = torch.arange(0, 2**32, 4099, dtype=torch.int64).to(torch.int32).view(torch.float32)
    sample = sample[torch.isfinite(sample) & (sample.abs() <= 6.5)]
    y = torch.cat([near, -near, sample])
    y = torch.cat([y, torch.zeros((-len(y)) % 32)]).reshape(-1, 32).contiguous()
    codes = encode(y.clamp(-6, 6).flatten().clone())
    want = (codes[0::2] | (codes[1::2] << 4)).to(torch.uint8).reshape(y.shape[0], 16)
    got = torch.empty_like(want)
    mult = np.ones((y.shape[0], 2), np.float32)
    ks["encode"](y.view(torch.int32).numpy().view("uint32"), mult, got.numpy(), 0, False, 0, y.shape[0], 0, 32)
    assert_bits_equal(got, want, "E2M1 codes, compiled vs _e2m1.encode")


# ------------------------------------------------------------------------------------------------ NVFP4
# (2, 40960): rows longer than a te_ext tile, so each row is split into column tiles
NVFP4_SHAPES = [(1, 16), (16, 16), (33, 48), (64, 256), (128, 1024), (7, 3, 64), (2, 40960)]


@needs_ct
@needs_vllm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NVFP4_SHAPES)
def test_nvfp4_matches_compressed_tensors(shape, dtype):
    w = weight(shape, dtype, seed=len(shape) * 100 + shape[-1])
    w2 = w.reshape(-1, shape[-1])
    ref = ct_nvfp4(w2)
    qt = te_ext.quantize(w, "nvfp4")
    sd = qt.state_dict()
    assert_bits_equal(sd["weight_packed"].reshape(ref["weight_packed"].shape), ref["weight_packed"], "codes")
    assert_bits_equal(sd["weight_scale"].reshape(ref["weight_scale"].shape), ref["weight_scale"], "block scales")
    assert_bits_equal(sd["weight_global_scale"], ref["weight_global_scale"], "global scale")
    # dequantized values: compressed-tensors' decompressor (bf16) and vLLM's runtime dequant (every dtype)
    # the decompressor returns bf16 (float32 when K == 16: it then infers a "channel" strategy and skips the cast)
    ct_w = ct_nvfp4_decompress(ref).to(torch.bfloat16)
    assert_bits_equal(
        qt.dequantize(torch.bfloat16, reference="compressed_tensors").reshape(ct_w.shape), ct_w, "CT dequant"
    )
    for out_dtype in DTYPES:
        vw = vllm_nvfp4_dequant(ref["weight_packed"], ref["weight_scale"], ref["weight_global_scale"], out_dtype)
        assert_bits_equal(qt.dequantize(out_dtype).reshape(vw.shape), vw, f"vLLM dequant {out_dtype}")
    assert qt.dequantize(torch.float32).shape == w.shape


@needs_ct
@needs_vllm
@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_vllm_arith_matches_ref_nvfp4_quant(dtype):
    w = weight((96, 512), dtype, seed=3)
    qt = te_ext.quantize(w, "nvfp4", arith="vllm")
    packed, scale = vllm_nvfp4(w, qt.scales["weight_global_scale"])
    assert_bits_equal(qt.codes, packed, "codes")
    assert_bits_equal(qt.scales["weight_scale"], scale, "block scales")


def _near_tie_tensor(seed=1, m=2048, g=8):
    """Elements placed within +-3 float32 ulps of the E2M1 rounding thresholds of their actual block denominator:
    the cases where division (compressed-tensors) and multiplication by a reciprocal (vLLM) round differently."""
    gen = torch.Generator().manual_seed(seed)
    amax_b = torch.rand(m, g, generator=gen) * 2 + 0.01
    gamax = amax_b.max()
    gs = generate_gparam(-gamax.reshape(1), gamax.reshape(1))
    sb = (gs * (amax_b / 6.0)).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    denom = sb / gs
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    idx = torch.randint(0, 7, (m, g, 15), generator=gen)
    tie_vals = ties[idx] * denom.unsqueeze(-1)
    ulps = torch.randint(-3, 4, (m, g, 15), generator=gen, dtype=torch.int32)
    vals = (tie_vals.view(torch.int32) + ulps).view(torch.float32)
    sign = torch.where(torch.rand(m, g, 15, generator=gen) < 0.5, -1.0, 1.0)
    w = torch.empty(m, g, 16)
    w[..., 0] = amax_b
    w[..., 1:] = vals * sign
    return w.reshape(m, g * 16)


@needs_ct
@needs_vllm
def test_nvfp4_near_ties_each_arith_matches_its_reference():
    w = _near_tie_tensor()
    ref_ct = ct_nvfp4(w)
    ref_v, ref_vs = vllm_nvfp4(w, ref_ct["weight_global_scale"])
    n_diff = (ref_ct["weight_packed"] != ref_v).sum().item()
    assert n_diff > 1000, "the construction should separate the two references"
    q_ct = te_ext.quantize(w, "nvfp4")
    q_v = te_ext.quantize(w, "nvfp4", arith="vllm")
    assert_bits_equal(q_ct.codes, ref_ct["weight_packed"], "arith=compressed_tensors codes")
    assert_bits_equal(q_v.codes, ref_v, "arith=vllm codes")
    assert_bits_equal(q_v.scales["weight_scale"], ref_vs, "arith=vllm scales")


@needs_ct
@needs_vllm
def test_nvfp4_block_scale_rounding_midpoints():
    """Block amaxes whose E4M3 scale lands within a float32 ulp of a rounding midpoint: amax/6 (true division,
    compressed-tensors on CPU) and amax*(1/6) (vLLM) pick different E4M3 scales; each arith matches its reference."""
    gamax = torch.tensor(1.7)
    gs = generate_gparam(-gamax.reshape(1), gamax.reshape(1))
    e4 = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (e4[1:] + e4[:-1]) / 2
    base = mids / gs * 6.0
    off = torch.arange(-64, 65, dtype=torch.int32)
    cand = (base.view(torch.int32)[:, None] + off[None, :]).view(torch.float32).flatten()
    a_ct = (gs * (cand / 6.0)).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    a_v = (gs * (cand * (1.0 / 6.0))).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    sel = cand[(a_ct != a_v) & (cand <= gamax)]
    assert sel.numel() >= 10
    w = torch.zeros(sel.numel() + 1, 16)
    w[:-1, 0] = sel
    w[:-1, 1:] = sel[:, None] * torch.linspace(-0.9, 0.9, 15)
    w[-1, 0] = gamax
    ref_ct = ct_nvfp4(w)
    q_ct = te_ext.quantize(w, "nvfp4")
    assert_bits_equal(q_ct.scales["weight_scale"], ref_ct["weight_scale"], "CT block scales")
    assert_bits_equal(q_ct.codes, ref_ct["weight_packed"], "CT codes")
    ref_v, ref_vs = vllm_nvfp4(w, ref_ct["weight_global_scale"])
    q_v = te_ext.quantize(w, "nvfp4", arith="vllm")
    assert_bits_equal(q_v.scales["weight_scale"], ref_vs, "vLLM block scales")
    assert_bits_equal(q_v.codes, ref_v, "vLLM codes")
    assert not torch.equal(bits(q_ct.scales["weight_scale"]), bits(q_v.scales["weight_scale"]))


@needs_ct
def test_nvfp4_hard_cases():
    # exact ties and saturation: amax 6*c with c a power of two -> gs = 448/c, s_b = 448, y = x / c exactly
    c = 2.0**-3
    block = torch.tensor(
        [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0]
    )
    w = torch.stack([block * c, -block * c, torch.zeros(16), block * c * 2.0**-12]).float()
    ref = ct_nvfp4(w)
    qt = te_ext.quantize(w, "nvfp4")
    assert_bits_equal(qt.codes, ref["weight_packed"], "codes")
    assert_bits_equal(qt.scales["weight_scale"], ref["weight_scale"], "scales")
    deq = qt.dequantize(torch.float32)
    expect = torch.tensor([6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0, -6.0]) * c
    assert torch.equal(deq[0], expect)  # ties to even, +-6*scale saturate exactly
    assert torch.equal(deq[2], torch.zeros(16))
    # all-zero block: compressed-tensors stores scale 0.125, vLLM's ref keeps 0
    assert qt.scales["weight_scale"][2].float().item() == 0.125
    q_v = te_ext.quantize(w, "nvfp4", arith="vllm")
    assert q_v.scales["weight_scale"][2].float().item() == 0.0
    # row 3: block amax 6*c*2^-12 -> s_b = 448 * 2^-12 = 0.109375 (exact) ; now make subnormal E4M3 scales
    sub = torch.zeros(5, 32)
    sub[0, 0] = 1.0  # global amax 1 -> gs = 2688
    sub[1:, :16] = torch.randn(4, 16, generator=torch.Generator().manual_seed(5)) * 1e-5
    sub[1:, 16:] = torch.randn(4, 16, generator=torch.Generator().manual_seed(6)) * 3e-6
    for dtype in DTYPES:
        x = sub.to(dtype)
        ref = ct_nvfp4(x)
        qt = te_ext.quantize(x, "nvfp4")
        s_bits = bits(qt.scales["weight_scale"])[1:]
        assert ((s_bits & 0x78) == 0).any() and (s_bits != 0).any(), "expected subnormal E4M3 block scales"
        assert_bits_equal(qt.codes, ref["weight_packed"], f"subnormal codes {dtype}")
        assert_bits_equal(qt.scales["weight_scale"], ref["weight_scale"], f"subnormal scales {dtype}")
    # all-zero tensor: global scale falls back to 1.0 in both
    z = torch.zeros(4, 32, dtype=torch.bfloat16)
    ref = ct_nvfp4(z)
    qt = te_ext.quantize(z, "nvfp4")
    assert qt.scales["weight_global_scale"].item() == ref["weight_global_scale"].item() == 1.0
    assert_bits_equal(qt.scales["weight_scale"], ref["weight_scale"], "zero tensor scales")
    assert torch.equal(qt.dequantize(torch.float32), torch.zeros(4, 32))


@needs_ct
def test_nvfp4_negative_zero_and_small_negatives_match_reference():
    w = torch.tensor([[-0.0, 0.0, -1e-9, 1e-9, -0.01, 0.01, 5.0, -5.0] * 2], dtype=torch.float32)
    ref = ct_nvfp4(w)
    assert_bits_equal(te_ext.quantize(w, "nvfp4").codes, ref["weight_packed"], "signed zero codes")


@needs_ct
def test_nvfp4_matches_compiled_reference():
    """Same check through the torch.compile'd cast_to_fp4 that compressed-tensors ships (one shape)."""
    w = weight((32, 128), torch.bfloat16, seed=11)
    scheme = _scheme("NVFP4")
    wf = w.float()
    lo, hi = torch.aminmax(wf)
    gs = generate_gparam(lo.reshape(1), hi.reshape(1))
    scale, zp = compute_dynamic_scales_and_zp(value=wf, args=scheme.weights, module=None, global_scale=gs)
    out = NVFP4PackedCompressor.compress(
        {"weight": w, "weight_scale": scale, "weight_global_scale": gs, "weight_zero_point": zp}, scheme
    )
    qt = te_ext.quantize(w, "nvfp4")
    assert_bits_equal(qt.codes, out["weight_packed"], "codes (compiled reference)")


@needs_ct
def test_nvfp4_shared_global_scale_for_fused_and_sharded_weights():
    q, k, v = (weight((64, 128), torch.bfloat16, seed=s) for s in (21, 22, 23))
    amax = te_ext.global_amax(q, k, v)
    assert amax.item() == max(t.float().abs().max().item() for t in (q, k, v))
    parts = [te_ext.quantize(t, "nvfp4", global_amax=amax) for t in (q, k, v)]
    for t, p in zip((q, k, v), parts):
        assert torch.equal(p.scales["weight_global_scale"], parts[0].scales["weight_global_scale"])
        ref = ct_nvfp4(t, global_amax=amax)
        assert_bits_equal(p.codes, ref["weight_packed"], "shared-gs codes")
        assert_bits_equal(p.scales["weight_scale"], ref["weight_scale"], "shared-gs scales")
    # fused weight quantized at once == concatenation of the parts (what vLLM's QKV loader assembles)
    fused = te_ext.quantize(torch.cat([q, k, v]), "nvfp4", global_amax=amax)
    assert torch.equal(fused.codes, torch.cat([p.codes for p in parts]))
    # TP shards along the output dim with the full tensor's amax == the full tensor quantized at once
    full = te_ext.quantize(q, "nvfp4")
    shards = [te_ext.quantize(s, "nvfp4", global_amax=te_ext.global_amax(q)) for s in q.chunk(4)]
    assert torch.equal(full.codes, torch.cat([s.codes for s in shards]))
    # a global_scale given directly (e.g. read back from a checkpoint)
    again = te_ext.quantize(q, "nvfp4", global_scale=full.scales["weight_global_scale"])
    assert torch.equal(again.codes, full.codes)
    with pytest.raises(ValueError, match="smaller than this tensor's own amax"):
        te_ext.quantize(q, "nvfp4", global_amax=amax / 2)


@needs_ct
def test_nvfp4_2d_blocks_match_compressed_tensors_block_strategy():
    w = weight((40, 96), torch.bfloat16, seed=7)
    args = QuantizationArgs(
        num_bits=4, type="float", strategy="block", block_structure=[16, 16], symmetric=True,
        scale_dtype=torch.float8_e4m3fn,
    )  # fmt: skip
    wf = w.float()
    lo_g, hi_g = torch.aminmax(wf)
    gs = generate_gparam(lo_g.reshape(1), hi_g.reshape(1))
    wp = maybe_pad_tensor_for_block_quant(wf, (16, 16))
    tiles = wp.reshape(wp.shape[0] // 16, 16, wp.shape[1] // 16, 16)
    scale, zp = calculate_qparams(tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3)), args, global_scale=gs)
    with eager():
        ref_vals = ct_quantize(w, scale, zp, args, global_scale=gs)
        ref_packed = pack_fp4_to_uint8(ref_vals)
    qt = te_ext.quantize(w, "nvfp4", block_2d=True)
    assert_bits_equal(qt.codes, ref_packed, "2-D block codes")
    # scales in vLLM's [N, K/16] layout: each 16x16 tile scale repeated over its 16 rows
    expanded = scale.to(torch.float8_e4m3fn).repeat_interleave(16, dim=0)[: w.shape[0]]
    assert_bits_equal(qt.scales["weight_scale"], expanded, "2-D block scales")
    assert torch.equal(qt.scales["weight_global_scale"], gs)


@needs_ct
def test_nvfp4_hadamard_transform():
    from te_ext import hadamard

    h = hadamard.sylvester(16)
    assert torch.equal(h, deterministic_hadamard_matrix(16, dtype=torch.float32))
    t = hadamard.matrix(seed=5)
    assert torch.allclose(t @ t.T, torch.eye(16), atol=1e-6)
    w = weight((32, 64), torch.float32, seed=9, zero_block=False)
    w[:, 3] *= 30  # outlier channel
    assert torch.allclose(hadamard.inverse(hadamard.forward(w, 5), 5), w, atol=1e-5)
    qt = te_ext.quantize(w, "nvfp4", hadamard=True, hadamard_seed=5)
    # dequantize undoes the transform: equals inverse(dequant of the transformed tensor quantized plainly)
    plain = te_ext.quantize(hadamard.forward(w, 5), "nvfp4")
    assert torch.allclose(qt.dequantize(torch.float32), hadamard.inverse(plain.dequantize(torch.float32), 5), atol=1e-6)
    assert (qt.dequantize(torch.float32) - w).norm() / w.norm() < 0.2
    # global amax for a Hadamard-quantized tensor is taken after the transform
    amax = te_ext.global_amax(w, hadamard_seed=5)
    assert torch.equal(te_ext.quantize(w, "nvfp4", hadamard=True, hadamard_seed=5, global_amax=amax).codes, qt.codes)


def test_nvfp4_stochastic_rounding():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    a = te_ext.quantize(w, "nvfp4", stochastic_rounding=True, seed=123)
    b = te_ext.quantize(w, "nvfp4", stochastic_rounding=True, seed=123)
    c = te_ext.quantize(w, "nvfp4", stochastic_rounding=True, seed=124)
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
    assert torch.equal(bits(a.scales["weight_scale"]), bits(te_ext.quantize(w, "nvfp4").scales["weight_scale"]))
    # every SR value is one of the two grid neighbours of the scaled input
    per = (a.scales["weight_scale"].float() / a.scales["weight_global_scale"]).repeat_interleave(16, dim=1)
    y = (w / per).clamp(-6, 6)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    q = a.dequantize(torch.float32, reference="compressed_tensors") / per
    lo = grid[(torch.searchsorted(grid, y.abs(), right=True) - 1).clamp(0, 7)]
    hi = grid[torch.searchsorted(grid, y.abs(), right=False).clamp(0, 7)]
    assert bool(((q.abs() - lo).abs() < 1e-5).logical_or((q.abs() - hi).abs() < 1e-5).all())
    # unbiased: the mean over many seeds converges to the input (RNE is biased on this input)
    x = torch.full((1, 16), 0.3)
    x[0, 0] = 6.0  # pins the scale: y = x exactly
    mean = torch.stack(
        [te_ext.quantize(x, "nvfp4", stochastic_rounding=True, seed=s).dequantize(torch.float32) for s in range(400)]
    ).mean(0)
    assert abs(mean[0, 1:].mean().item() - 0.3) < 0.01
    assert te_ext.quantize(x, "nvfp4").dequantize(torch.float32)[0, 1].item() == 0.5
    gen = torch.Generator().manual_seed(9)
    te_ext.quantize(x, "nvfp4", stochastic_rounding=True, generator=gen)  # explicit generator accepted


def test_results_do_not_depend_on_thread_count():
    w = weight((512, 1024), torch.bfloat16, seed=31)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(
                [
                    te_ext.quantize(w, "nvfp4").codes,
                    te_ext.quantize(w, "nvfp4", stochastic_rounding=True, seed=5).codes,
                    te_ext.quantize(w, "mxfp4").codes,
                    bits(te_ext.quantize(w, "fp8", granularity="block").codes),
                    te_ext.quantize(w, "int8").codes,
                ]
            )
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_nvfp4_bits_per_element_and_padding():
    qt = te_ext.quantize(torch.randn(256, 256), "nvfp4")
    # 4-bit codes + one 8-bit E4M3 scale per 16 = 4.5 bits; the single fp32 global scale adds 32/65536 bits
    assert qt.nbytes == 256 * 128 + 256 * 16 + 4
    assert abs(qt.bits_per_element - 4.5) < 1e-3
    w = torch.randn(10, 40)
    with pytest.raises(ValueError, match="multiple of 16.*pad=True"):
        te_ext.quantize(w, "nvfp4")
    qp = te_ext.quantize(w, "nvfp4", pad=True)
    assert qp.codes.shape == (10, 24) and qp.scales["weight_scale"].shape == (10, 3)
    ref = te_ext.quantize(torch.nn.functional.pad(w, (0, 8)), "nvfp4")
    assert torch.equal(qp.codes, ref.codes)
    assert torch.equal(qp.dequantize(torch.float32), ref.dequantize(torch.float32)[:, :40])


# ------------------------------------------------------------------------------------------------ MXFP4
@needs_ct
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 32), (33, 64), (64, 512), (3, 5, 96), (2, 40960)])
def test_mxfp4_matches_compressed_tensors(shape, dtype):
    w = weight(shape, dtype, seed=shape[-1] + 1)
    w2 = w.reshape(-1, shape[-1])
    ref = ct_mxfp4(w2)
    qt = te_ext.quantize(w, "mxfp4")
    assert_bits_equal(qt.codes.reshape(ref["weight_packed"].shape), ref["weight_packed"], "codes")
    assert_bits_equal(qt.scales["weight_scale"].reshape(ref["weight_scale"].shape), ref["weight_scale"], "E8M0 scales")
    dec = MXFP4PackedCompressor.decompress(dict(ref), _scheme("MXFP4"))["weight"]
    assert_bits_equal(qt.dequantize(torch.bfloat16).reshape(dec.shape), dec, "dequant")


@needs_ct
def test_mxfp4_scale_rounding_edges():
    # block amaxes with mantissa just below / at / above 1.5 and 1.75 in several binades, a zero block,
    # and values that saturate at 6 * 2^e
    mant = torch.tensor([1.0, 1.49, 1.5, 1.74, 1.75, 1.76, 1.999])
    exps = torch.tensor([-20.0, -3.0, 0.0, 5.0, 40.0])
    amaxes = (mant[:, None] * 2.0 ** exps[None, :]).flatten()
    w = torch.zeros(amaxes.numel() + 1, 32)
    w[:-1, 0] = amaxes
    w[:-1, 1:] = amaxes[:, None] * torch.linspace(-1, 0.97, 31)
    ref = ct_mxfp4(w)
    qt = te_ext.quantize(w, "mxfp4")
    assert_bits_equal(qt.codes, ref["weight_packed"], "codes")
    assert_bits_equal(qt.scales["weight_scale"], ref["weight_scale"], "scales")
    assert qt.scales["weight_scale"][-1, 0].item() == 0  # all-zero block -> 2^-127
    # OCP "floor" rule, computed independently with frexp: amax = m * 2^e, m in [0.5, 1) -> floor(log2) = e - 1
    qf = te_ext.quantize(w, "mxfp4", scale_rounding="floor")
    _, e = torch.frexp(amaxes)
    assert torch.equal(qf.scales["weight_scale"][:-1, 0].long(), (e - 1 - 2 + 127).long())
    # with "floor", mantissas >= 1.5 saturate the block max to 6 * 2^e ; "even" rounds them up a binade
    deq_f = qf.dequantize(torch.float32)[:-1, 0]
    over = mant.repeat_interleave(len(exps)) > 1.5
    assert bool((deq_f[over] < amaxes[over]).all())
    # "even" never represents the block max worse than "floor"
    deq_e = qt.dequantize(torch.float32)[:-1, 0]
    assert bool(((deq_e - amaxes).abs() <= (deq_f - amaxes).abs()).all())


def test_mxfp4_bits_and_errors():
    qt = te_ext.quantize(torch.randn(64, 64), "mxfp4")
    assert qt.bits_per_element == 4.25
    with pytest.raises(ValueError, match="multiple of 32"):
        te_ext.quantize(torch.randn(4, 48), "mxfp4")
    assert te_ext.quantize(torch.randn(4, 48), "mxfp4", pad=True).dequantize(torch.float32).shape == (4, 48)


# ------------------------------------------------------------------------------------------------ FP8
FP8_CASES = [("FP8", "tensor"), ("FP8_DYNAMIC", "channel"), ("FP8_BLOCK", "block")]


@needs_ct
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (256, 384), (300, 200), (130, 33000)])
@pytest.mark.parametrize("preset,granularity", FP8_CASES)
def test_fp8_matches_compressed_tensors(preset, granularity, shape, dtype):
    w = weight(shape, dtype, seed=shape[0] * 7 + shape[1])
    ref, scheme = ct_naive(w, preset)
    qt = te_ext.quantize(w, "fp8", granularity=granularity)
    assert_bits_equal(qt.codes, ref["weight"], "codes")
    assert_bits_equal(qt.scales["weight_scale"], ref["weight_scale"], "scales")
    # compressed-tensors' dequantize returns the scale dtype (float32) for these strategies; cast like we do
    dec = ct_dequantize(ref["weight"], ref["weight_scale"], args=scheme.weights).to(dtype)
    assert_bits_equal(qt.dequantize(dtype), dec, "dequant")
    if granularity == "block":
        assert qt.scales["weight_scale"].shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    if granularity == "channel":
        assert qt.scales["weight_scale"].shape == (shape[0], 1)


@needs_ct
def test_fp8_hard_cases():
    # saturation at +-448 exactly, an all-zero row, E4M3 subnormal codes, exact RNE ties of the E4M3 grid
    w = torch.zeros(4, 16)
    w[0] = torch.tensor(
        [448.0, -448.0, 447.0, 440.0, 1.0, -1.0, 2**-9, 2**-10, 3 * 2**-10, 13.0, 12.5, 11.5] + [0.0] * 4
    )
    w[2] = torch.linspace(-3, 3, 16)
    w[3, 0] = 1e-30
    for preset, gran in FP8_CASES[:2]:
        ref, _ = ct_naive(w, preset)
        qt = te_ext.quantize(w, "fp8", granularity=gran)
        assert_bits_equal(qt.codes, ref["weight"], f"{gran} codes")
        assert_bits_equal(qt.scales["weight_scale"], ref["weight_scale"], f"{gran} scales")
    qt = te_ext.quantize(w, "fp8", granularity="channel")
    assert qt.codes[0, 0].float().item() == 448.0 and qt.codes[0, 1].float().item() == -448.0
    assert qt.codes[0, 10].float().item() == 12.0  # 12.5 -> tie -> even mantissa (12)
    assert qt.codes[0, 11].float().item() == 12.0  # 11.5 -> tie -> 12
    # this row's scale is exactly 1: E4M3 subnormals (smallest 2^-9) round to nearest even as well
    assert qt.codes[0, 6].float().item() == 2**-9
    assert qt.codes[0, 7].float().item() == 0.0  # 2^-10: tie between 0 and 2^-9 -> 0
    assert qt.codes[0, 8].float().item() == 2**-8  # 1.5 * 2^-9: tie -> even mantissa
    assert qt.scales["weight_scale"][1].item() == torch.finfo(torch.float32).eps  # all-zero row


@needs_vllm
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_vllm_arith_matches_vllm_quantizers(dtype):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.online.fp8 import _fp8_channel_scale, _fp8_quant_per_channel
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape, weight_amax
    from vllm.utils.deep_gemm import per_block_cast_to_fp8

    w = weight((300, 520), dtype, seed=13)
    w[5] = 0
    with set_current_vllm_config(VllmConfig()):
        q_tensor = QuantFP8(static=True, group_shape=GroupShape.PER_TENSOR)
        q_token = QuantFP8(static=False, group_shape=GroupShape.PER_TOKEN)
    qt = te_ext.quantize(w, "fp8", granularity="tensor", arith="vllm")
    ref, _ = q_tensor.forward_native(w, qt.scales["weight_scale"])
    assert_bits_equal(qt.codes, ref, "per-tensor (QuantFP8 static)")
    qt = te_ext.quantize(w, "fp8", granularity="channel", arith="vllm")
    scale = _fp8_channel_scale(weight_amax(w, dim=-1, keepdim=True))
    assert_bits_equal(qt.scales["weight_scale"], scale, "per-channel scale (online fp8)")
    assert_bits_equal(qt.codes, _fp8_quant_per_channel(w, scale), "per-channel codes (online fp8)")
    qt = te_ext.quantize(w, "fp8", granularity="block", arith="vllm")
    ref_q, ref_s = per_block_cast_to_fp8(w, [128, 128])
    assert_bits_equal(qt.codes, ref_q, "block codes (per_block_cast_to_fp8)")
    assert_bits_equal(qt.scales["weight_scale"], ref_s, "block scales (per_block_cast_to_fp8)")
    x = weight((36, 256), dtype, seed=14)  # vLLM's linear layers see 2-D [tokens, hidden] activations
    x[0] = 0
    ref_q, ref_s = q_token.forward_native(x)
    qa = te_ext.quantize_activation_per_token(x, "fp8")
    assert_bits_equal(qa.codes, ref_q, "per-token codes (QuantFP8 dynamic)")
    assert_bits_equal(qa.scales["input_scale"], ref_s, "per-token scales (QuantFP8 dynamic)")


def test_fp8_block_naming_and_layouts():
    w = torch.randn(200, 300)
    qt = te_ext.quantize(w, "fp8", granularity="block", block=(64, 128))
    assert qt.scales["weight_scale"].shape == (4, 3)
    assert set(qt.state_dict("m.").keys()) == {"m.weight", "m.weight_scale"}
    assert set(qt.state_dict("m.", naming="fp8").keys()) == {"m.weight", "m.weight_scale_inv"}
    assert te_ext.quantize(w, "fp8", granularity="tensor").scales["weight_scale"].shape == (1,)
    with pytest.raises(ValueError, match="2-D"):
        te_ext.quantize(torch.randn(2, 3, 4), "fp8", granularity="block")


# ------------------------------------------------------------------------------------------------ INT8
@needs_ct
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (64, 100), (129, 257), (3, 40000)])
def test_int8_matches_compressed_tensors(shape, dtype):
    w = weight(shape, dtype, seed=shape[1])
    scheme = _scheme("INT8")
    # arith="compressed_tensors": the full compressed-tensors path (scale amax/127.5, range [-128, 127])
    ref, _ = ct_naive(w, "INT8")
    qt = te_ext.quantize(w, "int8", arith="compressed_tensors")
    assert_bits_equal(qt.codes, ref["weight"], "CT codes")
    assert_bits_equal(qt.scales["weight_scale"], ref["weight_scale"], "CT scales")
    # default (vLLM): scale amax/127; compressed-tensors quantize/dequantize with that scale agree
    qd = te_ext.quantize(w, "int8")
    amax = w.float().abs().amax(dim=-1, keepdim=True)
    assert_bits_equal(
        qd.scales["weight_scale"], torch.where(amax == 0, torch.finfo(torch.float32).eps, amax / 127.0), "scale"
    )
    ref_q = ct_quantize(w, qd.scales["weight_scale"], None, scheme.weights, dtype=torch.int8)
    assert_bits_equal(qd.codes, ref_q, "codes via CT quantize")
    assert int(qd.codes.abs().max()) <= 127
    dec = ct_dequantize(qd.codes, qd.scales["weight_scale"], args=scheme.weights).to(dtype)
    assert_bits_equal(qd.dequantize(dtype), dec, "dequant")
    # per-tensor int8 (compressed-tensors "tensor" strategy)
    targs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor")
    lo, hi = torch.aminmax(w.float())
    t_scale, t_zp = calculate_qparams(lo, hi, targs)
    qt = te_ext.quantize(w, "int8", granularity="tensor", arith="compressed_tensors")
    assert_bits_equal(qt.scales["weight_scale"], t_scale, "per-tensor scale")
    assert_bits_equal(qt.codes, ct_quantize(w, t_scale, t_zp, targs, dtype=torch.int8), "per-tensor codes")


def test_int8_hard_cases():
    # exact .5 ties round half to even; +-amax -> +-127; all-zero row
    w = torch.tensor([[127.0, -127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5], [0.0] * 8])
    qt = te_ext.quantize(w, "int8")
    assert qt.codes[0].tolist() == [127, -127, 0, 2, 2, 0, -2, -2]
    assert qt.codes[1].tolist() == [0] * 8
    ct = te_ext.quantize(w, "int8", arith="compressed_tensors")
    assert ct.codes[0, :2].tolist() == [127, -128]


@needs_ct
def test_int8_per_token_activations():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, 96, generator=g).to(torch.bfloat16)
    x[0, 0] = 0
    qa = te_ext.quantize_activation_per_token(x, "int8")
    assert qa.codes.shape == x.shape and qa.scales["input_scale"].shape == (5, 7, 1)
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    assert_bits_equal(qa.scales["input_scale"], amax / torch.tensor(127.0), "scale = amax/127 (float32)")
    assert int(qa.codes.abs().max()) == 127 and int(qa.codes[0, 0].abs().max()) == 0
    # compressed-tensors' TOKEN quantize with the same scale divides instead of multiplying by 127/amax: the
    # codes agree except within a float32 ulp of a .5 tie
    scheme = _scheme("INT8")
    ref = ct_quantize(
        x.reshape(-1, 96), qa.scales["input_scale"].reshape(-1, 1), None, scheme.input_activations, dtype=torch.int8
    )
    agree = (ref == qa.codes.reshape(-1, 96)).float().mean().item()
    assert agree > 0.999
    deq = qa.dequantize(torch.float32)
    assert torch.allclose(deq, x.float(), atol=float(amax.max()) / 127)


# ------------------------------------------------------------------------------------------------ API / errors
@pytest.mark.parametrize("fmt", te_ext.FORMATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_raise(fmt, bad):
    w = torch.randn(4, 64, dtype=torch.bfloat16)
    w[2, 5] = bad
    word = "NaN" if math.isnan(bad) else "Inf"
    with pytest.raises(ValueError, match=rf"1 {word} value\(s\) \(first at index \(2, 5\)\)"):
        te_ext.quantize(w, fmt)
    if fmt in ("fp8", "int8"):
        with pytest.raises(ValueError, match=word):
            te_ext.quantize_activation_per_token(w, fmt)


def test_api_validation_and_fake_quantize():
    w = torch.randn(32, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="unknown format"):
        te_ext.quantize(w, "int4")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['granularity'\]"):
        te_ext.quantize(w, "nvfp4", granularity="channel")
    with pytest.raises(TypeError, match="dtype"):
        te_ext.quantize(w.to(torch.int32), "fp8")
    with pytest.raises(ValueError, match="arith"):
        te_ext.quantize(w, "fp8", arith="cuda")
    for fmt in te_ext.FORMATS:
        fq = te_ext.fake_quantize(w, fmt)
        assert fq.dtype == torch.float16 and fq.shape == w.shape
        assert torch.equal(fq, te_ext.quantize(w, fmt).dequantize(torch.float16))
        assert torch.equal(te_ext.fake_quantize(fq, fmt), fq) or fmt in ("nvfp4", "mxfp4")
    qt = te_ext.quantize(w, "nvfp4")
    assert set(qt.state_dict("layer.").keys()) == {
        "layer.weight_packed", "layer.weight_scale", "layer.weight_global_scale"
    }  # fmt: skip
    assert "nvfp4" in repr(qt)
    assert torch.equal(te_ext.dequantize(qt, torch.float32), qt.dequantize(torch.float32))


def test_import_is_lazy_and_cpu_only():
    code = (
        "import sys, te_ext; "
        "bad = [m for m in ('triton', 'transformer_engine', 'vllm', 'te_ext.triton_kernels') if m in sys.modules]; "
        "assert not bad, bad; te_ext.recipes; assert 'transformer_engine' not in sys.modules; print('ok')"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------------------------------------ recipes
def test_check_capability_matrix():
    ok = {
        ("delayed", (8, 9)), ("current", (9, 0)), ("blockwise", (9, 0)), ("blockwise", (10, 0)),
        ("mxfp8", (10, 0)), ("nvfp4", (10, 0)), ("nvfp4", (12, 0)), ("current", (10, 0)),
    }  # fmt: skip
    for name, sm in ok:
        recipes.check_capability(name, sm, True)
    with pytest.raises(recipes.CapabilityError, match="needs a CUDA GPU and a CUDA build.*learner.precision=fp8"):
        recipes.check_capability("current", (9, 0), False)
    with pytest.raises(recipes.CapabilityError, match="no CUDA device"):
        recipes.check_capability("current", None, True)
    with pytest.raises(recipes.CapabilityError, match=r"SM 9\.0 \(Hopper\).*rollout\.quant=nvfp4"):
        recipes.check_capability("nvfp4", (9, 0), True)
    with pytest.raises(recipes.CapabilityError, match=r"MXFP8.*SM >= 10\.0.*'blockwise'"):
        recipes.check_capability("mxfp8", (9, 0), True)
    with pytest.raises(recipes.CapabilityError, match=r"SM >= 8\.9"):
        recipes.check_capability("delayed", (8, 0), True)
    with pytest.raises(recipes.CapabilityError, match=r"SM >= 9\.0"):
        recipes.check_capability("blockwise", (8, 9), True)
    with pytest.raises(ValueError, match="unknown"):
        recipes.check_capability("fp4", (10, 0), True)


def test_build_recipe_without_te_and_with_a_stub(monkeypatch):
    if not recipes.te_available():
        with pytest.raises(recipes.CapabilityError, match="Transformer Engine"):
            recipes.build_recipe("current")

    class Format:
        HYBRID, E4M3, E2M1 = "hybrid", "e4m3", "e2m1"

    made = {}

    def cls(name):
        def ctor(**kw):
            made[name] = kw
            return (name, kw)

        return ctor

    mod = types.ModuleType("transformer_engine.common.recipe")
    mod.Format = Format
    for c in recipes.TE_CLASS.values():
        setattr(mod, c, cls(c))
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "transformer_engine.common", types.ModuleType("transformer_engine.common"))
    monkeypatch.setitem(sys.modules, "transformer_engine.common.recipe", mod)
    monkeypatch.setattr(recipes, "te_available", lambda: True)
    r = recipes.build_recipe("delayed", sm=(9, 0), fp8_format="hybrid", amax_history_len=16)
    assert r == ("DelayedScaling", {"fp8_format": "hybrid", "amax_history_len": 16})
    assert recipes.build_recipe("nvfp4", sm=(10, 0), disable_rht=True)[0] == "NVFP4BlockScaling"
    with pytest.raises(recipes.CapabilityError, match="rollout.quant=nvfp4"):
        recipes.build_recipe("nvfp4", sm=(9, 0))


# ------------------------------------------------------------------------------------------------ emulation
@pytest.mark.parametrize("fmt", ["fp8", "int8", "nvfp4", "mxfp4"])
def test_fake_quant_linear_forward_and_straight_through_backward(fmt):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    w = torch.randn(48, 64, generator=g, requires_grad=True)
    b = torch.randn(48, generator=g, requires_grad=True)
    y = emulation.fake_quant_linear(x, w, b, fmt)
    xq = emulation.fake_quant_activation(x.detach(), fmt)
    wq = emulation.fake_quant_weight(w.detach(), fmt)
    assert torch.equal(y, torch.nn.functional.linear(xq, wq, b.detach()))
    if fmt in ("fp8", "int8"):  # per-token activations as vLLM's W8A8 kernels
        assert torch.equal(xq, te_ext.quantize_activation_per_token(x.detach(), fmt).dequantize(torch.float32))
    gy = torch.randn(3, 5, 48, generator=g)
    y.backward(gy)
    assert torch.allclose(x.grad, gy @ wq, atol=1e-5)
    assert torch.allclose(w.grad, gy.reshape(-1, 48).T @ xq.reshape(-1, 64), atol=1e-4)
    assert torch.allclose(b.grad, gy.reshape(-1, 48).sum(0), atol=1e-5)
    lin = emulation.FakeQuantLinear(64, 48, fmt=fmt)
    assert lin(x.detach()).shape == (3, 5, 48)


def test_emulation_unquantized_is_plain_linear():
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    assert torch.equal(emulation.fake_quant_linear(x, w, None, "none"), x @ w.T)
    with pytest.raises(ValueError, match="unknown emulated format"):
        emulation.fake_quant_linear(x, w, None, "fp6")


# ------------------------------------------------------------------------------------------- format descriptors
def test_format_descriptors() -> None:
    from te_ext.formats import DESCRIPTORS, EXPORT_FORMATS
    from te_ext.vllm_export import checkpoint_layout

    assert te_ext.ROLLOUT_FORMATS == ("bf16", "nvfp4", "fp8", "int8")
    assert te_ext.ROLLOUT_FORMATS[1:] == EXPORT_FORMATS
    assert set(te_ext.FORMATS) | {"bf16"} == set(DESCRIPTORS)
    nv, fp8, int8, bf16 = (te_ext.format_descriptor(f) for f in ("nvfp4", "fp8", "int8", "bf16"))
    assert (nv.block_k, te_ext.format_descriptor("mxfp4").block_k, fp8.block_k, bf16.block_k) == (16, 32, None, None)
    assert nv.shared_stat("qkv", True) == nv.shared_stat("row", False) == "global_amax"
    assert fp8.shared_stat("row", True) == int8.shared_stat("row", True) == "row_amax"
    assert fp8.shared_stat("qkv", True) is None and fp8.shared_stat("row", False) is None
    assert nv.replicated_components("qkv") == nv.replicated_components("row") == ("weight_global_scale",)
    assert fp8.replicated_components("row") == ("weight_scale",) and fp8.replicated_components("fc1") == ()
    assert (nv.activation_format, fp8.activation_format, int8.activation_format) == (None, "fp8", "int8")
    assert (nv.probe_tolerance, fp8.probe_tolerance, bf16.probe_tolerance) == (0.1, 0.1, 0.05)
    assert nv.checkpoint_layout((8, 32)) == checkpoint_layout("nvfp4", (8, 32))
    assert bf16.checkpoint_layout((8, 32)) == [("", (8, 32), torch.bfloat16)]
    assert nv.shard_local(32) and not nv.shard_local(24) and fp8.shard_local(3)
    with pytest.raises(ValueError, match="unknown format"):
        te_ext.format_descriptor("fp4")


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8", "int8"])
def test_split_quantize_options_shards_match_whole(fmt: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    shards = list(w.chunk(2, dim=1))
    whole = te_ext.quantize(w, fmt, **te_ext.split_quantize_options(fmt, w, "row", False, lambda t: t))
    stats = [te_ext.split_quantize_options(fmt, s, "row", True, lambda t: t) for s in shards]
    key = "global_amax" if fmt == "nvfp4" else "row_amax"
    reduced = torch.maximum(stats[0][key], stats[1][key])
    parts = [
        te_ext.quantize(s, fmt, **te_ext.split_quantize_options(fmt, s, "row", True, lambda t: reduced.clone()))
        for s in shards
    ]
    deq = torch.cat([p.dequantize(torch.float32) for p in parts], dim=1)
    assert torch.equal(deq, whole.dequantize(torch.float32))

"""NVFP4: E2M1 elements, one float8_e4m3fn scale per 16 inputs, one float32 global scale per tensor.

Arithmetic, step by step (``arith="compressed_tensors"``, the default -- compressed-tensors'
``generate_gparam`` + ``calculate_qparams`` + ``quantize`` + ``pack_fp4_to_uint8`` as they execute on CPU):

    amax     = max |W|                     (or the caller's ``global_amax``, shared by fused / sharded weights)
    gs       = reciprocal(max(amax, tiny)) * 2688.0        (448 * 6; ``2688.0 / t`` in torch is reciprocal * 2688;
                                                           +-inf/NaN -> 1.0, so an all-zero tensor gets gs = 1)
    s_b      = e4m3(clamp(gs * (amax_b / 6.0), +-448))      amax_b = max |W| over the 16-block, float32
    s_b      = 0.125 where s_b == 0                         (compressed-tensors' eps for an E4M3 scale)
    y        = W / (s_b / gs)                               float32, true division
    code     = rne_e2m1(clamp(y, +-6)), sign bit iff y < 0
    dequant  = code * (s_b / gs)                            (compressed-tensors decompressor)
             = code * (s_b * (1 / gs))                      (vLLM ``dequantize_to_dtype``; QuantizedTensor default)

``arith="vllm"`` follows vLLM's ``ref_nvfp4_quant`` (the emulation path that quantizes activations):
``s_b = e4m3(clamp(gs * (amax_b * (1/6)), +-448))`` with no eps replacement and ``y = W * reciprocal(s_b * reciprocal(gs))``
(a zero scale uses 1e8 in place of 0 before the reciprocal, as ``get_reciprocal`` does).
"""

from __future__ import annotations

import torch

from te_ext import _cpu_kernels, _e2m1, hadamard
from te_ext._common import (
    E2M1_MAX,
    E4M3_MAX,
    E4M3_ZERO_SCALE_EPS,
    NVFP4_BLOCK,
    as_rows,
    block_absmax,
    check_arith,
    check_finite_amax,
    check_input,
    cpu_serial,
    pad_last_dim,
    parallel_tiles,
    require_multiple,
    stochastic_base_seed,
    tensor_absmax,
    tile_generator,
    tiles,
)
from te_ext.qtensor import QuantizedTensor

_FMT = "nvfp4"


def global_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """float32 ``[1]`` global scale ``448*6/amax`` computed exactly as compressed-tensors' ``generate_gparam``."""
    a = torch.as_tensor(amax, dtype=torch.float32).reshape(1)
    a = torch.clamp(a, min=torch.finfo(torch.float32).tiny)
    gs = a.reciprocal() * (E4M3_MAX * E2M1_MAX)
    return torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0)


@cpu_serial
def tensor_amax(x: torch.Tensor, *, hadamard_seed: int | None = None) -> torch.Tensor:
    """float32 ``max |x|`` (of the Hadamard-transformed tensor when ``hadamard_seed`` is given)."""
    if hadamard_seed is not None:
        x = hadamard.forward(pad_last_dim(as_rows(x), NVFP4_BLOCK), hadamard_seed)
    return tensor_absmax(as_rows(x)).reshape(())


_E4M3_VALUES: dict[torch.device, torch.Tensor] = {}


def e4m3_to_float(s8: torch.Tensor) -> torch.Tensor:
    """``s8.float()`` as a gather from the 256 values (torch's float8 -> float32 conversion is not vectorized on
    CPU: 3x slower, ~15% of a fast NVFP4 quantize). The table is that conversion, so the values are identical."""
    table = _E4M3_VALUES.get(s8.device)
    if table is None:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
        table = _E4M3_VALUES.setdefault(s8.device, codes.float().to(s8.device))
    return table.index_select(0, s8.view(torch.uint8).reshape(-1).int()).view(s8.shape)


def _tile_amax(amax_b: torch.Tensor) -> torch.Tensor:
    """Per-(1x16) block amax ``[R, G]`` -> per-16x16-tile amax broadcast back to ``[R, G]``."""
    r, g = amax_b.shape
    pad = (-r) % NVFP4_BLOCK
    a = torch.nn.functional.pad(amax_b, (0, 0, 0, pad)) if pad else amax_b
    tiles = a.reshape(-1, NVFP4_BLOCK, g).amax(dim=1)
    return tiles.repeat_interleave(NVFP4_BLOCK, dim=0)[:r]


@cpu_serial
def quantize(
    x: torch.Tensor,
    *,
    global_amax: torch.Tensor | float | None = None,
    global_scale: torch.Tensor | float | None = None,
    stochastic_rounding: bool = False,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    block_2d: bool = False,
    hadamard: bool = False,
    hadamard_seed: int = 0,
    pad: bool = False,
    arith: str = "compressed_tensors",
) -> QuantizedTensor:
    from te_ext import hadamard as rht

    check_input(x, _FMT)
    check_arith(arith, _FMT)
    if global_amax is not None and global_scale is not None:
        raise ValueError("te_ext.quantize(fmt='nvfp4'): pass either global_amax or global_scale, not both")
    shape = x.shape
    k = shape[-1]
    if not pad:
        require_multiple(
            k,
            NVFP4_BLOCK,
            _FMT,
            "NVFP4 has one E4M3 scale per 16 inputs; vLLM allocates weight_packed [N, K/2] and weight_scale "
            "[N, K/16] and cannot load a ragged tail.",
        )
    if block_2d and x.ndim != 2:
        raise ValueError(
            f"te_ext.quantize(fmt='nvfp4', block_2d=True): 16x16 blocks need a 2-D weight, got shape {tuple(shape)}"
        )
    x2 = pad_last_dim(as_rows(x), NVFP4_BLOCK)
    if hadamard:
        x2 = rht.forward(x2, hadamard_seed)
    rows, kp = x2.shape
    groups = kp // NVFP4_BLOCK

    # the compiled CPU kernels (te_ext/_cpu_kernels.py) for large bf16/fp32 tensors, bit for bit the torch path
    fast = not stochastic_rounding and _cpu_kernels.usable(x2)
    if fast and not x2.is_contiguous():
        x2 = x2.contiguous()
    amax_b = _cpu_kernels.block_absmax16(x2) if fast else block_absmax(x2, NVFP4_BLOCK)  # [rows, groups] float32
    if block_2d:
        amax_b = _tile_amax(amax_b)  # (propagates NaN/Inf, like every reduction here)
    local_amax = amax_b.max() if amax_b.numel() else torch.zeros((), device=x.device)
    # the max propagates NaN/Inf: checking it is checking every block amax, without a full-size isfinite pass
    check_finite_amax(local_amax.reshape(1), x, _FMT)

    if global_scale is not None:
        gs = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device).reshape(1).clone()
        if not bool(torch.isfinite(gs).all()) or float(gs) <= 0:
            raise ValueError(f"te_ext.quantize(fmt='nvfp4'): global_scale must be finite and > 0, got {float(gs)}")
        if float(local_amax) * float(gs) / E2M1_MAX > E4M3_MAX * (1 + 2**-4):
            raise ValueError(
                f"te_ext.quantize(fmt='nvfp4'): global_scale={float(gs):.6g} is too large for this tensor "
                f"(amax {float(local_amax):.6g}): block scales would exceed 448 and clip. Use global_scale <= "
                f"2688/amax, or pass global_amax= instead."
            )
    else:
        if global_amax is None:
            amax = local_amax
        else:
            amax = torch.as_tensor(global_amax, dtype=torch.float32, device=x.device).reshape(())
            if not bool(torch.isfinite(amax)):
                raise ValueError(f"te_ext.quantize(fmt='nvfp4'): global_amax must be finite, got {float(amax)}")
            if float(amax) < float(local_amax):
                raise ValueError(
                    f"te_ext.quantize(fmt='nvfp4'): global_amax={float(amax):.6g} is smaller than this tensor's own "
                    f"amax {float(local_amax):.6g}{' (after the Hadamard transform)' if hadamard else ''}; values "
                    "would clip. Pass the max over every tensor that shares the global scale "
                    "(te_ext.global_amax(q, k, v) for fused q/k/v, the max over TP shards for a sharded weight)."
                )
        gs = global_scale_from_amax(amax)

    # Block scales and per-block multipliers are elementwise in amax_b, so each tile computes its own (in cache, on
    # the worker threads; computed once over [rows, groups] on the calling thread, with a full-size isfinite and
    # ``== 0`` to bool, they took ~15% of a 4096x11008 call once the codes got fast). gs > 0 and amax_b >= 0, so
    # every scale is >= +0 and ``amin() == 0`` finds the zero scales.
    divide = arith == "compressed_tensors"
    inv_gs = 1.0 / (gs + (gs == 0) * 1e8)  # vllm: get_reciprocal(gs)

    def block_scales(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block amax ``[r, g]`` -> (e4m3 scales, multipliers ``[r, g, 1]``: y = x / m (divide) or x * m)."""
        if divide:
            s = gs * (a / E2M1_MAX)
            s8 = torch.clamp(s, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            sf = e4m3_to_float(s8)
            if bool(sf.amin() == 0):
                sf = sf.masked_fill(sf == 0, E4M3_ZERO_SCALE_EPS)
                s8 = sf.to(torch.float8_e4m3fn)
            return s8, (sf / gs).unsqueeze(-1)
        s = gs * (a * (1.0 / E2M1_MAX))
        s8 = torch.clamp(s, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        t = e4m3_to_float(s8) * inv_gs
        return s8, (1.0 / (t + (t == 0) * 1e8)).unsqueeze(-1)

    sr_base = stochastic_base_seed(seed, generator) if stochastic_rounding else 0
    packed = torch.empty(rows, kp // 2, dtype=torch.uint8, device=x.device)
    s8_all = torch.empty(rows, groups, dtype=torch.float8_e4m3fn, device=x.device)

    def work(i: int, t: tuple[slice, slice]) -> None:
        rs, cs = t
        r, c = rs.stop - rs.start, cs.stop - cs.start
        gsl = slice(cs.start // NVFP4_BLOCK, cs.stop // NVFP4_BLOCK)
        s8, pb = block_scales(amax_b[rs, gsl])
        s8_all[rs, gsl] = s8
        xt = x2[rs, cs].reshape(r, c // NVFP4_BLOCK, NVFP4_BLOCK)
        # a bf16/fp16 tile and the float32 multipliers: the op computes in float32 (the input converts exactly),
        # i.e. it is the float32 division / product of the reference
        y = (torch.div(xt, pb) if divide else torch.mul(xt, pb)).reshape(r, c)
        out = packed[rs, cs.start // 2 : cs.stop // 2]
        if stochastic_rounding:
            y.clamp_(-E2M1_MAX, E2M1_MAX)
            codes = _e2m1.encode(y, stochastic=True, generator=tile_generator(sr_base, i, x.device))
            out.copy_(_e2m1.pack(codes))
        else:
            out.copy_(_e2m1.encode_packed(y))  # table-driven; the clamp to +-6 is part of the table

    work_tiles = tiles(rows, kp, NVFP4_BLOCK, device=x.device, fixed=stochastic_rounding)
    if fast:  # the same arithmetic, compiled (scales and codes of a tile in one call)
        run = _cpu_kernels.nvfp4_encoder(x2, amax_b, float(gs), float(inv_gs), divide, s8_all, packed)
        parallel_tiles(lambda _, t: run(t), work_tiles, x.device)
    else:
        parallel_tiles(work, work_tiles, x.device)
    s8 = s8_all

    lead = tuple(shape[:-1])
    options = {
        "arith": arith,
        "block_2d": block_2d,
        "hadamard": hadamard,
        "hadamard_seed": hadamard_seed if hadamard else None,
        "stochastic_rounding": stochastic_rounding,
        "seed": seed,
        "padded_k": kp,
    }
    return QuantizedTensor(
        fmt=_FMT,
        codes=packed.reshape(*lead, kp // 2),
        scales={"weight_scale": s8.reshape(*lead, groups), "weight_global_scale": gs},
        shape=torch.Size(shape),
        options=options,
    )


@cpu_serial
def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16, *, reference: str = "vllm") -> torch.Tensor:
    if reference not in ("vllm", "compressed_tensors"):
        raise ValueError(f"reference must be 'vllm' or 'compressed_tensors', got {reference!r}")
    codes = qt.codes.reshape(-1, qt.codes.shape[-1])
    rows, kp = codes.shape[0], codes.shape[1] * 2
    groups = kp // NVFP4_BLOCK
    sf = qt.scales["weight_scale"].reshape(rows, groups).float()
    gs = qt.scales["weight_global_scale"].float().reshape(())
    mult = sf * gs.reciprocal() if reference == "vllm" else sf / gs
    k = qt.shape[-1]
    rht = qt.options.get("hadamard")
    out = _e2m1.decode_blocks(codes, mult, NVFP4_BLOCK, torch.float32 if rht else dtype)
    if rht:
        out = hadamard.inverse(out, qt.options["hadamard_seed"]).to(dtype)
    if kp != k:
        out = out[:, :k]
    return out.reshape(qt.shape)

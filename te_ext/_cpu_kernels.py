"""Compiled CPU kernels for NVFP4 quantize (numba; optional: the torch path is the fallback and the reference).

The torch path costs ~9 passes over each tile (integer block amax, float32 division, five integer ops for the
table key, a table gather, a pair pack) plus ~10 small ops per tile for the block scales: ~3 ns per element on
one core, 0.7 GB/s for a 4096x11008 bf16 weight on the 2-core CI machine, 5% of its copy bandwidth. These kernels
do the same arithmetic per element in one pass over a cache-resident chunk of a row -- bf16/fp32 bits -> float32,
the block scale (``gs * (amax / 6)``, e4m3 round-to-nearest-even, the 0.125 replacement of a zero scale) and its
multiplier, ``y = x / m`` (or ``x * m``), the E2M1 code by counting the round-to-nearest-even thresholds |y|
passes (the same codes as ``_e2m1``'s table and min-of-rounds), the nibble pack -- in IEEE float32 (numba keeps float32 op float32 in float32 and never contracts or reorders without
``fastmath``; ``error_model="numpy"`` only drops Python's ZeroDivisionError check). So the result is bit for bit
the torch path's: tests/test_te_ext.py checks the two against each other and against the straightforward
reference on hard inputs, and the e4m3 rounding was checked on every float32 in [0, 448] when written.

numba is not a te_ext requirement (vLLM's CPU build brings it). The torch path runs without it (or when it fails
to load: one warning), with ``TE_EXT_NUMBA=0``, for non-CPU tensors, float16 inputs, stochastic rounding and
tensors below ``MIN_ELEMS``: small tensors stay on torch so a process that only quantizes tiny weights (most
tests) never pays numba's import and kernel load (~1 s; the first compile ~5 s, then numba's on-disk cache in
``te_ext/__pycache__``). The kernels are loaded on the calling thread and run on te_ext's worker threads
(``nogil``), one call per tile.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from te_ext._common import Tile, parallel_tiles, tiles

MIN_ELEMS = 1 << 20  # below this the torch path is fast enough and numba's import would dominate

_LOCK = threading.Lock()
_KERNELS: dict[str, Any] = {}
_FAILED: list[str] = []
_BITS = {torch.bfloat16: (torch.int16, 16), torch.float32: (torch.int32, 0)}


def usable(x: torch.Tensor) -> bool:
    """Whether the compiled kernels take this tensor (CPU, bf16/fp32, large enough, numba importable)."""
    return (
        x.device.type == "cpu"
        and x.dtype in _BITS
        and x.numel() >= max(1, MIN_ELEMS)
        and os.environ.get("TE_EXT_NUMBA", "1") != "0"
        and importlib.util.find_spec("numba") is not None
        and _load()
    )


def _load() -> bool:
    """Load the kernels once; a numba that fails to import or compile leaves the torch path (with one warning)."""
    with _LOCK:
        if not _KERNELS and not _FAILED:
            try:
                _KERNELS.update(_compile())
            except Exception as e:  # a broken numba install must not break quantize: the torch path is exact too
                _FAILED.append(f"{type(e).__name__}: {e}")
                warnings.warn(
                    f"te_ext: the compiled NVFP4 CPU kernels failed to load ({_FAILED[0]}); using the (slower, "
                    "bit-identical) torch path. Set TE_EXT_NUMBA=0 to silence this.",
                    stacklevel=3,
                )
        return bool(_KERNELS)


def kernels() -> dict[str, Any]:
    """The compiled kernels (loaded on the first call)."""
    if not _load():
        raise RuntimeError(f"te_ext: the compiled CPU kernels are unavailable ({_FAILED[0]})")
    return _KERNELS


def _compile() -> dict[str, Any]:
    from te_ext import _numba_kernels  # imports numba; compiles (or loads from numba's cache) the signatures

    return {
        "block_absmax": _numba_kernels.block_absmax,
        "encode": _numba_kernels.encode,
        "nvfp4_scales": _numba_kernels.nvfp4_scales,
    }


def _bits(x: torch.Tensor) -> tuple[Any, int]:
    itype, sh = _BITS[x.dtype]
    a = x.detach().view(itype).numpy()
    return a.view("uint16" if sh else "uint32"), sh


def block_absmax16(x2: torch.Tensor) -> torch.Tensor:
    """float32 ``[R, K/16]`` = max |x2| per 16-block of a C-contiguous ``[R, K]`` tensor (tiles on the pool)."""
    rows, k = x2.shape
    out = torch.empty(rows, k // 16, dtype=torch.float32)
    xb, sh = _bits(x2)
    ob = out.view(torch.int32).numpy().view("uint32")
    fn = kernels()["block_absmax"]

    def work(_: int, t: Tile) -> None:
        fn(xb, ob, sh, t[0].start, t[0].stop, t[1].start, t[1].stop)

    parallel_tiles(work, tiles(rows, k, 16, device=x2.device), x2.device)
    return out


def nvfp4_encoder(
    x2: torch.Tensor,
    amax_b: torch.Tensor,
    gs: float,
    inv_gs: float,
    divide: bool,
    s8: torch.Tensor,
    packed: torch.Tensor,
) -> Callable[[Tile], None]:
    """``fn(tile)`` that writes a tile's NVFP4 block scales (into ``s8 [R, K/16]``, float8_e4m3fn) and packed codes
    (into ``packed [R, K/2]``) from ``x2 [R, K]`` and the block amax ``amax_b [R, K/16]`` (all C-contiguous).

    ``divide``: compressed-tensors arithmetic (``y = x / (s / gs)``), else vLLM's (``y = x * (1 / (s / gs))``);
    ``inv_gs`` is vLLM's ``get_reciprocal(gs)`` as torch computes it."""
    ks = kernels()
    xb, sh = _bits(x2)
    rows, groups = amax_b.shape
    mult = np.empty((rows, groups), np.float32)
    ab, sb, pb = amax_b.numpy(), s8.view(torch.uint8).numpy(), packed.numpy()
    e4m3 = _e4m3_values()
    scales, encode = ks["nvfp4_scales"], ks["encode"]

    def run(t: Tile) -> None:
        (rs, cs), g0, g1 = t, t[1].start // 16, t[1].stop // 16
        scales(ab, gs, inv_gs, divide, e4m3, sb, mult, rs.start, rs.stop, g0, g1)
        encode(xb, mult, pb, sh, divide, rs.start, rs.stop, cs.start, cs.stop)

    return run


def _e4m3_values() -> Any:
    """The 256 float8_e4m3fn values as float32 (torch's own conversion, so identical to ``s8.float()``)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    return codes.float().numpy()

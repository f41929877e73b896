"""Shared constants, input validation and chunking helpers for te_ext.

Everything here is plain torch and runs on CPU. The quantizers work on a 2-D view ``[rows, K]`` of the input
(leading dimensions flattened, the last dimension is the input/reduction dimension) and walk it in row chunks of
about ``CHUNK_ELEMS`` elements so that the float32 temporaries stay in cache and the allocator reuses them. The
chunk loop is the only Python loop on the data path; every block/element operation inside a chunk is vectorized.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

FORMATS = ("nvfp4", "mxfp4", "fp8", "int8")
ACCEPTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
E2M1_MAX = 6.0  # largest E2M1 value
INT8_MAX = 127.0
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
FP8_DEFAULT_BLOCK = (128, 128)

# vLLM's lower bound for dynamic FP8 scales (QuantFP8 / online per-channel FP8): 1 / (448 * 512).
FP8_MIN_SCALING_FACTOR = 1.0 / (E4M3_MAX * 512.0)
# compressed-tensors replaces an all-zero scale by the "eps" of the scale dtype (helpers._get_dtype_eps).
FP32_EPS = torch.finfo(torch.float32).eps
E4M3_ZERO_SCALE_EPS = 0.125

CHUNK_ELEMS = 1 << 16

ARITHS = ("compressed_tensors", "vllm")


def check_input(x: torch.Tensor, fmt: str, *, min_ndim: int = 1) -> None:
    """Validate dtype/shape/finiteness-independent properties of a tensor to quantize."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"te_ext.quantize(fmt={fmt!r}): expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACCEPTED_DTYPES:
        raise TypeError(
            f"te_ext.quantize(fmt={fmt!r}): input dtype {x.dtype} is not supported; "
            "pass a bfloat16, float16 or float32 tensor"
        )
    if x.ndim < min_ndim:
        raise ValueError(
            f"te_ext.quantize(fmt={fmt!r}): input must have at least {min_ndim} dimension(s), got shape {tuple(x.shape)}"
        )


def check_arith(arith: str, fmt: str) -> None:
    if arith not in ARITHS:
        raise ValueError(f"te_ext.quantize(fmt={fmt!r}): arith={arith!r} is not one of {ARITHS}")


def raise_non_finite(x: torch.Tensor, fmt: str) -> None:
    """Raise a ValueError that says how many NaN / Inf values the input holds and where the first one is."""
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    bad = (~torch.isfinite(x)).nonzero()
    where = tuple(int(i) for i in bad[0]) if len(bad) else ()
    parts = []
    if n_nan:
        parts.append(f"{n_nan} NaN")
    if n_inf:
        parts.append(f"{n_inf} Inf")
    raise ValueError(
        f"te_ext.quantize(fmt={fmt!r}): input of shape {tuple(x.shape)} contains {' and '.join(parts)} value(s) "
        f"(first at index {where}); the quantization scales would be NaN/Inf. Find where the tensor diverged "
        "(e.g. a NaN loss or an overflowing bf16 update) and fix that before quantizing."
    )


def check_finite_amax(amax: torch.Tensor, x: torch.Tensor, fmt: str) -> None:
    """``amax`` is a (small) reduction of |x| that propagates NaN/Inf; only scan x itself when it is not finite."""
    if amax.numel() and not bool(torch.isfinite(amax).all()):
        raise_non_finite(x, fmt)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., K] -> [rows, K]`` (a view when x is contiguous)."""
    k = x.shape[-1]
    return x.reshape(-1, k)


def row_chunks(rows: int, cols: int, target: int = CHUNK_ELEMS) -> Iterator[slice]:
    """Row slices of about ``target`` elements each (at least one row per slice)."""
    step = max(1, target // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def block_absmax(x2: torch.Tensor, block: int) -> torch.Tensor:
    """max(|x|) over consecutive blocks of ``block`` elements of the last dim, in float32: ``[R, K] -> [R, K/block]``.

    Uses ``aminmax`` (no full-size ``abs()`` temporary); exact in every input dtype. NaN propagates.
    """
    r, k = x2.shape
    lo, hi = x2.reshape(r, k // block, block).aminmax(dim=-1)
    return torch.maximum(lo.neg_(), hi).float()


def pad_last_dim(x: torch.Tensor, multiple: int) -> torch.Tensor:
    k = x.shape[-1]
    pad = (-k) % multiple
    if pad == 0:
        return x
    return torch.nn.functional.pad(x, (0, pad))


def require_multiple(k: int, block: int, fmt: str, detail: str) -> None:
    if k % block:
        raise ValueError(
            f"te_ext.quantize(fmt={fmt!r}): the last (input) dimension K={k} is not a multiple of {block}. {detail} "
            f"Either pass pad=True (te_ext zero-pads K to {k + (-k) % block} and dequantize() trims it back; such a "
            "tensor is for te_ext/learner use only, vLLM cannot load it), or keep this layer unquantized "
            "(list it in the quantization config's ignore list)."
        )

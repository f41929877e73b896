"""Shared constants, input validation and the tiling engine of te_ext.

Everything here is plain torch and runs on any device. The quantizers work on a 2-D view ``[rows, K]`` of the
input (leading dimensions flattened; the last dimension is the input/reduction dimension) and process it in tiles
of at most ``SERIAL_TILE_ELEMS`` elements:

* the float32 temporaries of a tile stay in cache and the allocator reuses them (one full-size float32
  temporary per op costs more in page faults than the arithmetic);
* on CPU, every public te_ext call runs its torch ops with intra-op parallelism off (``serial_torch``: the torch
  thread count is set to 1 for the duration of the call and restored after). A quantizer issues many
  medium-sized ops, and each OpenMP parallel region stalls on a busy machine (its barrier waits for a
  descheduled thread: measured 100x slowdowns on the shared 2-core CI machine). Large tensors are instead split
  over a small thread pool (as many workers as torch threads the caller had; torch releases the GIL inside ops).
* round-to-nearest results never depend on the tiling; stochastic rounding always uses ``TILE_ELEMS`` tiles (its
  random stream is per tile), so its result depends only on the seed, never on the thread count.

The tile loop is the only Python loop on the data path; every block/element operation inside a tile is vectorized.
On CUDA tensors the tiles are simply larger (``CUDA_TILE_ELEMS``) and run on one thread.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

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

TILE_ELEMS = 1 << 15  # tile size of stochastic rounding (fixed, so the random stream does not depend on threads)
SERIAL_TILE_ELEMS = 1 << 18
CUDA_TILE_ELEMS = 1 << 24
MIN_PARALLEL_TILES = 8  # below ~2M elements the pool's hand-off costs more than it saves

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


Tile = tuple[slice, slice]
F = TypeVar("F", bound=Callable[..., Any])


class _CallerThreads:
    """The torch thread count the outermost te_ext call found (what the pool sizes itself to)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.saved = 1

    def get(self, default: int) -> int:
        return self.saved if self.depth else default


_CALLER_THREADS = _CallerThreads()


@contextlib.contextmanager
def serial_torch() -> Iterator[None]:
    """Turn torch's intra-op parallelism off for the enclosed te_ext work (re-entrant; restores the thread count)."""
    st = _CALLER_THREADS
    with st.lock:
        if st.depth == 0:
            st.saved = torch.get_num_threads()
            if st.saved != 1:
                torch.set_num_threads(1)
        st.depth += 1
    try:
        yield
    finally:
        with st.lock:
            st.depth -= 1
            if st.depth == 0 and st.saved != 1:
                torch.set_num_threads(st.saved)


def cpu_serial(fn: F) -> F:
    """Decorator: run ``fn`` under ``serial_torch`` (harmless for CUDA inputs, whose ops do not use OpenMP)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name.startswith("te_ext"):
            return fn(*args, **kwargs)
        with serial_torch():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def tiles(
    rows: int, cols: int, col_align: int = 1, *, device: torch.device | None = None, fixed: bool = False
) -> list[Tile]:
    """(row slice, column slice) pairs covering ``[rows, cols]`` (see the module docstring for the tile size;
    ``fixed=True`` always uses ``TILE_ELEMS``).

    Full rows when a row fits; otherwise each row is split into column ranges that are multiples of
    ``col_align`` (the format's block width, so no block straddles two tiles).
    """
    if device is not None and device.type == "cuda":
        limit = CUDA_TILE_ELEMS
    elif fixed:
        limit = TILE_ELEMS
    else:
        limit = SERIAL_TILE_ELEMS
    if rows == 0 or cols == 0:
        return []
    if cols <= limit:
        step = max(1, limit // cols)
        return [(slice(r, min(rows, r + step)), slice(0, cols)) for r in range(0, rows, step)]
    width = max(col_align, limit // col_align * col_align)
    return [(slice(r, r + 1), slice(c, min(cols, c + width))) for r in range(rows) for c in range(0, cols, width)]


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="te_ext")
        return _POOL


def num_workers(n_tiles: int, device: torch.device) -> int:
    """Worker threads for ``n_tiles`` CPU tiles: the caller's torch thread count (or ``$TE_EXT_NUM_WORKERS``);
    1 for small tensors, non-CPU devices and calls made from inside a te_ext worker."""
    if device.type != "cpu" or n_tiles < MIN_PARALLEL_TILES:
        return 1
    if threading.current_thread().name.startswith("te_ext"):
        return 1
    env = os.environ.get("TE_EXT_NUM_WORKERS")
    want = int(env) if env else _CALLER_THREADS.get(torch.get_num_threads())
    return max(1, min(want, os.cpu_count() or 1, n_tiles // 8))


def parallel_tiles(fn: Callable[[int, Tile], None], work: Sequence[Tile], device: torch.device) -> None:
    """Run ``fn(index, tile)`` on every tile: inline, or in contiguous groups on the te_ext thread pool."""
    n = num_workers(len(work), device)
    if n <= 1:
        for i, t in enumerate(work):
            fn(i, t)
        return
    bounds = [len(work) * i // n for i in range(n + 1)]

    def run(i: int) -> None:
        for j in range(bounds[i], bounds[i + 1]):
            fn(j, work[j])

    for f in [_pool().submit(run, i) for i in range(n)]:
        f.result()


def _f32_abs(tile: torch.Tensor) -> torch.Tensor:
    """A fresh float32 ``|tile|`` (never aliases the input)."""
    return tile.to(torch.float32, copy=True).abs_()


# |x| as the integer bit pattern with the sign bit cleared: for non-negative IEEE floats the integer order is the
# numeric order, and every NaN pattern is above +inf, so an integer max is the float max (NaN propagating).
_ABS_BITS = {
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
}


def block_absmax(x2: torch.Tensor, block: int) -> torch.Tensor:
    """max(|x|) over consecutive blocks of ``block`` elements of the last dim, in float32: ``[R, K] -> [R, K/block]``.

    Exact in every input dtype (the max is one of the inputs, converted exactly to float32); NaN propagates.
    bf16/fp16/fp32 tiles are reduced as integers in their own width (``_ABS_BITS``): no float32 copy, and an int16
    ``amax`` over the innermost 16 runs at 0.46 ns per element vs 1.0 ns for float32 copy + abs + a ``maximum``
    tree (2^18-element tiles, one thread of the shared 2-core Xeon). Other dtypes: float32 copies and a
    pairwise ``maximum`` tree (a float reduction over a short innermost dimension is several times slower).
    """
    r, k = x2.shape
    if k % block:
        raise ValueError(f"last dim {k} is not a multiple of the block {block}")
    out = torch.empty(r, k // block, dtype=torch.float32, device=x2.device)
    as_int = _ABS_BITS.get(x2.dtype)

    def work(_: int, t: Tile) -> None:
        rs, cs = t
        dst = out[rs, cs.start // block : cs.stop // block]
        if as_int is None:
            dst.copy_(block_max(_f32_abs(x2[rs, cs]), block))
            return
        itype, mask = as_int
        bits = x2[rs, cs].view(itype) & mask  # a fresh contiguous tile
        dst.copy_(bits.reshape(dst.shape[0], -1, block).amax(dim=-1).view(x2.dtype))

    parallel_tiles(work, tiles(r, k, block, device=x2.device), x2.device)
    return out


def block_max(a: torch.Tensor, block: int) -> torch.Tensor:
    """``[r, c]`` (non-negative float32, c a multiple of block) -> per-block max ``[r, c/block]``."""
    r, c = a.shape
    a = a.view(-1, block)
    if block & (block - 1) == 0:
        w = block
        while w > 1:
            w //= 2
            a = torch.maximum(a[:, :w], a[:, w:])
    else:
        a = a.amax(dim=-1)
    return a.view(r, c // block)


def quantize_rows(
    x2: torch.Tensor,
    out: torch.Tensor,
    scale_from_amax: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    row_amax: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row (per-channel / per-token) quantization into ``out``; returns the ``[rows, 1]`` scales.

    ``row_amax`` (``[rows]`` or ``[rows, 1]``) replaces the rows' own absolute maxima: a weight split along its
    input dimension across tensor-parallel ranks quantizes each shard with the all-reduced (MAX) row maxima and
    gets exactly the codes and scales of the whole row.

    ``scale_from_amax(amax [r, 1] float32) -> (scale, multiplier)`` (elementwise, so the result does not depend
    on how rows are grouped) and ``apply(y float32 tile, multiplier rows) -> values`` (may modify y in place).
    One pass over x when a row fits in a tile (statistics and codes from the same float32 copy), two otherwise.
    """
    rows, k = x2.shape
    work = tiles(rows, k, device=x2.device)
    if row_amax is not None:
        if row_amax.numel() != rows:
            raise ValueError(f"row_amax has {row_amax.numel()} values for {rows} rows")
        scale, mult = scale_from_amax(row_amax.reshape(rows, 1).to(device=x2.device, dtype=torch.float32))
    elif not work or work[0][1] == slice(0, k):
        scale = torch.empty(rows, 1, dtype=torch.float32, device=x2.device)

        def one_pass(_: int, t: Tile) -> None:
            rs = t[0]
            y = x2[rs].to(torch.float32, copy=True)
            s, m = scale_from_amax(y.abs().amax(dim=-1, keepdim=True))
            scale[rs] = s
            out[rs] = apply(y, m)

        parallel_tiles(one_pass, work, x2.device)
        return scale
    else:
        scale, mult = scale_from_amax(row_absmax(x2))

    def second_pass(_: int, t: Tile) -> None:
        rs, cs = t
        out[rs, cs] = apply(x2[rs, cs].to(torch.float32, copy=True), mult[rs])

    parallel_tiles(second_pass, work, x2.device)
    return scale


def row_absmax(x2: torch.Tensor) -> torch.Tensor:
    """max(|x|) of every row, float32 ``[R, 1]`` (NaN propagates)."""
    r, k = x2.shape
    if k == 0:
        return torch.zeros(r, 1, device=x2.device)
    work = tiles(r, k, 1, device=x2.device)
    width = work[0][1].stop - work[0][1].start if work else k
    ncol = -(-k // width)
    part = torch.zeros(r, ncol, dtype=torch.float32, device=x2.device)

    def fn(_: int, t: Tile) -> None:
        rs, cs = t
        part[rs, cs.start // width : cs.start // width + 1] = _f32_abs(x2[rs, cs]).amax(dim=-1, keepdim=True)

    parallel_tiles(fn, work, x2.device)
    return part if ncol == 1 else part.amax(dim=-1, keepdim=True)


def tensor_absmax(x2: torch.Tensor) -> torch.Tensor:
    """max(|x|) of the whole tensor, float32 ``[1]`` (0 for an empty tensor)."""
    if x2.numel() == 0:
        return torch.zeros(1, device=x2.device)
    return row_absmax(x2).amax().reshape(1)


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


def stochastic_base_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """Base seed for per-tile generators (tile i uses base + i): deterministic for a given seed/generator state and
    independent of the number of worker threads."""
    if seed is not None:
        return int(seed)
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def tile_generator(base: int, index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((base + index * 0x9E3779B97F4A7C15) % 2**63)

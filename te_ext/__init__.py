"""te_ext: every low-precision number format of qrl-megatron (NVFP4, MXFP4, FP8 E4M3, INT8).

Public API::

    qt = te_ext.quantize(w, "nvfp4")                 # -> QuantizedTensor (codes + scales, vLLM checkpoint layout)
    w_hat = qt.dequantize(torch.bfloat16)
    w_fq = te_ext.fake_quantize(w, "fp8", granularity="block")   # quantize -> dequantize, input dtype
    xq = te_ext.quantize_activation_per_token(x, "int8")          # dynamic per-token W8A8 activations
    amax = te_ext.global_amax(q_w, k_w, v_w)          # one NVFP4 global scale for fused / sharded weights

The torch implementation runs on any device (CPU included) and is the reference; Transformer Engine recipes
(``te_ext.recipes``), CPU training emulation (``te_ext.emulation``) and Triton kernels (``te_ext.triton_kernels``)
are imported lazily on first attribute access. See docs/te_ext.md for the exact arithmetic of every format and
which reference implementation (compressed-tensors, vLLM) each one matches bit for bit.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch

from te_ext import fp8, int8, mxfp4, nvfp4
from te_ext._common import FORMATS
from te_ext.formats import ROLLOUT_FORMATS, FormatDescriptor, format_descriptor, split_quantize_options
from te_ext.frozen import dequantize_nvfp4_checkpoint, frozen_linear
from te_ext.qtensor import QuantizedTensor

__all__ = [
    "FORMATS",
    "ROLLOUT_FORMATS",
    "FormatDescriptor",
    "QuantizedTensor",
    "dequantize",
    "dequantize_nvfp4_checkpoint",
    "fake_quantize",
    "format_descriptor",
    "frozen_linear",
    "global_amax",
    "quantize",
    "quantize_activation_per_token",
    "split_quantize_options",
]

_QUANTIZERS: dict[str, Callable[..., QuantizedTensor]] = {
    "nvfp4": nvfp4.quantize,
    "mxfp4": mxfp4.quantize,
    "fp8": fp8.quantize,
    "int8": int8.quantize,
}
_LAZY = ("recipes", "emulation", "triton_kernels")


def _options_of(fmt: str) -> list[str]:
    sig = inspect.signature(_QUANTIZERS[fmt])
    return [n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def quantize(tensor: torch.Tensor, fmt: str, **options: Any) -> QuantizedTensor:
    """Quantize ``tensor`` (bf16/fp16/fp32, any shape; blocks run along the last dim) to ``fmt``.

    Options per format (all keyword-only; see the format modules and docs/te_ext.md):

    * ``nvfp4``: ``global_amax``, ``global_scale``, ``stochastic_rounding``, ``seed``, ``generator``,
      ``block_2d``, ``hadamard``, ``hadamard_seed``, ``pad``, ``arith``
    * ``mxfp4``: ``scale_rounding`` ("even" | "floor"), ``stochastic_rounding``, ``seed``, ``generator``, ``pad``,
      ``arith``
    * ``fp8``: ``granularity`` ("tensor" | "channel" | "block"), ``block`` (default (128, 128)), ``arith``,
      ``row_amax`` (channel: given per-row maxima, e.g. all-reduced over the TP shards of a row-split weight)
    * ``int8``: ``granularity`` ("channel" | "tensor"), ``arith``, ``row_amax`` (as fp8)

    ``arith`` is "compressed_tensors" or "vllm": which reference's floating-point operation order to follow
    (default: compressed-tensors for nvfp4/mxfp4/fp8, vLLM for int8).

    Raises ValueError for NaN/Inf inputs, unknown formats/options and shapes the format cannot represent.
    """
    if fmt not in _QUANTIZERS:
        raise ValueError(f"te_ext.quantize: unknown format {fmt!r}; expected one of {FORMATS}")
    allowed = _options_of(fmt)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"te_ext.quantize(fmt={fmt!r}): unknown option(s) {unknown}; allowed: {allowed}")
    return _QUANTIZERS[fmt](tensor, **options)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16, **kwargs: Any) -> torch.Tensor:
    """``qt.dequantize(dtype)``."""
    return qt.dequantize(dtype, **kwargs)


def fake_quantize(tensor: torch.Tensor, fmt: str, **options: Any) -> torch.Tensor:
    """quantize -> dequantize, returned in the input dtype (the numerics a quantized engine sees)."""
    return quantize(tensor, fmt, **options).dequantize(tensor.dtype)


def quantize_activation_per_token(x: torch.Tensor, fmt: str = "int8") -> QuantizedTensor:
    """Dynamic per-token (per-row of the last dim) activation quantization, as vLLM's W8A8 kernels do it.

    ``fmt="int8"``: vLLM ``dynamic_scaled_int8_quant``; ``fmt="fp8"``: vLLM ``QuantFP8`` per-token (native path).
    Scales are returned as ``scales["input_scale"]`` with shape ``[..., 1]``.
    """
    if fmt == "int8":
        return int8.quantize_per_token(x)
    if fmt == "fp8":
        return fp8.quantize_per_token(x)
    raise ValueError(f"te_ext.quantize_activation_per_token: fmt must be 'int8' or 'fp8', got {fmt!r}")


def global_amax(*tensors: torch.Tensor, hadamard_seed: int | None = None) -> torch.Tensor:
    """float32 max |x| over several tensors: pass it as ``global_amax=`` to every NVFP4 tensor that must share one
    global scale (fused q/k/v or gate/up -- vLLM keeps a single global scale per fused layer -- or the TP shards
    of one weight). With ``hadamard_seed`` the amax is taken after the Hadamard transform, as
    ``quantize(..., hadamard=True)`` needs."""
    if not tensors:
        raise ValueError("te_ext.global_amax: pass at least one tensor")
    vals = [nvfp4.tensor_amax(t, hadamard_seed=hadamard_seed).to(tensors[0].device) for t in tensors]
    return torch.stack(vals).max()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"te_ext.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'te_ext' has no attribute {name!r}")

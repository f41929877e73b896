"""The learner's compute precision: ``apply_precision(model, precision)`` for fp32 | bf16 | fp8 | nvfp4.

``fp32`` / ``bf16`` are parameter dtypes (the learner builds the model in them); nothing to do here. ``fp8`` and
``nvfp4`` keep fp32 master weights and change how the transformer layers' GEMMs compute:

* **Transformer Engine model (GPU with TE: TE layer spec).** The model is left alone and the TE recipe is returned
  (``te_ext.recipes.build_recipe``: ``fp8`` -> ``"current"`` = ``Float8CurrentScaling``, per-tensor E4M3, SM >= 8.9;
  ``nvfp4`` -> ``"nvfp4"`` = ``NVFP4BlockScaling``, Blackwell only: on Hopper ``CapabilityError`` says what to use).
  The caller runs the forward inside ``precision_autocast(recipe)`` (TE's ``fp8_autocast``).
* **Megatron local spec (CPU, or no TE): emulation with te_ext's numerics.** Every Megatron ``ColumnParallelLinear`` /
  ``RowParallelLinear`` of the transformer layers (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``)
  computes ``F.linear(Q_a(x), Q_w(W), b)`` -- the forward of ``te_ext.emulation.fake_quant_linear`` -- with a
  straight-through backward (``dx = dy @ Q_w(W)``, ``dW = dy^T @ Q_a(x)``, ``db = sum dy``: the unquantized gradient
  taken at the fake-quantized point; ``dy`` itself is not quantized). Bias, norms, attention softmax and residuals
  stay fp32.

  ======  ==========================================================  =============================================
  format  weights ``Q_w``                                             activations ``Q_a``
  ======  ==========================================================  =============================================
  fp8     E4M3, one per-tensor scale ``amax / E4M3 max`` (TE          E4M3 dynamic per token (vLLM's W8A8 FP8,
          ``Float8CurrentScaling``'s weight granularity)              ``te_ext.quantize_activation_per_token``)
  nvfp4   E2M1, ``block_k``-element blocks along the input dim, E4M3  the same NVFP4 layout with a dynamic per-tensor
          block scales, one fp32 global scale per tensor              global scale (vLLM's NVFP4 emulation arith,
          (compressed-tensors arith)                                  W4A4)
  ======  ==========================================================  =============================================

  The numbers behind these words (``block_k`` = ``te_ext.formats.format_descriptor(fmt).block_k``, the E4M3 and E2M1
  maxima) are te_ext's; the code below reads them from ``te_ext.formats`` and never repeats them.

  Implementation: the layer's ``_forward_impl`` -- Megatron's own hook for the GEMM (``input, weight, bias`` plus
  the communication flags) -- is replaced *on that instance* by a ``FakeQuantGemm``. Nothing global is patched, the
  module tree, parameters, buffers and ``state_dict`` names are untouched (checkpoints and the HF mapping work as
  before), and ``remove_precision`` restores the layer. The replacement keeps Megatron's TP communication: the
  input-gradient all-reduce (``copy_to_tensor_model_parallel_region``) or, with sequence parallelism, the input
  all-gather / gradient reduce-scatter; weight gradients go to ``param.grad`` (DDP's hook adds them to
  ``main_grad``, also when ``gradient_accumulation_fusion`` is set).

  **Not quantized: the output layer (LM head) and the embeddings.** The rollout engine's quantized checkpoints keep
  both in bf16 (``te_ext.vllm_export`` puts ``lm_head`` on compressed-tensors' ignore list; the embedding is no
  Linear) and TE's ``fp8_autocast`` only reaches the TE modules of the transformer layers -- Megatron's output
  layer is a plain ``ColumnParallelLinear`` in both specs (unless its MXFP8 output projection is configured) -- so
  quantizing them here would emulate a model neither side runs. The embedding is a table lookup, not a GEMM (and,
  tied, it *is* the output weight); numerically the logits feed a softmax over the vocabulary, where a coarse
  per-tensor scale would cost the most.

Tensor / pipeline parallelism: each rank quantizes its own shard; PP needs nothing (a stage's layers are whole).
Under TP the shards of one weight would get different scales from the unsharded tensor wherever a scale spans the
split dimension. Where that happens, and what is done:

* fp8 per-tensor weight scale (amax over the E4M3 maximum): every shard of every layer (column- and row-parallel) would use its own
  amax, i.e. TP=2 would quantize with different scales than TP=1 (about half the shards get a finer scale). This
  breaks TP invariance (the learner's logprobs would depend on the layout), so the amax is all-reduced (MAX) over
  the TP group; with the global amax every element's code equals the unsharded tensor's.
* fp8 per-token activation scales: column-parallel inputs are replicated over TP (same scale everywhere);
  row-parallel inputs (``linear_proj``, ``linear_fc2``) are split along the hidden dim, so each token's amax is
  all-reduced (MAX) over TP -- a ``[tokens]`` vector per layer call.
* nvfp4: scale blocks lie along the input dim, so block scales match the unsharded tensor as long as every shard's
  input dim is a multiple of the block (checked: ``apply_precision`` raises otherwise); the per-tensor global scale
  (E2M1 max * E4M3 max / amax) needs the global amax for weights (both kinds) and for row-parallel inputs: all-reduce MAX over TP
  (one scalar each). Fused weights (Megatron's ``linear_qkv`` = q/k/v, ``linear_fc1`` = gate/up) get one global
  scale, as vLLM keeps one per fused layer.

With these reductions TP=2 quantizes exactly what TP=1 quantizes; what remains is the fp32 summation order of the
row-parallel all-reduce, which can move a value across a rounding threshold of the next quantizer (a rare,
one-step change; tests/test_precision.py measures the loss agreement). Two things are *not* layout-invariant by
construction and are kept that way because TE and vLLM behave the same: the per-tensor activation scale of nvfp4
depends on which tokens share a micro-batch (so changing ``learner.micro_batch_size`` or DP -- which changes the
micro-batches -- changes nvfp4 results slightly; fp8's per-token scales do not), and padding tokens of a
micro-batch count towards that amax.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F

from te_ext.formats import format_descriptor

__all__ = [
    "EMULATED_PRECISIONS",
    "PRECISIONS",
    "TE_RECIPES",
    "FakeQuantGemm",
    "apply_precision",
    "precision_autocast",
    "quantized_layer_names",
    "remove_precision",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp8", "nvfp4")
EMULATED_PRECISIONS = ("fp8", "nvfp4")
TE_RECIPES = {"fp8": "current", "nvfp4": "nvfp4"}
# Megatron modules that keep full precision (see the module docstring).
SKIPPED_LAYERS = ("output_layer",)
_TE_MODULE_PREFIXES = ("transformer_engine.", "megatron.core.extensions.transformer_engine")


class _StraightThrough(torch.autograd.Function):
    """forward: ``quantizer(t)``; backward: identity (the straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, quantizer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return quantizer(t.detach())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _group_size(group: Any) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _all_reduce_max(t: torch.Tensor, group: Any) -> torch.Tensor:
    """MAX over ``group`` in float32 (exact for amaxes: the result is an element of some rank's tensor)."""
    out = t.float().contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


def _amax(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    a = x.detach().abs()
    return a.amax() if dim is None else a.amax(dim=dim, keepdim=True)


@dataclass(eq=False)
class FakeQuantGemm:
    """Replacement for one Megatron linear's ``_forward_impl``: fake-quantized GEMM, straight-through gradient.

    ``input_split``: the input's last dim is split over ``group`` (row-parallel), so activation statistics that
    span it are all-reduced. Weights are always split over ``group`` when it has more than one rank.
    """

    fmt: str
    group: Any = None
    input_split: bool = False

    # ---------------------------------------------------------------------------------------------- quantizers
    def quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        from te_ext.emulation import fake_quant_weight

        if _group_size(self.group) == 1:
            return fake_quant_weight(w, self.fmt, _WEIGHT_OPTIONS[self.fmt])
        amax = _all_reduce_max(_amax(w), self.group)
        if format_descriptor(self.fmt).tp_shared_stat == "global_amax":
            return fake_quant_weight(w, self.fmt, {"global_amax": amax})
        # fp8 per-tensor: te_ext takes the scale from the tensor's own amax, so append one row holding the TP-global
        # amax (exactly representable: it is an element of some shard), quantize, and drop the row again.
        w2 = w.reshape(-1, w.shape[-1])
        extra = torch.zeros(1, w2.shape[1], dtype=w.dtype, device=w.device)
        extra[0, 0] = amax.to(w.dtype)
        out = fake_quant_weight(torch.cat([w2, extra]), "fp8", _WEIGHT_OPTIONS["fp8"])
        return out[:-1].reshape(w.shape)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        from te_ext.emulation import fake_quant_activation

        if not self.input_split or _group_size(self.group) == 1:
            return fake_quant_activation(x, self.fmt)
        if format_descriptor(self.fmt).tp_shared_stat == "global_amax":
            return fake_quant_activation(x, self.fmt, {"global_amax": _all_reduce_max(_amax(x), self.group)})
        # fp8 per token over a split hidden dim: append each token's TP-global amax as one more column.
        x2 = x.reshape(-1, x.shape[-1])
        token_amax = _all_reduce_max(_amax(x2, dim=-1), self.group).to(x.dtype)
        out = fake_quant_activation(torch.cat([x2, token_amax], dim=-1), "fp8")
        return out[:, :-1].reshape(x.shape)

    # --------------------------------------------------------------------------------------------------- GEMM
    def __call__(
        self,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        gradient_accumulation_fusion: bool = False,
        allreduce_dgrad: bool = False,
        sequence_parallel: bool = False,
        grad_output_buffer: list[torch.Tensor] | None = None,
        wgrad_deferral_limit: int | None = None,
        tp_group: Any = None,
        gtp_remat_size: int = 1,
        **unsupported: Any,
    ) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        if grad_output_buffer is not None or (gtp_remat_size or 1) > 1 or unsupported:
            raise NotImplementedError(
                f"learner.precision={self.fmt} emulation: deferred embedding wgrad, GTP weight sharding and "
                f"{sorted(unsupported)} are not supported by the fake-quantized GEMM"
            )
        # Megatron's linear function does these communications itself; keep them (same autograd semantics).
        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
        elif allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        x_q = _StraightThrough.apply(input, self.quantize_input)
        w_q = _StraightThrough.apply(weight, lambda w: self.quantize_weight(w).to(input.dtype))
        return F.linear(x_q, w_q, None if bias is None else bias.to(input.dtype))


# fp8: per-tensor weights (one scale per tensor, as TE's current scaling); nvfp4: te_ext defaults (its blocks).
_WEIGHT_OPTIONS: dict[str, dict[str, Any]] = {"fp8": {"granularity": "tensor"}, "nvfp4": {}}


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"learner.precision={precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")


def _target_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Megatron's (non-TE) tensor-parallel linears of the transformer layers, with their module names."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, ColumnParallelLinear | RowParallelLinear)
        and name.rsplit(".", 1)[-1] not in SKIPPED_LAYERS
    ]


def _uses_te(model: torch.nn.Module) -> bool:
    return any(type(m).__module__.startswith(_TE_MODULE_PREFIXES) for m in model.modules())


def quantized_layer_names(model: torch.nn.Module) -> list[str]:
    """Names of the layers whose GEMM ``apply_precision`` replaced."""
    return [name for name, m in model.named_modules() if isinstance(m.__dict__.get("_forward_impl"), FakeQuantGemm)]


def apply_precision(model: torch.nn.Module, precision: str) -> Any:
    """Set up ``precision`` for ``model`` (a bare GPTModel stage; call before wrapping it in DDP).

    Returns the Transformer Engine recipe for the caller's ``precision_autocast`` when the model is built from TE
    modules, else None (fp32 / bf16: nothing to do; fp8 / nvfp4 on Megatron's local spec: the transformer layers'
    linears now compute fake-quantized, see the module docstring). Applying the same precision twice is a no-op;
    a different one raises (call ``remove_precision`` first).
    """
    _check_precision(precision)
    if precision not in EMULATED_PRECISIONS:
        return None
    if _uses_te(model):
        from te_ext.recipes import build_recipe

        return build_recipe(TE_RECIPES[precision])
    targets = _target_linears(model)
    if not targets:
        raise ValueError(
            f"learner.precision={precision}: the model has neither Transformer Engine modules nor Megatron "
            "ColumnParallelLinear/RowParallelLinear layers to quantize"
        )
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    for name, module in targets:
        current = module.__dict__.get("_forward_impl")
        if isinstance(current, FakeQuantGemm):
            if current.fmt != precision:
                raise ValueError(f"{name} already computes in {current.fmt}; call remove_precision first")
            continue
        k_local = cast(torch.Tensor, module.weight).shape[-1]
        block = format_descriptor(precision).block_k
        if block is not None and k_local % block:
            raise ValueError(
                f"learner.precision={precision}: {name} has {k_local} inputs on this rank, not a multiple of the "
                f"{precision.upper()} block ({block}); use learner.precision=fp8 or a TP size that splits it into "
                f"{block}-blocks"
            )
        group = getattr(module, "tp_group", None)
        gemm = FakeQuantGemm(precision, group, isinstance(module, RowParallelLinear))
        module._forward_impl = gemm  # type: ignore[assignment]  # this instance only (Megatron's GEMM hook)
    logger.info(
        "learner.precision=%s: %d linear layers fake-quantized (te_ext emulation); output layer and embeddings "
        "kept in %s",
        precision,
        len(targets),
        next(model.parameters()).dtype,
    )
    return None


def remove_precision(model: torch.nn.Module) -> None:
    """Undo ``apply_precision``'s emulation (the layers compute with Megatron's own GEMM again)."""
    for _, module in model.named_modules():
        if isinstance(module.__dict__.get("_forward_impl"), FakeQuantGemm):
            del module._forward_impl


@contextmanager
def precision_autocast(recipe: Any) -> Iterator[None]:
    """Context for the forward pass: TE's ``fp8_autocast`` with ``recipe`` (amax reduction over the TP x DP
    group, as Megatron does), or nothing when ``recipe`` is None (fp32/bf16 and the CPU emulation)."""
    if recipe is None:
        yield
        return
    import transformer_engine.pytorch as te
    from megatron.core import parallel_state

    group = None
    if parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_amax_reduction_group(with_context_parallel=True)
    with te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group):
        yield

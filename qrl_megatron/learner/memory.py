"""What the learner holds per rank: base weights, adapters, gradients and optimizer state, in bytes.

:func:`learner_memory` measures a live learner (the tensors it really allocated); :func:`planned_learner_memory`
computes the same items for any model by building this rank's Megatron stage on the ``meta`` device (shapes only,
no memory) and applying the same LoRA / frozen-base code, then counting gradients and Adam state with the rules
Megatron follows: an fp32 gradient buffer per trainable parameter (``grad_reduce_in_fp32``), two fp32 Adam moments,
and an fp32 master copy when the parameters are bf16. A test checks that the two agree exactly on the tiny model.

``python -m qrl_megatron.learner.memory CONFIG [key=value ...]`` is an alias of ``qrl-plan`` (qrl_megatron/plan.py),
which prints the whole per-GPU plan of a recipe (learner and engine) without loading any weights.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from qrl_megatron.lora.layers import iter_lora_linears

__all__ = ["learner_memory", "planned_learner_memory"]

ITEMS = ("base_weights", "adapter", "trained_norms", "gradients", "optimizer_state")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _weights(module: torch.nn.Module) -> dict[str, int]:
    lora_params = {id(p) for m in iter_lora_linears(module) for p in m.parameters()}
    out = dict.fromkeys(("base_weights", "adapter", "trained_norms", "full_parameters"), 0)
    for p in module.parameters():
        if id(p) in lora_params:
            out["adapter"] += _nbytes(p)
        elif not p.requires_grad:
            out["base_weights"] += _nbytes(p)
        elif lora_params:
            out["trained_norms"] += _nbytes(p)
        else:
            out["full_parameters"] += _nbytes(p)
    out["base_weights"] += sum(m.base_bytes() for m in iter_lora_linears(module))  # frozen NVFP4 codes + scales
    return out


def _trainable_numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def learner_memory(learner: Any) -> dict[str, int]:
    """Bytes this rank's learner holds now (call after the first optimizer step: Adam allocates its state lazily)."""
    module = learner.model.module
    out = _weights(module)
    out["gradients"] = sum(
        _nbytes(g) for p in module.parameters() if p.requires_grad and (g := getattr(p, "main_grad", None)) is not None
    )
    optimizer = getattr(learner.optimizer, "optimizer", None)
    state = 0
    if optimizer is not None:
        for s in optimizer.state.values():
            state += sum(_nbytes(t) for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        if any(p.dtype != torch.float32 for p in module.parameters() if p.requires_grad):  # fp32 master copies
            state += sum(_nbytes(p) for g in optimizer.param_groups for p in g["params"])
    out["optimizer_state"] = state
    out["total"] = sum(v for k, v in out.items())
    return out


def build_meta_stage(spec: Any, layout: Any, cfg: Any, frozen_base_shapes: bool = True) -> torch.nn.Module:
    """This rank's stage as the learner builds it (LoRA and the frozen NVFP4 base included), on the meta device.

    Needs megatron's parallel state for ``layout`` (``init_distributed``). The NVFP4 base is described by its
    checkpoint layout (``te_ext.formats``), so no weights are read."""
    from qrl_megatron.learner.model import build_gpt_model
    from qrl_megatron.lora.adapter import MODULE_PATHS, module_shape
    from qrl_megatron.lora.layers import apply_lora
    from qrl_megatron.models.checkpoint_reader import StateDictReader
    from te_ext.formats import format_descriptor

    params_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    with torch.device("meta"):
        module = build_gpt_model(
            spec, layout, params_dtype=params_dtype, config_overrides={"perform_initialization": False}, use_te=False
        )
        if cfg.lora.enabled:
            frozen: StateDictReader | None = None
            if cfg.base_format == "nvfp4" and frozen_base_shapes:
                fmt = format_descriptor("nvfp4")
                codes: dict[str, torch.Tensor] = {}
                for i in range(spec.num_layers):
                    for m, path in MODULE_PATHS.items():
                        for suffix, shape, dtype in fmt.checkpoint_layout(module_shape(spec, m)):
                            codes[f"model.layers.{i}.{path}.{suffix}"] = torch.empty(shape, dtype=dtype)
                frozen = StateDictReader(codes)
            apply_lora(module, spec, layout, cfg.lora.adapter(), seed=0, frozen_base=frozen)
    return module


def planned_learner_memory(spec: Any, layout: Any, cfg: Any, frozen_base_shapes: bool = True) -> dict[str, int]:
    """The same items for ``spec`` at ``layout`` with learner config ``cfg``, computed on the meta device.

    Needs megatron's parallel state for ``layout`` (``init_distributed``): the stage is built as the learner builds
    it (:func:`build_meta_stage`). ``qrl_megatron.plan`` derives any TP x PP x DP layout from the TP1 x PP1 build.
    """
    module = build_meta_stage(spec, layout, cfg, frozen_base_shapes)
    params_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    out = _weights(module)
    trainable = _trainable_numel(module)
    out["gradients"] = trainable * 4  # megatron DDP: fp32 grad buffer (grad_reduce_in_fp32)
    shard = layout.dp if cfg.distributed_optimizer else 1
    master = 4 if params_dtype != torch.float32 else 0
    out["optimizer_state"] = -(-trainable * (8 + master) // shard)  # Adam's two fp32 moments (+ fp32 master)
    out["total"] = sum(v for k, v in out.items())
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m qrl_megatron.learner.memory CONFIG ...``: an alias of ``qrl-plan`` (the whole per-GPU plan)."""
    from qrl_megatron.plan import main as plan_main

    return plan_main(argv)


if __name__ == "__main__":
    sys.exit(main())

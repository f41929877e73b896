"""Transformer Engine (TE) training recipes with capability checks.

``build_recipe(name, **opts)`` returns the TE recipe object for one of

=============  =====================================  ========================================
name           TE class                               needs
=============  =====================================  ========================================
``delayed``    ``DelayedScaling`` (FP8, amax history)  SM >= 8.9 (Ada, Hopper, Blackwell)
``current``    ``Float8CurrentScaling`` (FP8)          SM >= 8.9
``blockwise``  ``Float8BlockScaling`` (FP8, 128x128)   SM >= 9.0 (Hopper, Blackwell)
``mxfp8``      ``MXFP8BlockScaling``                   SM >= 10.0 (Blackwell)
``nvfp4``      ``NVFP4BlockScaling``                   SM >= 10.0 (Blackwell)
=============  =====================================  ========================================

TE itself is imported only inside ``build_recipe``. ``check_capability(name, sm, te_available)`` is a pure
function (no torch.cuda / TE access) so every branch is unit-testable on a CPU machine.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

RECIPES = ("delayed", "current", "blockwise", "mxfp8", "nvfp4")

TE_CLASS = {
    "delayed": "DelayedScaling",
    "current": "Float8CurrentScaling",
    "blockwise": "Float8BlockScaling",
    "mxfp8": "MXFP8BlockScaling",
    "nvfp4": "NVFP4BlockScaling",
}

MIN_SM: dict[str, tuple[int, int]] = {
    "delayed": (8, 9),
    "current": (8, 9),
    "blockwise": (9, 0),
    "mxfp8": (10, 0),
    "nvfp4": (10, 0),
}

_FORMAT_KEYS = ("fp8_format", "fp4_format")


class CapabilityError(RuntimeError):
    """The requested low-precision recipe cannot run here; the message says why and what to use instead."""


def _sm_str(sm: tuple[int, int]) -> str:
    names = {8: "Ampere/Ada", 9: "Hopper", 10: "Blackwell", 12: "Blackwell (consumer)"}
    return f"SM {sm[0]}.{sm[1]} ({names.get(sm[0], 'unknown architecture')})"


def check_capability(name: str, sm: tuple[int, int] | None, te_available: bool) -> None:
    """Raise ``CapabilityError`` (or ``ValueError`` for an unknown name) unless recipe ``name`` can run.

    ``sm``: CUDA compute capability ``(major, minor)`` of the device, or None when there is no CUDA device.
    ``te_available``: whether ``transformer_engine`` is importable.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown Transformer Engine recipe {name!r}; expected one of {RECIPES}")
    if not te_available:
        raise CapabilityError(
            f"recipe {name!r} needs Transformer Engine, which is not installed. TE needs a CUDA GPU and a CUDA "
            "build of PyTorch (it cannot be installed on a CPU machine). On CPU use learner.precision=fp8 (or nvfp4): "
            "without TE it runs emulated (te_ext.emulation fake-quantizes weights and activations in torch with the "
            "same number formats), or train in bf16/fp32."
        )
    if sm is None:
        raise CapabilityError(
            f"recipe {name!r} needs a CUDA GPU, but no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the "
            "driver). Without a GPU learner.precision=fp8 (or nvfp4) runs emulated on CPU (te_ext.emulation)."
        )
    need = MIN_SM[name]
    if tuple(sm) >= need:
        return
    here = _sm_str((int(sm[0]), int(sm[1])))
    if name == "nvfp4":
        raise CapabilityError(
            f"NVFP4 training (TE NVFP4BlockScaling) needs Blackwell, SM >= 10.0; this GPU is {here}. On Hopper "
            "use NVFP4 weight-only for the rollout engine (rollout.quant=nvfp4: W4A16, vLLM's Marlin kernel) and "
            "train with an FP8 recipe ('blockwise' or 'current') or in bf16; a frozen NVFP4 base for LoRA training "
            "is dequantized on the fly and works on Hopper too."
        )
    if name == "mxfp8":
        raise CapabilityError(
            f"MXFP8 (TE MXFP8BlockScaling) needs Blackwell, SM >= 10.0; this GPU is {here}. "
            "On Hopper use recipe 'blockwise' (FP8 with 128x128 block scales) or 'current' (per-tensor)."
        )
    if name == "blockwise":
        raise CapabilityError(
            f"FP8 block scaling (TE Float8BlockScaling) needs SM >= 9.0 (Hopper or newer); this GPU is {here}. "
            + ("Use recipe 'current' or 'delayed' (per-tensor FP8)." if tuple(sm) >= (8, 9) else "Train in bf16.")
        )
    raise CapabilityError(
        f"FP8 (recipe {name!r}) needs SM >= 8.9 (Ada, Hopper or Blackwell) for FP8 tensor cores; this GPU is "
        f"{here}. Train in bf16, or study FP8 numerics without FP8 hardware with learner.precision=fp8 on a "
        "machine without Transformer Engine (it then runs emulated, te_ext.emulation)."
    )


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def device_sm() -> tuple[int, int] | None:
    """Compute capability of the current CUDA device, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return int(major), int(minor)


def build_recipe(name: str, *, sm: tuple[int, int] | None = None, check: bool = True, **opts: Any) -> Any:
    """Build the TE recipe ``name`` with keyword options passed to the TE class.

    Format options may be given as strings (``fp8_format="hybrid"``, ``"e4m3"``; ``fp4_format="e2m1"``).
    ``sm`` overrides the detected compute capability (for tests); ``check=False`` skips the capability check.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown Transformer Engine recipe {name!r}; expected one of {RECIPES}")
    if check:
        check_capability(name, sm if sm is not None else device_sm(), te_available())
    try:
        recipe_mod = importlib.import_module("transformer_engine.common.recipe")
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise CapabilityError(
            "Transformer Engine could not be imported (transformer_engine.common.recipe): "
            f"{e}. TE needs CUDA; on CPU learner.precision=fp8 runs emulated."
        ) from e
    kwargs = dict(opts)
    for key in _FORMAT_KEYS:
        if isinstance(kwargs.get(key), str):
            kwargs[key] = getattr(recipe_mod.Format, kwargs[key].upper())
    cls = getattr(recipe_mod, TE_CLASS[name])
    return cls(**kwargs)

"""The LoRA adapter as Hugging Face PEFT names it: tensor names, shapes, bytes and ``adapter_config.json``.

Pure (no processes, no Megatron): the learner's gather, the adapter sync, the engine's in-memory swap and the
export all speak these names, so an adapter streamed to vLLM is byte for byte the ``adapter_model.safetensors``
that ``peft`` loads.

PEFT layout for an HF linear ``W: [out, in]`` at ``model.layers.{i}.{module}``::

    base_model.model.model.layers.{i}.{module}.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.{module}.lora_B.weight   [out, r]

and the layer computes ``x W^T + (alpha / r) * dropout(x) A^T B^T``. The adapter's size is therefore
``sum over layers and targets of r * (in + out)`` parameters (bf16 on the wire: 2 bytes each).
"""

from __future__ import annotations

from dataclasses import dataclass

from qrl_megatron.models.registry import ModelSpec

__all__ = [
    "ADAPTER_PREFIX",
    "DEFAULT_TARGETS",
    "MODULE_PATHS",
    "NORM_NAMES",
    "AdapterSpec",
    "adapter_bytes",
    "adapter_shapes",
    "lora_tensor_name",
    "norm_shapes",
    "peft_adapter_config",
]

ADAPTER_PREFIX = "base_model.model."
# HF module name -> its path inside a decoder layer
MODULE_PATHS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
DEFAULT_TARGETS: tuple[str, ...] = tuple(MODULE_PATHS)
# The RMSNorm weights QeRL's scripts also train (learner.lora.train_norms): the two per-layer norms
NORM_NAMES = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class AdapterSpec:
    """What the engine and the export need to know about the adapter (the learner's ``learner.lora``)."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    train_norms: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def module_shape(spec: ModelSpec, module: str) -> tuple[int, int]:
    """(out, in) of HF linear ``module``."""
    h, d = spec.hidden_size, spec.kv_channels
    shapes = {
        "q_proj": (spec.num_attention_heads * d, h),
        "k_proj": (spec.num_query_groups * d, h),
        "v_proj": (spec.num_query_groups * d, h),
        "o_proj": (h, spec.num_attention_heads * d),
        "gate_proj": (spec.ffn_hidden_size, h),
        "up_proj": (spec.ffn_hidden_size, h),
        "down_proj": (h, spec.ffn_hidden_size),
    }
    if module not in shapes:
        raise ValueError(f"learner.lora.targets: unknown module {module!r}; choose from {list(shapes)}")
    return shapes[module]


def lora_tensor_name(layer: int, module: str, which: str) -> str:
    """PEFT name of ``lora_A`` / ``lora_B`` of ``module`` in decoder layer ``layer`` (global index)."""
    return f"{ADAPTER_PREFIX}model.layers.{layer}.{MODULE_PATHS[module]}.lora_{which}.weight"


def adapter_shapes(
    spec: ModelSpec, rank: int, targets: tuple[str, ...] = DEFAULT_TARGETS
) -> dict[str, tuple[int, ...]]:
    """Every adapter tensor (PEFT name -> shape), layer by layer in ``targets`` order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(spec.num_layers):
        for module in targets:
            out, inp = module_shape(spec, module)
            shapes[lora_tensor_name(layer, module, "A")] = (rank, inp)
            shapes[lora_tensor_name(layer, module, "B")] = (out, rank)
    return shapes


def norm_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The trained per-layer RMSNorm weights (HF names, as the full-weight sync sends them)."""
    return {f"model.layers.{i}.{n}.weight": (spec.hidden_size,) for i in range(spec.num_layers) for n in NORM_NAMES}


def adapter_bytes(spec: ModelSpec, rank: int, targets: tuple[str, ...] = DEFAULT_TARGETS, bytes_per: int = 2) -> int:
    """``bytes_per * r * sum(in + out)`` over layers and targets: what one adapter sync streams (norms excluded)."""
    total = 0
    for shape in adapter_shapes(spec, rank, targets).values():
        total += shape[0] * shape[1]
    return total * bytes_per


def peft_adapter_config(adapter: AdapterSpec, base_model_name_or_path: str) -> dict[str, object]:
    """``adapter_config.json`` that ``peft.PeftModel.from_pretrained`` and ``vllm serve --lora-modules`` read."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": sorted(adapter.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }

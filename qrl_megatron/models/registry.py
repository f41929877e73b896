"""Model registry: the architecture facts the learner, the bridge and the rollout engines share.

A :class:`ModelSpec` is read from a Hugging Face config (``config.json``) and turned into a megatron-core
:class:`~megatron.core.transformer.TransformerConfig` for a given TP/PP layout.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelSpec", "load_spec", "spec_from_hf_config", "transformer_config"]

# HF architecture class name -> our arch key. Qwen2ForCausalLM covers Qwen2 and Qwen2.5.
SUPPORTED_ARCHITECTURES: dict[str, str] = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
_MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama"}


@dataclass(frozen=True)
class ModelSpec:
    """Shape and architecture of a decoder-only Qwen2/Llama model (pre-norm RMSNorm, SwiGLU, RoPE, GQA)."""

    arch: str  # "qwen2" | "llama"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # num_key_value_heads
    ffn_hidden_size: int  # intermediate_size
    max_position_embeddings: int
    rope_theta: float
    norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: True, Llama: False
    head_dim: int | None = None  # None: hidden_size // num_attention_heads

    def __post_init__(self) -> None:
        if self.arch not in _MODEL_TYPES:
            raise ValueError(f"ModelSpec.arch must be one of {sorted(_MODEL_TYPES)}, got {self.arch!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of num_query_groups "
                f"(num_key_value_heads) {self.num_query_groups}"
            )

    @property
    def kv_channels(self) -> int:
        """Per-head dimension."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _rope_theta(cfg: Any) -> float:
    # transformers >= 5 keeps RoPE settings in ``rope_parameters``; older configs have rope_theta/rope_scaling.
    params = _get(cfg, "rope_parameters")
    scaling = _get(cfg, "rope_scaling")
    if isinstance(params, Mapping):
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", _get(cfg, "rope_theta", 10000.0))
    else:
        rope_type = "default"
        theta = _get(cfg, "rope_theta", 10000.0)
    if isinstance(scaling, Mapping):
        rope_type = scaling.get("rope_type", scaling.get("type", rope_type))
    if rope_type not in (None, "default"):
        raise ValueError(f"RoPE scaling type {rope_type!r} is not supported (only the default RoPE)")
    return float(theta)


def spec_from_hf_config(hf_config: Any) -> ModelSpec:
    """Build a :class:`ModelSpec` from a transformers config object or a ``config.json`` dict."""
    archs = _get(hf_config, "architectures") or []
    model_type = _get(hf_config, "model_type")
    arch = None
    for name in archs:
        if name in SUPPORTED_ARCHITECTURES:
            arch = SUPPORTED_ARCHITECTURES[name]
            break
    if arch is None and not archs:
        arch = _MODEL_TYPES.get(model_type)
    if arch is None:
        raise ValueError(
            f"unsupported model architecture {list(archs) or model_type!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    hidden_act = _get(hf_config, "hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"hidden_act {hidden_act!r} is not supported (SwiGLU with silu only)")
    if arch == "qwen2" and _get(hf_config, "use_sliding_window", False):
        raise ValueError("Qwen2 use_sliding_window=True is not supported")
    if arch == "llama":
        if _get(hf_config, "attention_bias", False):
            raise ValueError("Llama attention_bias=True is not supported (it also adds an o_proj bias)")
        if _get(hf_config, "mlp_bias", False):
            raise ValueError("Llama mlp_bias=True is not supported")

    hidden = int(_get(hf_config, "hidden_size"))
    heads = int(_get(hf_config, "num_attention_heads"))
    head_dim = _get(hf_config, "head_dim")
    head_dim = None if head_dim is None or int(head_dim) == hidden // heads else int(head_dim)
    kv_heads = _get(hf_config, "num_key_value_heads")
    return ModelSpec(
        arch=arch,
        vocab_size=int(_get(hf_config, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(_get(hf_config, "num_hidden_layers")),
        num_attention_heads=heads,
        num_query_groups=int(kv_heads if kv_heads is not None else heads),
        ffn_hidden_size=int(_get(hf_config, "intermediate_size")),
        max_position_embeddings=int(_get(hf_config, "max_position_embeddings")),
        rope_theta=_rope_theta(hf_config),
        norm_eps=float(_get(hf_config, "rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(_get(hf_config, "tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2",
        head_dim=head_dim,
    )


def load_spec(model_dir: str | Path) -> ModelSpec:
    """Read ``model_dir/config.json`` (no transformers import, no network)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    return spec_from_hf_config(json.loads(path.read_text()))


def transformer_config(
    spec: ModelSpec,
    tp: int,
    pp: int,
    params_dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> TransformerConfig:
    """megatron-core TransformerConfig for ``spec`` on a TP x PP layout.

    Pre-norm RMSNorm, SwiGLU (gated silu), RoPE, GQA, no linear biases except the q/k/v bias of Qwen2, no
    dropout, no fusions (they are CUDA kernels or differ numerically from HF). On CPU:
    ``use_cpu_initialization=True`` (also makes TP=1 and TP>1 initialise identically) and
    ``batch_p2p_comm=False`` (batched p2p gives wrong gradients on gloo with interleaved PP).
    ``overrides`` are set last and win.
    """
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    on_cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels,
        ffn_hidden_size=spec.ffn_hidden_size,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=False,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        batch_p2p_comm=not on_cpu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)

"""Model registry: the architecture facts the learner, the bridge and the rollout engines share.

A :class:`ModelSpec` is read from a Hugging Face config (``config.json``) and turned into a megatron-core
:class:`~megatron.core.transformer.TransformerConfig` for a given TP/PP layout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_ROPE_TYPES",
    "Llama3RopeScaling",
    "ModelSpec",
    "load_spec",
    "rope_inv_freq",
    "spec_from_hf_config",
    "transformer_config",
]

# HF architecture class name -> our arch key. Qwen2ForCausalLM covers Qwen2 and Qwen2.5. (Qwen3 last: error
# messages list them in this order.)
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama", "qwen3": "qwen3"}
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class Llama3RopeScaling:
    """The ``llama3`` RoPE scaling of Llama 3.1+ (HF ``rope_type: llama3``): frequencies whose wavelength exceeds
    ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, those shorter than
    ``original_max_position_embeddings / high_freq_factor`` are kept, the band between is interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if not self.factor >= 1.0:
            raise ValueError(f"rope_scaling.factor must be >= 1 for llama3 RoPE, got {self.factor}")
        if not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must exceed rope_scaling.low_freq_factor "
                f"({self.low_freq_factor}) > 0 for llama3 RoPE"
            )
        if self.original_max_position_embeddings < 1:
            raise ValueError(
                "rope_scaling.original_max_position_embeddings must be a positive integer, got "
                f"{self.original_max_position_embeddings}"
            )


@dataclass(frozen=True)
class ModelSpec:
    """Shape and architecture of a decoder-only Qwen2/Qwen3/Llama model (pre-norm RMSNorm, SwiGLU, RoPE, GQA)."""

    arch: str  # "qwen2" | "qwen3" | "llama"
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
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k (weights [head_dim]) before RoPE
    rope_scaling: Llama3RopeScaling | None = None  # None: plain RoPE

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


def _rope(cfg: Any) -> tuple[float, Llama3RopeScaling | None]:
    """RoPE base and scaling from either config form.

    transformers >= 5 writes one ``rope_parameters`` dict (``rope_type``, ``rope_theta`` and the scaling keys);
    published hub configs have a top-level ``rope_theta`` and a ``rope_scaling`` dict (``rope_type`` or the older
    ``type``), or ``rope_scaling: null``. Both are read; where both are present their keys agree (transformers
    derives one from the other), so they are merged.
    """
    merged: dict[str, Any] = {}
    field = "rope_parameters"
    for key in ("rope_parameters", "rope_scaling"):
        value = _get(cfg, key)
        if isinstance(value, Mapping):
            merged.update(value)
            field = key
        elif value is not None:
            raise ValueError(f"config.json {key} must be a mapping or null, got {value!r}")
    theta = merged.get("rope_theta", _get(cfg, "rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    partial = merged.get("partial_rotary_factor", _get(cfg, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(
            f"config.json partial_rotary_factor={partial} is not supported (rotary on the whole head only)"
        )
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        key = "rope_type" if "rope_type" in merged else "type"
        raise ValueError(
            f"config.json {field}.{key} {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if merged.get(k) is None]
    if missing:
        raise ValueError(f"config.json {field} of rope_type 'llama3' lacks {', '.join(missing)}; add them")
    return float(theta), Llama3RopeScaling(
        factor=float(merged["factor"]),
        low_freq_factor=float(merged["low_freq_factor"]),
        high_freq_factor=float(merged["high_freq_factor"]),
        original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
    )


def rope_inv_freq(spec: ModelSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim / 2]`` (fp32), computed exactly as transformers does for the spec.

    The one place the learner's RoPE frequencies come from. megatron-core 0.19's ``RotaryEmbedding`` can apply the
    llama3 scaling only with ``low_freq_factor=1``, ``high_freq_factor=4`` and ``original_max_position_embeddings=
    8192`` hard-coded (only ``rope_scaling_factor`` is an argument), so a model with other values (and the small
    test models) would silently get other frequencies; ``build_gpt_model`` overwrites the module's ``inv_freq``
    with this tensor instead. The arithmetic follows ``transformers.modeling_rope_utils`` (default and llama3) op
    for op, so the fp32 learner equals an fp32 transformers forward.
    """
    dim = spec.kv_channels
    base = spec.rope_theta
    # made on `device` (not moved there): under a `torch.device("meta")` context (the planner's parameter count) an
    # arange without a device is a meta tensor, which cannot be copied into the CPU buffer it replaces
    positions = torch.arange(0, dim, 2, dtype=torch.int64, device=device)
    inv_freq = 1.0 / (base ** (positions.to(dtype=torch.float) / dim))
    scaling = spec.rope_scaling
    if scaling is None:
        return inv_freq
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (low frequencies) are divided by factor, short ones kept, the band between interpolated
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


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
        field = f"architectures {list(archs)}" if archs else f"model_type {model_type!r}"
        raise ValueError(
            f"config.json {field} is not a supported model architecture; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    hidden_act = _get(hf_config, "hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"hidden_act {hidden_act!r} is not supported (SwiGLU with silu only)")
    if arch in ("qwen2", "qwen3") and _get(hf_config, "use_sliding_window", False):
        raise ValueError(f"config.json use_sliding_window=true is not supported for {arch}; set it to false")
    if arch == "qwen3" and _get(hf_config, "attention_bias", False):
        raise ValueError("config.json attention_bias=true is not supported for Qwen3 (it also adds an o_proj bias)")
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
    rope_theta, rope_scaling = _rope(hf_config)
    return ModelSpec(
        arch=arch,
        vocab_size=int(_get(hf_config, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(_get(hf_config, "num_hidden_layers")),
        num_attention_heads=heads,
        num_query_groups=int(kv_heads if kv_heads is not None else heads),
        ffn_hidden_size=int(_get(hf_config, "intermediate_size")),
        max_position_embeddings=int(_get(hf_config, "max_position_embeddings")),
        rope_theta=rope_theta,
        norm_eps=float(_get(hf_config, "rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(_get(hf_config, "tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2",
        head_dim=head_dim,
        qk_norm=arch == "qwen3",
        rope_scaling=rope_scaling,
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

    Pre-norm RMSNorm, SwiGLU (gated silu), RoPE, GQA, no linear biases except the q/k/v bias of Qwen2, the
    per-head q/k RMSNorm of Qwen3 (``qk_layernorm``; the layer spec must be built with it too), no dropout, no fusions (they are CUDA kernels or differ numerically from HF). On CPU:
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
        qk_layernorm=spec.qk_norm,
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

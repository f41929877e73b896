"""Small models of the real architecture families, built locally with ``transformers`` (never downloaded).

Each family keeps what makes the published models of that family different from each other: Qwen2 (q/k/v bias,
tied embeddings, like Qwen2.5-0.5B/1.5B), Qwen2.5 (untied, like 7B-72B), Qwen3 (q/k RMSNorm per head, an explicit
``head_dim`` that is not hidden/heads, no bias), Llama 3.1 (the ``llama3`` RoPE scaling, untied, like 8B/70B) and
Llama 3.2 (the same, tied, like 1B/3B). Shapes are shrunk (hidden 128, 4 layers, 4 query / 2 KV heads, so TP=2 and
PP=2 both divide; head_dim 32, the smallest vLLM's CPU attention runs -- it rejects 16) and the folder is written
as hubs publish it: sharded safetensors with ``model.safetensors.index.json``, ``config.json``,
``generation_config.json`` and a tokenizer (the tiny model's character tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qrl_megatron.models.tiny import EOS_TOKEN_ID, PAD_TOKEN_ID, build_tokenizer, init_weights

__all__ = ["FAMILIES", "build_family_model", "family_hf_config"]

_COMMON: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    initializer_range=0.02,
    bos_token_id=None,
    eos_token_id=EOS_TOKEN_ID,
    pad_token_id=PAD_TOKEN_ID,
)
# Llama 3.1's published scaling, with original_max_position_embeddings shrunk so that positions of a short test
# sequence already fall in the scaled (low-frequency) band.
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# family -> (HF architecture, config class name, settings on top of _COMMON)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen2": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        dict(
            tie_word_embeddings=True,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "qwen2.5": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        dict(
            tie_word_embeddings=False,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "qwen3": (
        "Qwen3ForCausalLM",
        "Qwen3Config",
        dict(
            head_dim=64,  # hidden/heads = 32: the explicit head_dim must win
            tie_word_embeddings=False,
            attention_bias=False,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "llama3": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(tie_word_embeddings=False, attention_bias=False, mlp_bias=False, rope_parameters=dict(_LLAMA3_ROPE)),
    ),
    "llama3-tied": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(tie_word_embeddings=True, attention_bias=False, mlp_bias=False, rope_parameters=dict(_LLAMA3_ROPE)),
    ),
}


def family_hf_config(family: str, **overrides: Any) -> Any:
    """The transformers config object of a small ``family`` model (``overrides`` win)."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    architecture, config_class, settings = FAMILIES[family]
    kwargs = {**_COMMON, **settings, **overrides}
    return getattr(transformers, config_class)(architectures=[architecture], dtype="bfloat16", **kwargs)


def build_family_model(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | int = "100KB",
    **overrides: Any,
) -> Path:
    """Write a small ``family`` model to ``out_dir`` as a sharded HF folder; returns ``out_dir``.

    Weights are deterministic for a given family, seed and shape (see :func:`init_weights`); ``dtype`` is the
    on-disk dtype (bf16 as most hubs publish, fp32/fp16 to test the loader's casts).
    """
    import transformers

    config = family_hf_config(family, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = getattr(transformers, FAMILIES[family][0])(config)
    finally:
        torch.set_default_dtype(torch_default)
    init_weights(model, seed)
    model.to(dtype)  # type: ignore[arg-type]
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    saved = json.loads((out / "config.json").read_text())
    saved["torch_dtype"] = str(dtype).removeprefix("torch.")  # what older readers look for
    (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    transformers.GenerationConfig(
        eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID, bos_token_id=None
    ).save_pretrained(str(out))
    build_tokenizer(out, vocab_size=config.vocab_size, model_max_length=config.max_position_embeddings)
    return out

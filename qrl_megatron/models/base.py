"""The base model folder of a run: built locally for `model.source=tiny`, else a local HF folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qrl_megatron.models.config import ModelConfig


def prepare_base_model(model: ModelConfig, cache_dir: str | Path) -> Path:
    """The base model folder: ``model.source`` itself, or the tiny model built once under ``cache_dir``."""
    if model.source != "tiny":
        return Path(model.source)
    from qrl_megatron.models.tiny import build_tiny_model

    shape = model.tiny
    return build_tiny_model(Path(cache_dir) / shape.cache_name(model.init_seed), shape, model.init_seed)


def load_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def sequence_length(tokenizer: Any, task: Any, max_new_tokens: int, max_positions: int) -> int:
    """Fixed learner sequence length: the longest prompt plus the completion budget, rounded up to 8."""
    longest_prompt = max(
        len(tokenizer.encode(p, add_special_tokens=False)) for split in task.values() for p in split["prompt"]
    )
    longest_answer = max(len(tokenizer.encode(a, add_special_tokens=False)) + 1 for a in task["train"]["answer"])
    needed = longest_prompt + max(max_new_tokens, longest_answer)
    length = -(-needed // 8) * 8
    if length > max_positions:
        raise ValueError(
            f"prompts of {longest_prompt} tokens plus rollout.max_new_tokens={max_new_tokens} exceed the model's "
            f"{max_positions} positions; shorten the task or rollout.max_new_tokens"
        )
    return length

"""The base model folder of a run (built locally for `model.source=tiny`, a local HF folder, or a hub id read
from the local HF cache) and its tokenizer."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from qrl_megatron.config_fields import ConfigError
from qrl_megatron.models.checkpoint_reader import CheckpointReader
from qrl_megatron.models.config import ModelConfig, is_hub_id

logger = logging.getLogger(__name__)

# Published checkpoints that are not the safetensors the learner reads: Llama's original/ (consolidated .pth,
# as large as the model again), pickled *.bin twins of the safetensors, GGUF/ONNX exports.
_DOWNLOAD_IGNORE = ["original/*", "*.bin", "*.pth", "*.pt", "*.gguf", "*.onnx", "onnx/*"]


def _how_to_download(repo_id: str) -> str:
    return f"fetch it with `hf download {repo_id}` (or set HF_HUB_OFFLINE=0 to let the run download it)"


def resolve_hub_model(repo_id: str) -> Path:
    """The folder of hub model ``repo_id`` in the local HF cache (``HF_HOME`` / ``HF_HUB_CACHE``).

    Cached: the snapshot of ``refs/main``. Not cached: downloaded when downloads are allowed, else a one-line
    ``ConfigError`` naming the command that fetches it. A cached snapshot without ``config.json`` or any
    ``*.safetensors`` (an interrupted or partial download) is an error too: the loader would fail later and
    less clearly.
    """
    from huggingface_hub import is_offline_mode, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        if is_offline_mode():
            raise ConfigError(
                f"model.source={repo_id!r}: not in the local Hugging Face cache and downloads are off "
                f"(HF_HUB_OFFLINE=1); {_how_to_download(repo_id)}"
            ) from None
        # a warning, so it shows without logging set up: the user should know a (possibly large) download starts
        logger.warning("model.source=%s is not cached: downloading it into the Hugging Face cache", repo_id)
        folder = Path(snapshot_download(repo_id, ignore_patterns=_DOWNLOAD_IGNORE))
    missing = [
        what
        for what, ok in (
            ("config.json", (folder / "config.json").is_file()),
            ("*.safetensors", any(folder.glob("*.safetensors"))),
        )
        if not ok
    ]
    if missing:
        raise ConfigError(
            f"model.source={repo_id!r}: the cached copy in {folder} has no {' and no '.join(missing)} (a partial "
            f"download); {_how_to_download(repo_id)}"
        )
    return folder


def prepare_base_model(model: ModelConfig, cache_dir: str | Path) -> Path:
    """The base model folder: ``model.source`` itself (a local folder), its snapshot in the HF cache (a hub id),
    or the tiny model built once under ``cache_dir``."""
    if model.source != "tiny":
        if Path(model.source).is_dir() or not is_hub_id(model.source):
            return Path(model.source)
        return resolve_hub_model(model.source)
    from qrl_megatron.models.tiny import build_tiny_model

    shape = model.tiny
    return build_tiny_model(Path(cache_dir) / shape.cache_name(model.init_seed), shape, model.init_seed)


def load_hf_weights(model_dir: str | Path) -> CheckpointReader:
    """The HF weights of ``model_dir`` (sharded with ``model.safetensors.index.json``, or one file), lazily.

    Nothing is read but the headers: the learner reads only its shard's slices, and ``dict(...)`` of the result
    reads the whole state dict for code that wants it. A missing or inconsistent shard is a one-line error here.
    """
    return CheckpointReader(model_dir)


# Any one of these makes a loadable tokenizer: the fast tokenizer, a sentencepiece model (Llama 2, Mistral), a
# BPE vocabulary (with merges.txt, GPT-2 style), a tiktoken file.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")
_PAD_LOGGED: set[str] = set()


def load_tokenizer(model_dir: str | Path) -> Any:
    """The tokenizer of ``model_dir`` with its special tokens, and a pad token the batches can use.

    Models published without a pad token (Llama 3) get ``pad = eos``: pad only fills the positions that the
    loss and attention masks exclude, so reusing eos changes no result, and it keeps the vocabulary (and the
    embedding shape) as published. Said once in the log. A folder without tokenizer files, or a tokenizer with
    no eos token (completions could never end), is a one-line error naming the folder.
    """
    from transformers import AutoTokenizer

    folder = Path(model_dir)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder}: no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); copy the base model's "
            "tokenizer files into the folder"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"{folder}: the tokenizer defines no eos_token (tokenizer_config.json); completions cannot end"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        # once per folder and only on rank 0: every rank and every reload would repeat it otherwise
        if str(folder) not in _PAD_LOGGED and os.environ.get("RANK", "0") == "0":
            _PAD_LOGGED.add(str(folder))
            logger.warning(
                "%s has no pad token: padding with eos %r (id %d)", folder, tokenizer.eos_token, tokenizer.eos_token_id
            )
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

"""Config of the base model (`model.*`): the locally built tiny model, a local HF folder, or a hub id."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qrl_megatron.config_fields import ConfigError, doc
from qrl_megatron.models.tiny import TinyModelConfig

__all__ = ["ModelConfig", "is_hub_id"]

# `org/name` as the Hugging Face hub spells repo ids (huggingface_hub's validate_repo_id rules, with the org
# required: a bare `name` is far more often a mistyped local folder than a hub model).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def is_hub_id(source: str) -> bool:
    """True when ``source`` is spelled like a hub repo id (``Qwen/Qwen2.5-7B-Instruct``); says nothing of the cache."""
    return bool(_HUB_ID.match(source)) and ".." not in source and "--" not in source and not source.endswith(".")


@dataclass
class ModelConfig:
    source: str = doc(
        "tiny",
        "'tiny' builds the tiny Qwen2 model locally; else a local HF model folder, or a hub id (org/name) read "
        "from the local HF cache",
    )
    tiny: TinyModelConfig = doc(text="shape of the tiny model (used when source=tiny)", factory=TinyModelConfig)
    init_seed: int = doc(0, "seed of the tiny model's random init")

    def validate(self, prefix: str = "model") -> None:
        # Only the spelling of a hub id is checked here: whether the cache holds it is decided where the run
        # starts (models.base.prepare_base_model), so recipes validate on any machine, e.g. before a download.
        if self.source != "tiny" and not Path(self.source).is_dir() and not is_hub_id(self.source):
            raise ConfigError(
                f"{prefix}.source={self.source!r}: not 'tiny', not an existing local model folder and not a hub id "
                "(org/name)"
            )
        self.tiny.validate(f"{prefix}.tiny")

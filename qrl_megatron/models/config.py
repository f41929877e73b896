"""Config of the base model (`model.*`): the locally built tiny model or a local HF folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qrl_megatron.config_fields import ConfigError, doc
from qrl_megatron.models.tiny import TinyModelConfig

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    source: str = doc("tiny", "'tiny' builds the tiny Qwen2 model locally; else a local HF model folder")
    tiny: TinyModelConfig = doc(text="shape of the tiny model (used when source=tiny)", factory=TinyModelConfig)
    init_seed: int = doc(0, "seed of the tiny model's random init")

    def validate(self, prefix: str = "model") -> None:
        if self.source != "tiny" and not Path(self.source).is_dir():
            raise ConfigError(f"{prefix}.source={self.source!r}: not 'tiny' and not an existing local model folder")
        self.tiny.validate(f"{prefix}.tiny")

"""One typed config tree for the whole trainer.

Each component owns a dataclass, defined next to its code with the helpers of `qrl_megatron.config_fields`:
`learner/config.py` (learner, warmstart), `rollout/config.py` (rollout, algo.aqn), `algos/config.py` (algo,
algo.invariant_scaling), `bridge/config.py` (sync), `data/config.py` (task), `rewards/config.py` (reward), `evals/config.py` (eval), `models/config.py` (model; the tiny
shape is `models/tiny.py`'s), `train_config.py` (run, trainer). This module holds the OmegaConf structured root
`QRLConfig` with its cross-component checks, the loader and the reference, and re-exports the component classes.
YAML recipes in `configs/` are merged onto the root, then `key=value` dotlist overrides. Every field carries a
one-line doc in its metadata (shown by `qrl-train --help-config`); every check raises `ConfigError` (a
`ValueError`) that names the dotted key.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from qrl_megatron.algos.config import AlgoConfig, InvariantScalingConfig
from qrl_megatron.bridge.config import SyncConfig
from qrl_megatron.config_fields import ConfigError, check_choice, check_positive, check_range, doc
from qrl_megatron.data.config import TaskConfig
from qrl_megatron.evals.config import EvalConfig
from qrl_megatron.learner.config import LearnerConfig, WarmStartConfig
from qrl_megatron.models.config import ModelConfig
from qrl_megatron.models.tiny import TinyModelConfig
from qrl_megatron.plan import GPUConfig
from qrl_megatron.rewards.config import RewardConfig
from qrl_megatron.rollout.config import AQNConfig, RolloutConfig
from qrl_megatron.train_config import RunConfig, TrainerConfig

__all__ = [
    "AQNConfig",
    "AlgoConfig",
    "ConfigError",
    "EvalConfig",
    "GPUConfig",
    "InvariantScalingConfig",
    "LearnerConfig",
    "ModelConfig",
    "QRLConfig",
    "RewardConfig",
    "RolloutConfig",
    "RunConfig",
    "SyncConfig",
    "TaskConfig",
    "TinyModelConfig",
    "TrainerConfig",
    "WarmStartConfig",
    "check_choice",
    "check_positive",
    "check_range",
    "doc",
    "describe",
    "load_config",
    "reference_markdown",
    "to_dict",
    "to_yaml",
]


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class QRLConfig:
    seed: int = doc(0, "seed of data, sampling and initialisation")
    run: RunConfig = doc(text="outputs and logging", factory=RunConfig)
    model: ModelConfig = doc(text="which model", factory=ModelConfig)
    task: TaskConfig = doc(text="the verifiable task", factory=TaskConfig)
    warmstart: WarmStartConfig = doc(text="supervised warm-start before RL", factory=WarmStartConfig)
    learner: LearnerConfig = doc(text="Megatron learner", factory=LearnerConfig)
    rollout: RolloutConfig = doc(text="vLLM rollout engine", factory=RolloutConfig)
    reward: RewardConfig = doc(text="the verifier and the format reward", factory=RewardConfig)
    algo: AlgoConfig = doc(text="advantages and policy loss", factory=AlgoConfig)
    sync: SyncConfig = doc(text="learner -> engine weight sync", factory=SyncConfig)
    trainer: TrainerConfig = doc(text="the RL loop", factory=TrainerConfig)
    eval: EvalConfig = doc(text="held-out evaluation (greedy, pass@k, mean@k)", factory=EvalConfig)
    gpu: GPUConfig = doc(text="the GPU the memory plan is checked against (qrl-plan, qrl-train)", factory=GPUConfig)

    def validate(self) -> QRLConfig:
        for f in fields(self):
            value = getattr(self, f.name)
            if is_dataclass(value) and not isinstance(value, type):
                value.validate(f.name)  # type: ignore[attr-defined]
        batch = self.rollout.prompts_per_step * self.rollout.samples_per_prompt
        per_update = self.learner.dp * self.algo.minibatches
        if batch % per_update:
            raise ConfigError(
                f"rollout.prompts_per_step * rollout.samples_per_prompt = {batch} must be divisible by "
                f"learner.dp * algo.minibatches = {per_update}"
            )
        per_rank = batch // per_update
        if per_rank % self.learner.micro_batch_size and self.learner.micro_batch_size < per_rank:
            raise ConfigError(
                f"learner.micro_batch_size={self.learner.micro_batch_size} must divide the {per_rank} sequences "
                f"each DP rank gets per update"
            )
        if self.algo.overlong_buffer >= self.rollout.max_new_tokens:
            raise ConfigError(
                f"algo.overlong_buffer={self.algo.overlong_buffer} must be smaller than "
                f"rollout.max_new_tokens={self.rollout.max_new_tokens}"
            )
        lora = self.learner.lora
        if lora.enabled:
            # QeRL: learner and engine hold the same base (bf16, or the same NVFP4 codes), only the adapter moves
            if self.rollout.quant != self.learner.base_format:
                raise ConfigError(
                    f"rollout.quant={self.rollout.quant} with learner.lora.rank > 0: the engine must serve the base "
                    f"the learner holds (learner.base_format={self.learner.base_format}); set them equal"
                )
            if self.algo.kl_coef > 0:
                raise ConfigError("algo.kl_coef > 0 is not supported with learner.lora.rank > 0 (QeRL uses no KL)")
            if self.sync.method != "bridge":
                raise ConfigError("sync.method must be 'bridge' with learner.lora.rank > 0 (the adapter sync)")
            if self.trainer.save_every or self.trainer.checkpoint:
                raise ConfigError(
                    "trainer.save_every / trainer.checkpoint: LoRA runs are not resumable yet (their result is the "
                    "PEFT adapter in run.dir/adapter and the merged model in run.dir/final); set "
                    "trainer.save_every=0 trainer.checkpoint=false"
                )
            if self.rollout.tp != 1:
                raise ConfigError("rollout.tp must be 1 with learner.lora.rank > 0 (the in-memory adapter swap)")
        if self.rollout.engines > 1 and self.sync.tcp_port and self.sync.transport in ("tcp", "auto"):
            raise ConfigError(
                f"sync.tcp_port={self.sync.tcp_port} with rollout.engines={self.rollout.engines}: each engine's TCP "
                "weight stream listens on a port of its own; set sync.tcp_port=0 (any free port)"
            )
        if self.warmstart.batch_size % self.learner.dp:
            raise ConfigError(f"warmstart.batch_size must be divisible by learner.dp={self.learner.dp}")
        warm_per_rank = self.warmstart.batch_size // self.learner.dp
        if warm_per_rank % self.learner.micro_batch_size and self.learner.micro_batch_size < warm_per_rank:
            raise ConfigError(
                f"learner.micro_batch_size={self.learner.micro_batch_size} must divide the {warm_per_rank} warm-start "
                "sequences each DP rank gets (warmstart.batch_size / learner.dp)"
            )
        return self


# ---------------------------------------------------------------------------------------------------------------
def _known_keys(path: list[str]) -> list[str]:
    """Field names of the config node at `path` (for 'did you mean' suggestions)."""
    node: Any = QRLConfig()
    for part in path:
        node = getattr(node, part, None)
        if not is_dataclass(node):
            return []
    return [f.name for f in fields(node)]


def _translate(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and key:
        *parents, leaf = key.split(".")
        match = difflib.get_close_matches(leaf, _known_keys(parents), n=1, cutoff=0.5)
        suggestion = f" (did you mean '{'.'.join([*parents, match[0]])}'?)" if match else ""
        return ConfigError(f"unknown config key '{key}'{suggestion}")
    if isinstance(err, ValidationError) and key:
        first = str(err).splitlines()[0]
        return ConfigError(f"bad value for '{key}': {first}")
    return ConfigError(str(err).splitlines()[0])


_DOTLIST_RE = re.compile(r"^[A-Za-z_][\w.]*=")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> QRLConfig:
    """Merge a YAML recipe and `key=value` overrides onto the typed defaults, validate, return the dataclass."""
    schema = OmegaConf.structured(QRLConfig)
    try:
        merged: DictConfig = schema
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(
                    f"config file {str(p)!r} not found (recipes live in configs/, e.g. configs/tiny_cpu.yaml)"
                )
            loaded = OmegaConf.load(p)
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
            merged = OmegaConf.merge(merged, loaded)  # type: ignore[assignment]
        for item in overrides:
            if not _DOTLIST_RE.match(item):
                raise ConfigError(f"override {item!r} must look like key=value (e.g. learner.tp=2)")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))  # type: ignore[assignment]
        cfg: QRLConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _translate(err) from None
    return cfg.validate()


def to_yaml(cfg: QRLConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: QRLConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def describe(cls: type = QRLConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, one-line doc) for every leaf field: the config reference."""
    rows: list[tuple[str, Any, str]] = []
    instance = cls()
    for f in fields(cls):
        value = getattr(instance, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            rows.extend(describe(type(value), key + "."))
        else:
            rows.append((key, value, f.metadata.get("doc", "")))
    return rows


def reference_markdown() -> str:
    """docs/config.md: every key, its default and its doc (tests check the file is current)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `python -m qrl_megatron.config > docs/config.md`; every key can be set in a YAML recipe or as",
        "a `key=value` override on the `qrl-train` command line.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    lines += [f"| `{key}` | `{default!r}` | {text} |" for key, default, text in describe()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")

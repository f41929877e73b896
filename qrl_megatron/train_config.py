"""Config of a run's outputs (`run.*`) and of the RL loop (`trainer.*`), read by `qrl_megatron.train` and
`qrl_megatron.cli`."""

from __future__ import annotations

from dataclasses import dataclass

from qrl_megatron.config_fields import ConfigError, check_choice, check_positive, doc

__all__ = ["RunConfig", "TrainerConfig"]


@dataclass
class RunConfig:
    dir: str = doc("runs/tiny-grpo", "output folder: metrics.jsonl, eval.json, TensorBoard events, checkpoint")
    cache_dir: str = doc(".cache/qrl", "cache for locally built models and warm-start policies (shared by runs)")
    progress: bool = doc(True, "live one-line progress display on stderr")
    tensorboard: bool = doc(True, "write TensorBoard events under run.dir/tb")
    on_existing: str = doc("archive", "run.dir already holds a run: archive (move it to <dir>.<time>) or error")

    def validate(self, prefix: str = "run") -> None:
        if not self.dir:
            raise ConfigError(f"{prefix}.dir must be a folder path")
        check_choice(f"{prefix}.on_existing", self.on_existing, ("archive", "error"))


@dataclass
class TrainerConfig:
    max_steps: int = doc(60, "RL steps")
    eval_every: int = doc(0, "held-out greedy evaluation every N steps (0: only before and after RL)")
    max_time_s: float = doc(0.0, "stop the RL phase after this many seconds (0 = no limit)")
    checkpoint: bool = doc(True, "write a Megatron dist checkpoint to run.dir/checkpoint at the end")

    def validate(self, prefix: str = "trainer") -> None:
        check_positive(f"{prefix}.max_steps", self.max_steps, allow_zero=True)
        check_positive(f"{prefix}.eval_every", self.eval_every, allow_zero=True)
        check_positive(f"{prefix}.max_time_s", self.max_time_s, allow_zero=True)

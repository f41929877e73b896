"""Config of a run's outputs (`run.*`) and of the RL loop (`trainer.*`), read by `qrl_megatron.train` and
`qrl_megatron.cli`."""

from __future__ import annotations

from dataclasses import dataclass

from qrl_megatron.config_fields import ConfigError, check_choice, check_positive, doc
from te_ext.formats import EXPORT_FORMATS

__all__ = ["RunConfig", "TrainerConfig"]


@dataclass
class RunConfig:
    dir: str = doc(
        "runs/tiny-grpo", "output folder: metrics.jsonl, eval.json, TensorBoard events, checkpoint, final/ (HF folder)"
    )
    cache_dir: str = doc(".cache/qrl", "cache for locally built models and warm-start policies (shared by runs)")
    progress: bool = doc(True, "live one-line progress display on stderr")
    tensorboard: bool = doc(True, "write TensorBoard events under run.dir/tb")
    on_existing: str = doc("archive", "run.dir already holds a run: archive (move it to <dir>.<time>) or error")
    export_formats: list[str] = doc(
        text="quantized rollout folders written next to final/ at the end (run.dir/final-<fmt>/, for vllm serve): "
        "any of nvfp4, fp8, int8",
        factory=list,
    )

    def validate(self, prefix: str = "run") -> None:
        if not self.dir:
            raise ConfigError(f"{prefix}.dir must be a folder path")
        check_choice(f"{prefix}.on_existing", self.on_existing, ("archive", "error"))
        for fmt in self.export_formats:
            check_choice(f"{prefix}.export_formats", fmt, EXPORT_FORMATS)


@dataclass
class TrainerConfig:
    max_steps: int = doc(60, "RL steps")
    eval_every: int = doc(0, "held-out greedy evaluation every N steps (0: only before and after RL)")
    max_time_s: float = doc(0.0, "stop the RL phase after this many seconds (0 = no limit)")
    checkpoint: bool = doc(True, "write a Megatron dist checkpoint to run.dir/checkpoint at the end")
    save_every: int = doc(
        0, "write a resumable run checkpoint to run.dir/checkpoints/step_<N> every N steps (0: never)"
    )
    keep_checkpoints: int = doc(2, "run checkpoints kept; older ones are removed once a newer one is sealed")
    resume: str = doc(
        "auto", "'auto': continue the newest good checkpoint in run.dir, else start; 'never'; or a checkpoint path"
    )
    engine_restarts: int = doc(
        2, "times a step's rollout is retried on a restarted, re-synced engine after the engine died"
    )
    max_skipped_steps: int = doc(
        3, "consecutive steps with a non-finite loss/gradient (update skipped) that stop the run"
    )

    def validate(self, prefix: str = "trainer") -> None:
        check_positive(f"{prefix}.max_steps", self.max_steps, allow_zero=True)
        check_positive(f"{prefix}.eval_every", self.eval_every, allow_zero=True)
        check_positive(f"{prefix}.max_time_s", self.max_time_s, allow_zero=True)
        check_positive(f"{prefix}.save_every", self.save_every, allow_zero=True)
        check_positive(f"{prefix}.keep_checkpoints", self.keep_checkpoints)
        check_positive(f"{prefix}.max_skipped_steps", self.max_skipped_steps)
        check_positive(f"{prefix}.engine_restarts", self.engine_restarts, allow_zero=True)
        if not self.resume:
            raise ConfigError(f"{prefix}.resume must be 'auto', 'never' or a checkpoint folder")

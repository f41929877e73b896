"""Config of the Megatron learner (`learner.*`) and of the supervised warm-start before RL (`warmstart.*`)."""

from __future__ import annotations

from dataclasses import dataclass

from qrl_megatron.config_fields import check_choice, check_positive, check_range, doc

__all__ = ["LearnerConfig", "WarmStartConfig"]


@dataclass
class WarmStartConfig:
    enabled: bool = doc(True, "supervised warm-start on the task before RL (cached under run.cache_dir)")
    steps: int = doc(300, "optimizer steps of the warm-start")
    batch_size: int = doc(64, "sequences per warm-start step (global)")
    lr: float = doc(3e-3, "warm-start learning rate (AdamW, cosine to 10%)")

    def validate(self, prefix: str = "warmstart") -> None:
        check_positive(f"{prefix}.steps", self.steps, allow_zero=True)
        check_positive(f"{prefix}.batch_size", self.batch_size)
        check_positive(f"{prefix}.lr", self.lr)


@dataclass
class LearnerConfig:
    tp: int = doc(1, "tensor-parallel size of the Megatron learner")
    pp: int = doc(1, "pipeline-parallel size")
    dp: int = doc(1, "data-parallel size (world size = tp * pp * dp)")
    precision: str = doc(
        "fp32",
        "learner precision: fp32, bf16, or fp8/nvfp4 = fake-quantized compute on CPU, TE recipes on GPU "
        "(master weights stay in fp32)",
    )
    lr: float = doc(1e-4, "RL learning rate (AdamW), reached after learner.lr_warmup_steps")
    lr_warmup_steps: int = doc(10, "linear warm-up of the RL learning rate (Adam's first steps are sign-like)")
    lr_schedule: str = doc(
        "cosine", "after warm-up: constant, or cosine decay to lr * lr_min_ratio at trainer.max_steps"
    )
    lr_min_ratio: float = doc(0.1, "final learning rate of the cosine schedule, as a fraction of learner.lr")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    adam_beta2: float = doc(0.99, "AdamW beta2")
    grad_clip: float = doc(1.0, "global gradient-norm clip (0 = off)")
    micro_batch_size: int = doc(32, "sequences per micro-batch on one DP rank")
    distributed_optimizer: bool = doc(False, "shard optimizer state over DP (Megatron DistributedOptimizer)")
    threads: int = doc(0, "torch threads per learner process (0 = cores / processes)")

    def validate(self, prefix: str = "learner") -> None:
        for key in ("tp", "pp", "dp", "micro_batch_size"):
            check_positive(f"{prefix}.{key}", getattr(self, key))
        check_choice(f"{prefix}.precision", self.precision, ("fp32", "bf16", "fp8", "nvfp4"))
        check_positive(f"{prefix}.lr", self.lr)
        check_positive(f"{prefix}.lr_warmup_steps", self.lr_warmup_steps, allow_zero=True)
        check_choice(f"{prefix}.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        check_range(f"{prefix}.lr_min_ratio", self.lr_min_ratio, 0.0, 1.0)
        check_positive(f"{prefix}.weight_decay", self.weight_decay, allow_zero=True)
        check_range(f"{prefix}.adam_beta2", self.adam_beta2, 0.0, 0.99999)
        check_positive(f"{prefix}.grad_clip", self.grad_clip, allow_zero=True)
        check_positive(f"{prefix}.threads", self.threads, allow_zero=True)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

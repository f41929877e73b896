"""Config of the Megatron learner (`learner.*`) and of the supervised warm-start before RL (`warmstart.*`)."""

from __future__ import annotations

from dataclasses import dataclass

from qrl_megatron.config_fields import ConfigError, check_choice, check_positive, check_range, doc
from qrl_megatron.lora.adapter import DEFAULT_TARGETS, MODULE_PATHS, AdapterSpec

__all__ = ["LearnerConfig", "LoRAConfig", "WarmStartConfig"]


@dataclass
class LoRAConfig:
    rank: int = doc(0, "LoRA rank r (0: full-parameter training; > 0: QeRL mode, the base is frozen)")
    alpha: float = doc(32.0, "LoRA alpha; the adapter's output is scaled by alpha / rank")
    dropout: float = doc(0.0, "dropout on the adapter's input (PEFT's lora_dropout)")
    targets: list[str] = doc(
        text="HF linears that get an adapter (default: the seven of QeRL)", factory=lambda: list(DEFAULT_TARGETS)
    )
    train_norms: bool = doc(
        False, "also train the per-layer RMSNorm weights (QeRL's scripts do); they stream each step"
    )

    def validate(self, prefix: str = "learner.lora") -> None:
        check_positive(f"{prefix}.rank", self.rank, allow_zero=True)
        check_positive(f"{prefix}.alpha", self.alpha)
        check_range(f"{prefix}.dropout", self.dropout, 0.0, 0.99)
        if self.rank and not self.targets:
            raise ConfigError(f"{prefix}.targets is empty; name at least one of {list(MODULE_PATHS)}")
        for t in self.targets:
            check_choice(f"{prefix}.targets", t, tuple(MODULE_PATHS))
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"{prefix}.targets={self.targets} names a module twice")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def adapter(self) -> AdapterSpec:
        return AdapterSpec(self.rank, self.alpha, tuple(self.targets), self.dropout, self.train_norms)


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
    micro_batch_tokens: int = doc(
        0,
        "token budget per micro-batch (0: learner.micro_batch_size sequences each); > 0: length-sorted groups "
        "with count x padded longest length <= budget, each padded to its own longest (multiple of 8)",
    )
    recompute: str = doc(
        "none", "activation recompute in the backward: none, selective (core attention) or full (every layer)"
    )
    logprob_chunk_tokens: int = doc(
        1024, "tokens per chunk of the fp32 log-softmax for logprobs/entropy (0: one full [tokens, vocab] pass)"
    )
    distributed_optimizer: bool = doc(False, "shard optimizer state over DP (Megatron DistributedOptimizer)")
    offload_optimizer: bool = doc(
        False, "GPU: Adam state and fp32 master weights wait in pinned host memory during each rollout (needs CUDA)"
    )
    threads: int = doc(0, "torch threads per learner process (0 = cores / processes)")
    lora: LoRAConfig = doc(text="LoRA adapters on a frozen base (QeRL mode)", factory=LoRAConfig)
    base_format: str = doc(
        "bf16",
        "how the frozen base is held with LoRA: bf16 (dense, learner.precision dtype) or nvfp4 (the rollout "
        "engine's NVFP4 codes, decoded on the fly; needs rollout.quant=nvfp4)",
    )

    def validate(self, prefix: str = "learner") -> None:
        self.lora.validate(f"{prefix}.lora")
        check_choice(f"{prefix}.base_format", self.base_format, ("bf16", "nvfp4"))
        if self.base_format != "bf16" and not self.lora.enabled:
            raise ConfigError(
                f"{prefix}.base_format={self.base_format} freezes the base, which only LoRA training allows; "
                f"set {prefix}.lora.rank > 0 (QeRL mode) or {prefix}.base_format=bf16"
            )
        if self.lora.enabled and self.precision not in ("fp32", "bf16"):
            raise ConfigError(
                f"{prefix}.precision={self.precision} with {prefix}.lora.rank > 0: the LoRA learner computes in "
                "fp32 or bf16 (the frozen base is quantized by learner.base_format)"
            )
        for key in ("tp", "pp", "dp", "micro_batch_size"):
            check_positive(f"{prefix}.{key}", getattr(self, key))
        check_choice(f"{prefix}.precision", self.precision, ("fp32", "bf16", "fp8", "nvfp4"))
        check_choice(f"{prefix}.recompute", self.recompute, ("none", "selective", "full"))
        check_positive(f"{prefix}.micro_batch_tokens", self.micro_batch_tokens, allow_zero=True)
        check_positive(f"{prefix}.logprob_chunk_tokens", self.logprob_chunk_tokens, allow_zero=True)
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

"""Config of advantages, policy loss, rollout corrections and KL (`algo.*`) and of QuRL invariant scaling
(`algo.invariant_scaling.*`). The engine-side AQN noise (`algo.aqn.*`) is the rollout's: `qrl_megatron.rollout.config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from qrl_megatron.config_fields import ConfigError, check_choice, check_positive, check_range, doc
from qrl_megatron.rollout.config import AQNConfig

__all__ = ["AlgoConfig", "InvariantScalingConfig"]


@dataclass
class InvariantScalingConfig:
    s: float = doc(
        1.5,
        "q/k/v (gate/up) weights / s, preceding RMSNorm * s, once before RL; quantized full-parameter rollout "
        "only (not with learner.lora); 1 = off",
    )
    targets: list[str] = doc(
        text="linears to scale: qkv (q/k/v_proj, input_layernorm) and/or gate_up (gate/up_proj, post-attention norm)",
        factory=lambda: ["qkv"],
    )

    def validate(self, prefix: str = "algo.invariant_scaling") -> None:
        check_positive(f"{prefix}.s", self.s)
        if not self.targets:
            raise ConfigError(f"{prefix}.targets must name at least one of qkv, gate_up")
        for i, target in enumerate(self.targets):
            check_choice(f"{prefix}.targets[{i}]", target, ("qkv", "gate_up"))


@dataclass
class AlgoConfig:
    advantage: str = doc("grpo", "grpo: (r - mean) / (std + eps) per group; drgrpo: r - mean (Dr. GRPO)")
    std_eps: float = doc(1e-6, "epsilon added to the group reward std")
    clip_low: float = doc(0.2, "PPO ratio clip below: 1 - clip_low")
    clip_high: float = doc(0.2, "PPO ratio clip above: 1 + clip_high (DAPO clip-higher: 0.28)")
    loss_agg: str = doc(
        "token_mean",
        "loss aggregation: token_mean, seq_mean or seq_sum_norm (loss sum / (sequences * loss_norm_tokens))",
    )
    loss_norm_tokens: int = doc(0, "per-sequence token budget of seq_sum_norm (0: rollout.max_new_tokens)")
    correction: str = doc("none", "rollout correction for the quantized engine: none, tis, mis or acr (QuRL)")
    correction_level: str = doc("token", "IS ratio level: token, sequence (tis, mis) or geometric (mis only)")
    correction_cap: float = doc(2.0, "C: tis/acr weight min(r, C); mis keeps r in [1/C, C] (geometric: use ~1.001)")
    kl_coef: float = doc(0.0, "weight of the per-token KL to the reference policy (0: off)")
    kl_estimator: str = doc("k1", "KL estimator: k1 (logp - ref_logp) or k3 (exp(d) - d - 1 with d = ref_logp - logp)")
    entropy_coef: float = doc(0.0, "weight of the entropy bonus subtracted from the loss (0: off)")
    overlong_buffer: int = doc(0, "DAPO overlong shaping: penalty ramps over the last N tokens (0: off)")
    overlong_penalty: float = doc(1.0, "DAPO overlong shaping: reward penalty at rollout.max_new_tokens tokens")
    mask_truncated: bool = doc(False, "drop completions cut at rollout.max_new_tokens from the loss (loss mask 0)")
    dynamic_sampling: bool = doc(False, "DAPO dynamic sampling: drop groups whose rewards are all equal, refill")
    dynamic_sampling_max_attempts: int = doc(4, "most rollout rounds per step when refilling dropped groups")
    minibatches: int = doc(1, "policy updates per rollout batch (the batch is split into this many)")
    epochs: int = doc(1, "passes over the rollout batch")
    aqn: AQNConfig = doc(text="QeRL adaptive quantization noise (AQN) in the rollout engine", factory=AQNConfig)
    invariant_scaling: InvariantScalingConfig = doc(
        text="QuRL invariant scaling of the policy weights before RL", factory=InvariantScalingConfig
    )

    def validate(self, prefix: str = "algo") -> None:
        check_choice(f"{prefix}.advantage", self.advantage, ("grpo", "drgrpo"))
        check_positive(f"{prefix}.std_eps", self.std_eps)
        check_range(f"{prefix}.clip_low", self.clip_low, 0.0, 1.0)
        check_positive(f"{prefix}.clip_high", self.clip_high)
        check_choice(f"{prefix}.loss_agg", self.loss_agg, ("token_mean", "seq_mean", "seq_sum_norm"))
        check_positive(f"{prefix}.loss_norm_tokens", self.loss_norm_tokens, allow_zero=True)
        check_choice(f"{prefix}.correction", self.correction, ("none", "tis", "mis", "acr"))
        levels = {"tis": ("token", "sequence"), "acr": ("token",)}  # none ignores the level
        check_choice(
            f"{prefix}.correction_level",
            self.correction_level,
            levels.get(self.correction, ("token", "sequence", "geometric")),
        )
        if not self.correction_cap > 1.0:
            raise ConfigError(f"{prefix}.correction_cap={self.correction_cap} must be > 1")
        check_positive(f"{prefix}.kl_coef", self.kl_coef, allow_zero=True)
        check_choice(f"{prefix}.kl_estimator", self.kl_estimator, ("k1", "k3"))
        check_positive(f"{prefix}.entropy_coef", self.entropy_coef, allow_zero=True)
        check_positive(f"{prefix}.overlong_buffer", self.overlong_buffer, allow_zero=True)
        check_positive(f"{prefix}.overlong_penalty", self.overlong_penalty, allow_zero=True)
        check_positive(f"{prefix}.dynamic_sampling_max_attempts", self.dynamic_sampling_max_attempts)
        check_positive(f"{prefix}.minibatches", self.minibatches)
        check_positive(f"{prefix}.epochs", self.epochs)
        self.aqn.validate(f"{prefix}.aqn")
        self.invariant_scaling.validate(f"{prefix}.invariant_scaling")

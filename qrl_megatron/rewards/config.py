"""Config of the reward stage (`reward.*`): which verifier, the format reward, the worker pool."""

from __future__ import annotations

import re
from dataclasses import dataclass

from qrl_megatron.config_fields import ConfigError, check_choice, check_positive, check_range, doc

__all__ = ["FORMATS", "RewardConfig"]

FORMATS = ("none", "qerl", "dapo", "boxed")
_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass
class RewardConfig:
    fn: str = doc(
        "auto",
        "verifier: auto (exact for task.name=arithmetic, else math), exact (integer/text match), math (math-verify), "
        "or a plug-in package.module:function taking (completion, ground_truth) and returning a float",
    )
    format: str = doc("none", "format reward: none, qerl (<think>...</think><answer>...</answer>), dapo, boxed")
    format_weight: float = doc(0.0, "reward = (1 - w) * correct + w * format_ok, so it stays in [0, 1]")
    workers: int = doc(2, "verifier worker processes (math and plug-in verifiers; exact runs in-process)")
    timeout_s: float = doc(5.0, "per-completion verifier deadline: past it the completion scores 0, worker restarts")
    truncated_zero: bool = doc(True, "a completion cut at rollout.max_new_tokens scores 0 (its answer is unfinished)")

    def validate(self, prefix: str = "reward") -> None:
        if self.fn not in ("auto", "exact", "math") and not _FUNCTION.match(self.fn):
            raise ConfigError(
                f"{prefix}.fn={self.fn!r} must be auto, exact, math or package.module:function (e.g. my_rewards:score)"
            )
        check_choice(f"{prefix}.format", self.format, FORMATS)
        check_range(f"{prefix}.format_weight", self.format_weight, 0.0, 1.0)
        if self.format_weight > 0 and self.format == "none":
            raise ConfigError(f"{prefix}.format_weight={self.format_weight} needs {prefix}.format (qerl, dapo, boxed)")
        check_positive(f"{prefix}.workers", self.workers)
        check_positive(f"{prefix}.timeout_s", self.timeout_s)

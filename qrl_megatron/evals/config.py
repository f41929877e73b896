"""Config of the held-out evaluation (`eval.*`); when it runs is `trainer.eval_every`."""

from __future__ import annotations

from dataclasses import dataclass

from qrl_megatron.config_fields import ConfigError, check_positive, doc

__all__ = ["EvalConfig"]


@dataclass
class EvalConfig:
    k: list[int] = doc(
        text="pass@k / mean@k for each k from max(k) samples per problem ([]: greedy only)", factory=list
    )
    temperature: float = doc(1.0, "sampling temperature of the pass@k samples")
    max_new_tokens: int = doc(0, "longest evaluation completion (0: rollout.max_new_tokens)")
    greedy: bool = doc(True, "also report greedy accuracy (the 'accuracy' of eval.json and eval_accuracy)")

    def validate(self, prefix: str = "eval") -> None:
        for i, k in enumerate(self.k):
            if k < 1:
                raise ConfigError(f"{prefix}.k[{i}]={k} must be >= 1")
        check_positive(f"{prefix}.temperature", self.temperature)
        check_positive(f"{prefix}.max_new_tokens", self.max_new_tokens, allow_zero=True)
        if not self.greedy and not self.k:
            raise ConfigError(f"{prefix}.greedy=false needs {prefix}.k (e.g. eval.k=[1,8]); nothing would be measured")

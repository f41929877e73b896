"""The reward stage: completions + reference answers -> one reward per completion, and its metrics.

`reward.fn` picks the verifier. `exact` (the arithmetic task's) is a cheap string match run in-process, exactly as
the default demo has always scored; `math` and plug-ins run in a `RewardPool` with a per-call deadline. The format
reward mixes in as `(1 - w) * correct + w * format_ok`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from qrl_megatron.rewards import MATH_VERIFIER
from qrl_megatron.rewards.arithmetic import exact_answer_reward
from qrl_megatron.rewards.config import RewardConfig
from qrl_megatron.rewards.format import format_reward
from qrl_megatron.rewards.pool import RewardPool
from qrl_megatron.rollout.engine import Completion

__all__ = ["RewardScorer", "verifier_name"]


def verifier_name(cfg: RewardConfig, task_name: str) -> str:
    """exact, or the `package.module:function` the pool runs."""
    if cfg.fn == "auto":
        return "exact" if task_name == "arithmetic" else MATH_VERIFIER
    return MATH_VERIFIER if cfg.fn == "math" else cfg.fn


class RewardScorer:
    def __init__(self, cfg: RewardConfig, task_name: str) -> None:
        self.cfg = cfg
        self.verifier = verifier_name(cfg, task_name)
        self.pool = None if self.verifier == "exact" else RewardPool(self.verifier, cfg.workers, cfg.timeout_s)

    def correctness(
        self, texts: Sequence[str], answers: Sequence[str], finished: Sequence[bool]
    ) -> tuple[list[float], int]:
        """Verifier verdicts (and how many calls timed out)."""
        if self.pool is None:
            return [exact_answer_reward(t, a, f) for t, a, f in zip(texts, answers, finished)], 0
        result = self.pool.map(list(zip(texts, answers)))
        values = result.values
        if self.cfg.truncated_zero:
            values = [v if f else 0.0 for v, f in zip(values, finished)]
        return values, result.timeouts

    def __call__(
        self, completions: Sequence[Completion], answers: Sequence[str]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Rewards [N] (float32) of `completions` against `answers[c.prompt_index]`, and the stage's metrics."""
        start = time.perf_counter()
        texts = [c.text for c in completions]
        correct, timeouts = self.correctness(
            texts, [answers[c.prompt_index] for c in completions], [c.finished for c in completions]
        )
        rewards = torch.tensor(correct, dtype=torch.float32)
        metrics = {"reward_timeouts": float(timeouts)}
        if self.cfg.format != "none":
            fmt = torch.tensor([format_reward(t, self.cfg.format) for t in texts], dtype=torch.float32)
            metrics["reward_format_mean"] = float(fmt.mean()) if len(texts) else 0.0
            metrics["reward_correct_mean"] = float(rewards.mean()) if len(texts) else 0.0
            w = self.cfg.format_weight
            rewards = (1 - w) * rewards + w * fmt
        metrics["time_reward_s"] = time.perf_counter() - start
        return rewards, metrics

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

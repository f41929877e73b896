"""Verifiers and reward shaping.

`math_reward(completion, ground_truth)` is the math verifier (math-verify, answer extraction from `\\boxed{}`,
`####`, `Answer:` lines and `<answer>` tags) run in a worker process with a per-call deadline; the trainer's reward
stage (`qrl_megatron.rewards.scorer`) uses the same pool for whole batches.
"""

from __future__ import annotations

import atexit

from qrl_megatron.rewards.pool import RewardPool

__all__ = ["DEFAULT_TIMEOUT_S", "MATH_VERIFIER", "math_reward"]

MATH_VERIFIER = "qrl_megatron.rewards.verifier:verify_math"
DEFAULT_TIMEOUT_S = 5.0

_pools: dict[float, RewardPool] = {}


def math_reward(completion: str, ground_truth: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 when the completion's final answer equals `ground_truth` mathematically, 0.0 otherwise or past
    `timeout_s` seconds (one shared worker process per timeout, started on the first call)."""
    pool = _pools.get(timeout_s)
    if pool is None:
        pool = _pools[timeout_s] = RewardPool(MATH_VERIFIER, workers=1, timeout_s=timeout_s)
        atexit.register(pool.close)
    return pool.map([(completion, ground_truth)]).values[0]

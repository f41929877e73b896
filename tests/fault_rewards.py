"""Reward plug-ins (``reward.fn=fault_rewards:<name>``, with tests/ on PYTHONPATH) that inject faults into a run."""

from __future__ import annotations

# The reward pool refuses a non-finite reward (a config error), so a fault reaches the loss the way a broken
# plug-in's would: finite rewards so large that a group's mean overflows float32, making the advantages NaN.
HUGE = 3.0e38


def huge_reward(completion: str, ground_truth: str) -> float:
    """Every reward HUGE: every group's advantages, so every loss and gradient, are NaN; every update is skipped."""
    return HUGE


def huge_for_answer(completion: str, ground_truth: str) -> float:
    """The arithmetic task's exact-match reward, but HUGE for the problems whose answer is $QRL_FAULT_NAN_ANSWER:
    a NaN step fixed by the (seeded) prompt stream, the same in every run of the same config."""
    import os

    from qrl_megatron.rewards.arithmetic import exact_answer_reward

    if ground_truth == os.environ.get("QRL_FAULT_NAN_ANSWER"):
        return HUGE
    return exact_answer_reward(completion, ground_truth, True)

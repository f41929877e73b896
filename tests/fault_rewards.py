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


def kill_engine_in_step_2(completion: str, ground_truth: str) -> float:
    """Exact-match reward that SIGKILLs the trainer's vLLM engine core once, while it scores step 2's rollout (the run
    in $QRL_FAULT_RUN_DIR has logged exactly step 1): the engine dies after its rollout returned, so the run meets the
    dead engine in the weight sync, not in a rollout."""
    import os
    from pathlib import Path

    import psutil

    from qrl_megatron.rewards.arithmetic import exact_answer_reward

    run_dir = Path(os.environ["QRL_FAULT_RUN_DIR"])
    metrics, marker = run_dir / "metrics.jsonl", run_dir / "engine_killed"
    if metrics.is_file() and len(metrics.read_text().splitlines()) == 1 and not marker.exists():
        marker.touch()
        for root in (psutil.Process(), psutil.Process().parent()):
            for child in root.children(recursive=True):
                if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                    child.kill()
    return exact_answer_reward(completion, ground_truth, True)

"""Evaluate held-out sets on a rollout engine: greedy accuracy, pass@k and mean@k per set.

The same code runs inside training (`RolloutDriver.evaluate`) and in `qrl-eval`. Verdicts are the verifier's
correctness only (a format reward never inflates accuracy).
"""

from __future__ import annotations

from typing import Any

from qrl_megatron.evals.config import EvalConfig
from qrl_megatron.evals.passk import mean_at_k, pass_at_k
from qrl_megatron.rewards.scorer import RewardScorer
from qrl_megatron.rollout.engine import RolloutEngine

__all__ = ["EVAL_STEP_OFFSET", "evaluate_set", "flat_metrics"]

EVAL_STEP_OFFSET = 1_000_000  # evaluation samples are seeded apart from every training step's


def evaluate_set(
    engine: RolloutEngine,
    scorer: RewardScorer,
    prompts: list[str],
    answers: list[str],
    cfg: EvalConfig,
    max_new_tokens: int,
    step: int = 0,
) -> dict[str, Any]:
    """{'accuracy', 'num_problems', 'pass@k', 'mean@k', ...} of one held-out set."""
    out: dict[str, Any] = {"num_problems": len(prompts)}
    if cfg.greedy:
        completions = engine.greedy(prompts, max_new_tokens)
        verdicts, _ = scorer.correctness(
            [c.text for c in completions],
            [answers[c.prompt_index] for c in completions],
            [c.finished for c in completions],
        )
        out["accuracy"] = sum(verdicts) / max(len(verdicts), 1)
    if cfg.k:
        n = max(cfg.k)
        completions = engine.generate(prompts, n, cfg.temperature, max_new_tokens, EVAL_STEP_OFFSET + step)
        verdicts, _ = scorer.correctness(
            [c.text for c in completions],
            [answers[c.prompt_index] for c in completions],
            [c.finished for c in completions],
        )
        grid = [verdicts[i * n : (i + 1) * n] for i in range(len(prompts))]  # grouped prompt by prompt
        for k in sorted(set(cfg.k)):
            out[f"pass@{k}"] = sum(pass_at_k(n, int(sum(row)), k) for row in grid) / max(len(grid), 1)
            out[f"mean@{k}"] = mean_at_k(grid, k)
        out["samples_per_problem"] = n
        out.setdefault("accuracy", out["mean@1"] if 1 in cfg.k else mean_at_k(grid, n))
    return out


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The step metrics of an evaluation: eval_accuracy (the main set) and eval/<set>/<metric> for every set."""
    metrics = {"eval_accuracy": float(result["accuracy"])}
    for name, values in result.get("sets", {}).items():
        for key, value in values.items():
            if key not in ("num_problems", "samples_per_problem"):
                metrics[f"eval/{name}/{key}"] = float(value)
    return metrics

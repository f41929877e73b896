"""The rollout and reward stages of a step: sample groups from the engine, score them, pack a learner batch."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from qrl_megatron.algos.advantages import group_advantages
from qrl_megatron.algos.config import AlgoConfig
from qrl_megatron.data.loader import eval_sets
from qrl_megatron.evals.config import EvalConfig
from qrl_megatron.evals.run import evaluate_set
from qrl_megatron.learner.batch import TokenBatch, pack_sequences
from qrl_megatron.rewards.config import RewardConfig
from qrl_megatron.rewards.scorer import RewardScorer
from qrl_megatron.rewards.shaping import mask_truncated, overlong_penalty
from qrl_megatron.rollout.config import RolloutConfig
from qrl_megatron.rollout.engine import Completion, RolloutEngine


@dataclass
class RolloutResult:
    batch: TokenBatch
    metrics: dict[str, float]


class RolloutDriver:
    """Rank 0's side of the data path: the engine, the prompt stream and the held-out set.

    `cfg` sizes and samples the rollout; `algo` holds the knobs the reward and advantage stages read (shaping,
    dynamic sampling, the advantage); `seed` orders the prompt stream; `scorer` is the reward stage (default: the
    exact-answer verifier); `eval_cfg` sets pass@k sampling of the held-out sets (default: greedy only).
    """

    def __init__(
        self,
        engine: RolloutEngine,
        cfg: RolloutConfig,
        algo: AlgoConfig,
        task: Any,
        seq_length: int,
        pad_id: int,
        seed: int,
        scorer: RewardScorer | None = None,
        eval_cfg: EvalConfig | None = None,
    ) -> None:
        self.engine, self.cfg, self.algo, self.seq_length, self.pad_id = engine, cfg, algo, seq_length, pad_id
        self.scorer = scorer or RewardScorer(RewardConfig(fn="exact"), "arithmetic")
        self.eval_cfg = eval_cfg or EvalConfig()
        self.sampler = PromptSampler(list(task["train"]["prompt"]), list(task["train"]["answer"]), seed)
        self.eval_sets = {
            name: (list(ds["prompt"]), list(ds["answer"])) for name, ds in eval_sets(task).items()
        }  # the main 'eval' first

    def rollout(self, step: int) -> RolloutResult:
        self.engine.begin_step(step)  # an engine pool names the step when one of its engines dies
        return rollout(self.engine, self.sampler, self.cfg, self.algo, step, self.seq_length, self.pad_id, self.scorer)

    def evaluate(self, step: int = 0) -> dict[str, Any]:
        """The main set's 'accuracy' and 'num_problems' (and pass@k / mean@k), and every set under 'sets'."""
        max_new = self.eval_cfg.max_new_tokens or self.cfg.max_new_tokens
        sets = {
            name: evaluate_set(self.engine, self.scorer, prompts, answers, self.eval_cfg, max_new, step)
            for name, (prompts, answers) in self.eval_sets.items()
        }
        main = next(iter(sets.values()))
        return {**main, "sets": sets} if len(sets) > 1 or self.eval_cfg.k else main

    def close(self) -> None:
        self.scorer.close()


class PromptSampler:
    """Draws prompts without replacement, epoch by epoch, in a seeded order."""

    def __init__(self, prompts: list[str], answers: list[str], seed: int) -> None:
        self.prompts, self.answers = prompts, answers
        self.rng = random.Random(f"prompts-{seed}")
        self.order: list[int] = []

    def take(self, count: int) -> tuple[list[str], list[str]]:
        picked: list[int] = []
        while len(picked) < count:
            if not self.order:
                self.order = list(range(len(self.prompts)))
                self.rng.shuffle(self.order)
            picked.append(self.order.pop())
        return [self.prompts[i] for i in picked], [self.answers[i] for i in picked]

    def state(self) -> dict[str, Any]:
        """The stream's position (JSON-serialisable): a resumed run draws the same prompts as an uninterrupted one."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self.order)}

    def load_state(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order = list(state["order"])


def score(completions: list[Completion], answers: list[str]) -> torch.Tensor:
    """Exact-answer rewards (the arithmetic task's verifier, in-process)."""
    return RewardScorer(RewardConfig(fn="exact"), "arithmetic")(completions, answers)[0]


def rollout(
    engine: RolloutEngine,
    sampler: PromptSampler,
    cfg: RolloutConfig,
    algo: AlgoConfig,
    step: int,
    seq_length: int,
    pad_id: int,
    scorer: RewardScorer | None = None,
) -> RolloutResult:
    """Sample `prompts_per_step` groups, score them, and pack the learner batch.

    With DAPO dynamic sampling, groups whose rewards are all equal (zero advantage, no gradient) are dropped and
    more prompts are sampled, up to `algo.dynamic_sampling_max_attempts` rounds; if still short, dropped groups
    fill the batch so its shape (and the pipeline's) stays fixed. Reward metrics cover everything sampled, so they
    stay an unbiased measure of the policy.
    """
    n, wanted = cfg.samples_per_prompt, cfg.prompts_per_step
    kept: list[tuple[list[Completion], torch.Tensor]] = []
    dropped: list[tuple[list[Completion], torch.Tensor]] = []
    scorer = scorer or RewardScorer(RewardConfig(fn="exact"), "arithmetic")
    sampled_rewards, seconds, tokens, attempts = [], 0.0, 0, 0
    reward_metrics: dict[str, float] = {}
    max_attempts = algo.dynamic_sampling_max_attempts if algo.dynamic_sampling else 1
    while len(kept) < wanted and attempts < max_attempts:
        attempts += 1
        prompts, answers = sampler.take(wanted)
        start = time.perf_counter()
        completions = engine.generate(
            prompts, n, cfg.temperature, cfg.max_new_tokens, step * max_attempts + attempts - 1
        )
        seconds += time.perf_counter() - start
        tokens += sum(len(c.token_ids) for c in completions)
        task_rewards, round_metrics = scorer(completions, answers)
        for key, value in round_metrics.items():  # summed over rounds (times, timeouts); means re-taken below
            reward_metrics[key] = reward_metrics.get(key, 0.0) + value
        sampled_rewards.append(task_rewards)
        rewards = task_rewards + overlong_penalty(  # DAPO soft overlong punishment (zero when overlong_buffer=0)
            [len(c.token_ids) for c in completions],
            cfg.max_new_tokens,
            algo.overlong_buffer,
            algo.overlong_penalty,
        )
        for g in range(len(prompts)):
            group, group_rewards = completions[g * n : (g + 1) * n], rewards[g * n : (g + 1) * n]
            informative = not algo.dynamic_sampling or bool(group_rewards.max() > group_rewards.min())
            (kept if informative else dropped).append((group, group_rewards))
    groups = (kept + dropped)[:wanted]
    completions = [c for group, _ in groups for c in group]
    rewards = torch.cat([r for _, r in groups])
    advantages = group_advantages(rewards, n, algo.advantage, algo.std_eps)
    batch = pack_sequences(
        [c.prompt_token_ids for c in completions],
        [c.token_ids for c in completions],
        seq_length,
        pad_id,
        advantages=advantages,
        rollout_logprobs=[c.rollout_logprobs for c in completions],
    )
    if algo.mask_truncated:  # DAPO overlong filtering: truncated completions teach nothing about the answer
        batch.loss_mask = mask_truncated(batch.loss_mask, [c.finished for c in completions])
    all_rewards = torch.cat(sampled_rewards)
    all_groups = all_rewards.view(-1, n)
    metrics = {
        "reward_mean": float(all_rewards.mean()),
        "accuracy": float((all_rewards > 0).float().mean()),
        "groups_all_equal": float((all_groups.max(1).values == all_groups.min(1).values).float().mean()),
        "batch_groups_informative": sum(bool(r.max() > r.min()) for _, r in groups) / len(groups),
        "rollout_rounds": float(attempts),
        "response_length_mean": sum(len(c.token_ids) for c in completions) / len(completions),
        "truncated_fraction": sum(not c.finished for c in completions) / len(completions),
        "time_rollout_s": seconds,
        "rollout_tokens_per_s": tokens / max(seconds, 1e-9),
        "time_reward_s": reward_metrics["time_reward_s"],
        "reward_timeouts": reward_metrics["reward_timeouts"],
    }
    for key in ("reward_format_mean", "reward_correct_mean"):
        if key in reward_metrics:
            metrics[key] = reward_metrics[key] / attempts
    if "reward_correct_mean" in metrics:  # with a format reward, reward > 0 no longer means a correct answer
        metrics["accuracy"] = metrics["reward_correct_mean"]
    return RolloutResult(batch=batch, metrics=metrics)


def evaluate(engine: RolloutEngine, prompts: list[str], answers: list[str], max_new_tokens: int) -> dict[str, Any]:
    """Greedy held-out accuracy with the exact-answer verifier (`RolloutDriver.evaluate` covers the rest)."""
    scorer = RewardScorer(RewardConfig(fn="exact"), "arithmetic")
    return evaluate_set(engine, scorer, prompts, answers, EvalConfig(), max_new_tokens)

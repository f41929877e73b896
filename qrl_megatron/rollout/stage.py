"""The rollout and reward stages of a step: sample groups from the engine, score them, pack a learner batch."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from qrl_megatron.algos.advantages import group_advantages
from qrl_megatron.algos.config import AlgoConfig
from qrl_megatron.learner.batch import TokenBatch, pack_sequences
from qrl_megatron.rewards.arithmetic import exact_answer_reward
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
    dynamic sampling, the advantage); `seed` orders the prompt stream.
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
    ) -> None:
        self.engine, self.cfg, self.algo, self.seq_length, self.pad_id = engine, cfg, algo, seq_length, pad_id
        self.sampler = PromptSampler(list(task["train"]["prompt"]), list(task["train"]["answer"]), seed)
        self.eval_prompts, self.eval_answers = list(task["eval"]["prompt"]), list(task["eval"]["answer"])

    def rollout(self, step: int) -> RolloutResult:
        return rollout(self.engine, self.sampler, self.cfg, self.algo, step, self.seq_length, self.pad_id)

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.engine, self.eval_prompts, self.eval_answers, self.cfg.max_new_tokens)


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


def score(completions: list[Completion], answers: list[str]) -> torch.Tensor:
    return torch.tensor([exact_answer_reward(c.text, answers[c.prompt_index], c.finished) for c in completions])


def rollout(
    engine: RolloutEngine,
    sampler: PromptSampler,
    cfg: RolloutConfig,
    algo: AlgoConfig,
    step: int,
    seq_length: int,
    pad_id: int,
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
    sampled_rewards, seconds, tokens, attempts = [], 0.0, 0, 0
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
        task_rewards = score(completions, answers)
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
    }
    return RolloutResult(batch=batch, metrics=metrics)


def evaluate(engine: RolloutEngine, prompts: list[str], answers: list[str], max_new_tokens: int) -> dict[str, float]:
    """Greedy held-out accuracy."""
    completions = engine.greedy(prompts, max_new_tokens)
    rewards = score(completions, answers)
    return {"accuracy": float(rewards.mean()), "num_problems": len(prompts)}

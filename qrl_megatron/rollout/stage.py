"""The rollout and reward stages of a step: sample groups from the engine, score them, pack a learner batch."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from qrl_megatron.algos.advantages import group_advantages
from qrl_megatron.config import QRLConfig
from qrl_megatron.learner.batch import TokenBatch, pack_sequences
from qrl_megatron.rewards.arithmetic import exact_answer_reward
from qrl_megatron.rollout.vllm_engine import Completion, VLLMEngine


@dataclass
class RolloutResult:
    batch: TokenBatch
    metrics: dict[str, float]


class RolloutDriver:
    """Rank 0's side of the data path: the engine, the prompt stream and the held-out set."""

    def __init__(self, engine: VLLMEngine, cfg: QRLConfig, task: Any, seq_length: int, pad_id: int) -> None:
        self.engine, self.cfg, self.seq_length, self.pad_id = engine, cfg, seq_length, pad_id
        self.sampler = PromptSampler(list(task["train"]["prompt"]), list(task["train"]["answer"]), cfg.seed)
        self.eval_prompts, self.eval_answers = list(task["eval"]["prompt"]), list(task["eval"]["answer"])

    def rollout(self, step: int) -> RolloutResult:
        return rollout(self.engine, self.sampler, self.cfg, step, self.seq_length, self.pad_id)

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.engine, self.eval_prompts, self.eval_answers, self.cfg.rollout.max_new_tokens)


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
    engine: VLLMEngine, sampler: PromptSampler, cfg: QRLConfig, step: int, seq_length: int, pad_id: int
) -> RolloutResult:
    prompts, answers = sampler.take(cfg.rollout.prompts_per_step)
    start = time.perf_counter()
    completions = engine.generate(
        prompts, cfg.rollout.samples_per_prompt, cfg.rollout.temperature, cfg.rollout.max_new_tokens, step
    )
    seconds = time.perf_counter() - start
    rewards = score(completions, answers)
    advantages = group_advantages(rewards, cfg.rollout.samples_per_prompt, cfg.algo.advantage, cfg.algo.std_eps)
    batch = pack_sequences(
        [c.prompt_token_ids for c in completions],
        [c.token_ids for c in completions],
        seq_length,
        pad_id,
        advantages=advantages,
        rollout_logprobs=[c.rollout_logprobs for c in completions],
    )
    tokens = sum(len(c.token_ids) for c in completions)
    groups = rewards.view(-1, cfg.rollout.samples_per_prompt)
    metrics = {
        "reward_mean": float(rewards.mean()),
        "accuracy": float((rewards > 0).float().mean()),
        "groups_all_equal": float((groups.max(1).values == groups.min(1).values).float().mean()),
        "response_length_mean": tokens / len(completions),
        "truncated_fraction": sum(not c.finished for c in completions) / len(completions),
        "time_rollout_s": seconds,
        "rollout_tokens_per_s": tokens / max(seconds, 1e-9),
    }
    return RolloutResult(batch=batch, metrics=metrics)


def evaluate(engine: VLLMEngine, prompts: list[str], answers: list[str], max_new_tokens: int) -> dict[str, float]:
    """Greedy held-out accuracy."""
    completions = engine.greedy(prompts, max_new_tokens)
    rewards = score(completions, answers)
    return {"accuracy": float(rewards.mean()), "num_problems": len(prompts)}

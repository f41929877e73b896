"""Loss functions in the learner's LossFn shape: (logprobs, micro-batch, global totals) -> (loss, metric sums)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from qrl_megatron.algos.losses import aggregate, ppo_clip_token_loss, sft_token_loss
from qrl_megatron.config import AlgoConfig
from qrl_megatron.learner.batch import TokenBatch

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def grpo_loss(algo: AlgoConfig) -> LossFn:
    def loss_fn(logprobs: torch.Tensor, mb: TokenBatch, total_tokens: float, total_seqs: float):
        token_loss, stats = ppo_clip_token_loss(
            logprobs, mb.old_logprobs, mb.advantages, mb.loss_mask, algo.clip_low, algo.clip_high
        )
        loss = aggregate(token_loss, mb.loss_mask, algo.loss_agg, total_tokens, total_seqs)
        return loss, {**stats, "tokens": mb.loss_mask.sum()}

    return loss_fn


def sft_loss(logprobs: torch.Tensor, mb: TokenBatch, total_tokens: float, total_seqs: float):
    loss = aggregate(sft_token_loss(logprobs, mb.loss_mask), mb.loss_mask, "token_mean", total_tokens, total_seqs)
    return loss, {"tokens": mb.loss_mask.sum()}

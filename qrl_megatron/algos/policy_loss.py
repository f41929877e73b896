"""Loss functions in the learner's LossFn shape: (logprobs, micro-batch, global totals) -> (loss, metric sums).

Metric values are sums over the micro-batch (the learner sums them over micro-batches and DP ranks), except keys
ending in `_max` (see MAX_STATS), which are maxima and must be reduced with MAX.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qrl_megatron.algos.config import AlgoConfig
from qrl_megatron.algos.corrections import corrected_ppo_token_loss, kl_penalty
from qrl_megatron.algos.losses import aggregate, sft_token_loss
from qrl_megatron.learner.batch import TokenBatch

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

# stats of grpo_loss that are maxima over tokens, not sums
MAX_STATS = ("is_weight_max", "rollout_ratio_max")


def grpo_loss(algo: AlgoConfig, max_new_tokens: int = 0) -> LossFn:
    """The GRPO/DAPO policy loss of `algo`: rollout correction, KL to a reference, entropy bonus, aggregation.

    Per completion token: corrected PPO loss (algo.correction, see algos/corrections.py)
    + kl_coef · KL estimate(π_θ, π_ref) - entropy_coef · entropy, then aggregated by algo.loss_agg. The KL and
    entropy terms are not importance weighted and apply to every completion token (MIS-masked ones included).
    `max_new_tokens` (rollout.max_new_tokens) is the seq_sum_norm budget when algo.loss_norm_tokens is 0.

    loss_fn(logprobs, mb, total_tokens, total_seqs, entropy=None): `entropy` [B, S] (differentiable) is needed when
    algo.entropy_coef > 0, `mb.ref_logprobs` when algo.kl_coef > 0. Stats: clipped_tokens, masked_tokens,
    is_weight_sum, is_weight_max, ratio_sum, rollout_kl_sum, rollout_ratio_max, tokens, and kl_sum when
    algo.kl_coef > 0 (MAX_STATS are maxima, the rest sums).
    """
    norm_tokens = float(algo.loss_norm_tokens or max_new_tokens)
    if algo.loss_agg == "seq_sum_norm" and norm_tokens <= 0:
        raise ValueError(
            "algo.loss_agg=seq_sum_norm needs algo.loss_norm_tokens > 0 or grpo_loss(..., max_new_tokens=...)"
        )

    def loss_fn(
        logprobs: torch.Tensor,
        mb: TokenBatch,
        total_tokens: float,
        total_seqs: float,
        entropy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = mb.loss_mask.to(logprobs.dtype)
        token_loss, stats = corrected_ppo_token_loss(
            logprobs,
            mb.old_logprobs,
            mb.rollout_logprobs,
            mb.advantages,
            mask,
            algo.clip_low,
            algo.clip_high,
            correction=algo.correction,
            level=algo.correction_level,
            cap=algo.correction_cap,
        )
        if algo.kl_coef:
            if mb.ref_logprobs.numel() == 0:
                raise ValueError("algo.kl_coef > 0 needs reference-policy logprobs (TokenBatch.ref_logprobs)")
            kl = kl_penalty(logprobs, mb.ref_logprobs, algo.kl_estimator) * mask
            token_loss = token_loss + algo.kl_coef * kl
            stats["kl_sum"] = kl.detach().sum()
        if algo.entropy_coef:
            if entropy is None:
                raise ValueError("algo.entropy_coef > 0 needs the per-token entropy: loss_fn(..., entropy=entropy)")
            token_loss = token_loss - algo.entropy_coef * entropy.to(logprobs.dtype) * mask
        loss = aggregate(token_loss, mask, algo.loss_agg, total_tokens, total_seqs, norm_tokens=norm_tokens)
        return loss, {**stats, "tokens": mb.loss_mask.sum()}

    return loss_fn


def sft_loss(
    logprobs: torch.Tensor,
    mb: TokenBatch,
    total_tokens: float,
    total_seqs: float,
    entropy: torch.Tensor | None = None,
):
    loss = aggregate(sft_token_loss(logprobs, mb.loss_mask), mb.loss_mask, "token_mean", total_tokens, total_seqs)
    return loss, {"tokens": mb.loss_mask.sum()}

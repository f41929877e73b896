"""Per-token loss pieces: the supervised NLL and the aggregation of any per-token loss.

Every function works on [batch, seq] tensors aligned with the labels (position t scores token t+1) and a 0/1
`mask` marking completion tokens; a per-token loss is returned so the caller aggregates it (token or sequence
mean) with the right global normaliser across micro-batches and DP ranks. The PPO clip loss, with its rollout
corrections, is `qrl_megatron.algos.corrections.corrected_ppo_token_loss`.
"""

from __future__ import annotations

import torch


def sft_token_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per token (the supervised warm-start)."""
    return -logprobs * mask


def aggregate(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    total_tokens: float,
    total_seqs: float,
    norm_tokens: float = 0.0,
) -> torch.Tensor:
    """Sum of this micro-batch's share of the global mean.

    token_mean: sum(loss) / total completion tokens of the whole update (DAPO's token-level mean);
    seq_mean: sum over sequences of mean-over-own-tokens / total sequences;
    seq_sum_norm: sum(loss) / (total sequences * norm_tokens), a constant token budget per sequence such as
    rollout.max_new_tokens (Dr. GRPO: no per-sequence length normalisation, so long and short answers weigh the same
    per token and the normaliser does not depend on the batch's lengths).
    The totals are global (all micro-batches and DP ranks) so the summed gradients equal the global mean's.
    """
    if mode == "token_mean":
        return token_loss.sum() / max(total_tokens, 1.0)
    if mode == "seq_mean":
        per_seq = token_loss.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / max(total_seqs, 1.0)
    if mode == "seq_sum_norm":
        if norm_tokens <= 0:
            raise ValueError(f"seq_sum_norm needs a positive per-sequence token budget, got norm_tokens={norm_tokens}")
        return token_loss.sum() / (max(total_seqs, 1.0) * norm_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}; use token_mean, seq_mean or seq_sum_norm")

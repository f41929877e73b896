"""Reward shaping and loss masking for over-long completions (DAPO, arXiv 2503.14476, section 3.4)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def overlong_penalty(
    lengths: Sequence[int] | torch.Tensor, max_len: int, buffer_len: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the task reward; float32 [N].

    With L the completion length, L_max = max_len and L_buf = buffer_len:
    0 for L <= L_max - L_buf; ((L_max - L_buf) - L) / L_buf · penalty_factor for L_max - L_buf < L <= L_max (linear
    from 0 down to -penalty_factor at L = L_max); -penalty_factor for L > L_max. buffer_len = 0 turns it off.
    """
    if buffer_len < 0 or buffer_len > max_len:
        raise ValueError(f"overlong buffer {buffer_len} must lie in [0, max_len={max_len}]")
    length = torch.as_tensor(lengths, dtype=torch.float64)
    if buffer_len == 0:
        return torch.zeros(length.shape, dtype=torch.float32)
    expected = max_len - buffer_len
    penalty = ((expected - length) / buffer_len).clamp(min=-1.0, max=0.0) * penalty_factor
    return penalty.to(torch.float32)


def truncation_keep(finished: Sequence[bool] | torch.Tensor) -> torch.Tensor:
    """1.0 for a completion that ended by itself (EOS), 0.0 for one cut at max_new_tokens; float32 [N]."""
    return torch.as_tensor(finished, dtype=torch.bool).to(torch.float32)


def mask_truncated(loss_mask: torch.Tensor, finished: Sequence[bool] | torch.Tensor) -> torch.Tensor:
    """Loss mask [N, S] with every token of the truncated completions set to 0 (DAPO overlong filtering).

    Apply before the batch's token/sequence totals are taken, so the normalisers count only the kept tokens.
    """
    keep = truncation_keep(finished).to(device=loss_mask.device, dtype=loss_mask.dtype)
    if keep.shape != loss_mask.shape[:1]:
        raise ValueError(f"{keep.numel()} finished flags for a loss mask of {loss_mask.shape[0]} sequences")
    return loss_mask * keep.unsqueeze(-1)

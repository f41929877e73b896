"""Group-relative advantages (GRPO and Dr. GRPO)."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, mode: str = "grpo", std_eps: float = 1e-6) -> torch.Tensor:
    """Per-sample advantages from rewards laid out group by group ([p0s0, p0s1, ..., p1s0, ...]).

    grpo: (r - mean_group) / (std_group + eps); drgrpo: r - mean_group (Dr. GRPO drops the std division, which
    over-weights near-uniform groups).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if mode == "grpo":
        std = grouped.std(dim=1, unbiased=False, keepdim=True) if group_size > 1 else torch.zeros_like(centered)
        centered = centered / (std + std_eps)
    elif mode != "drgrpo":
        raise ValueError(f"unknown advantage mode {mode!r}; use grpo or drgrpo")
    return centered.reshape(-1)

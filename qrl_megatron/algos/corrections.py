"""Rollout correction: the policy loss when the rollout (behaviour) policy is a quantized engine.

Three policies (decoupled PPO, Hilton et al. 2021; verl "rollout correction"; QuRL):

* π_q: the rollout engine (quantized weights) that sampled the tokens: `rollout_logprobs`;
* π_old: the full-precision learner before the update (the proximal policy): `old_logprobs`;
* π_θ: the policy being trained: `logprobs` (carries the gradient).

Per token r = π_old/π_q (behaviour -> proximal gap, from log-probabilities, always detached) and R = π_θ/π_old
(the PPO ratio). Every correction is `-w · min(R·A, clip(R, lo, hi)·A)` per token with a detached weight w:

* none: w = 1, lo = 1 - ε_low, hi = 1 + ε_high (plain PPO; ignores π_q).
* tis (truncated IS, FlashRL / verl): w = min(r, C); `sequence` level uses r_seq = exp(Σ_t log r_t) over the
  sequence's completion tokens, broadcast to its tokens.
* mis (masked IS, "When Speed Kills Stability", verl rejection sampling): tokens (`token`), whole sequences
  (`sequence`: r_seq) or whole sequences by the geometric mean (`geometric`: exp(mean_t log r_t)) whose ratio leaves
  [1/C, C] get w = 0 (no loss, no gradient). Both ends are kept (compared in log space: |log ratio| <= log C).
  Kept tokens keep the IS weight: w = r (token) or r_seq (sequence); that is the MIS estimator of the literature
  (E[1(ρ ∈ [1/C, C]) · ρ · ∇log π]; bounded by C because of the mask). The geometric mean is not an importance
  weight, so `geometric` is rejection only: kept sequences get w = 1 (verl's geometric RS has no IS weight either).
* acr (QuRL adaptive clipping range): w = min(r, C), lo = 1 - ε_low, hi = (1 + ε_high)/r: the upper clip bounds
  π_θ/π_q = R·r by 1 + ε_high. For r < 1 the bound is looser than 1 + ε_high, for r > 1 tighter. Where
  (1 + ε_high)/r falls below 1 - ε_low (r > (1 + ε_high)/(1 - ε_low)) the interval would be empty; the bound is then
  held at 1 - ε_low, so R is clipped to exactly 1 - ε_low: for A > 0 no push up at all (π_θ/π_q is already beyond
  1 + ε_high at R = 1), for A < 0 the usual lower clip. Token level only.

Tokens outside `mask` contribute nothing. MIS-masked tokens count in the loss normaliser with weight 0 (the
normaliser stays the number of completion tokens, the same whatever the correction).

Stats are sums over this micro-batch (the caller sums them over micro-batches and ranks), except the keys ending in
`_max`, which are maxima and must be reduced with MAX.
"""

from __future__ import annotations

import math

import torch

CORRECTIONS = ("none", "tis", "mis", "acr")
CORRECTION_LEVELS = ("token", "sequence", "geometric")
# which levels each correction accepts (the first is the natural one)
CORRECTION_LEVELS_OF = {
    "none": CORRECTION_LEVELS,
    "tis": ("token", "sequence"),
    "mis": ("token", "sequence", "geometric"),
    "acr": ("token",),
}


def check_correction(correction: str, level: str, cap: float) -> None:
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown rollout correction {correction!r}; use one of {', '.join(CORRECTIONS)}")
    if level not in CORRECTION_LEVELS_OF[correction]:
        raise ValueError(
            f"correction {correction!r} works at level {', '.join(CORRECTION_LEVELS_OF[correction])}, not {level!r}"
        )
    if not cap > 1.0:
        raise ValueError(f"correction cap C={cap} must be > 1")


def rollout_log_ratio(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log r = log π_old - log π_q per token, detached, 0 outside the mask."""
    diff = (old_logprobs.detach() - rollout_logprobs.detach()).to(mask.dtype)
    return torch.where(mask > 0, diff, torch.zeros_like(diff))


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, geometric: bool = False) -> torch.Tensor:
    """[B, 1]: Σ_t log r_t over each sequence's masked tokens (log r_seq), or their mean (log of the geometric mean)."""
    total = (log_ratio * mask).sum(-1, keepdim=True)
    return total / mask.sum(-1, keepdim=True).clamp(min=1.0) if geometric else total


def importance_weights(
    log_ratio: torch.Tensor, mask: torch.Tensor, correction: str, level: str, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight w [B, S], kept [B, S] bool) of a correction; both detached, defined on every position."""
    check_correction(correction, level, cap)
    log_ratio = log_ratio.detach()
    kept = torch.ones_like(log_ratio, dtype=torch.bool)
    if correction == "none":
        return torch.ones_like(log_ratio), kept
    log_w = log_ratio if level == "token" else sequence_log_ratio(log_ratio, mask, geometric=level == "geometric")
    log_w = log_w.expand_as(log_ratio)
    if correction in ("tis", "acr"):
        return torch.exp(log_w).clamp(max=cap), kept  # exp may overflow to inf; min(inf, C) = C
    log_cap = math.log(cap)
    kept = (log_w >= -log_cap) & (log_w <= log_cap)
    inside = torch.ones_like(log_w) if level == "geometric" else torch.exp(log_w.clamp(max=log_cap))
    return torch.where(kept, inside, torch.zeros_like(inside)), kept


def corrected_ppo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    correction: str = "none",
    level: str = "token",
    cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss `-w · min(R·A, clip(R, lo, hi)·A) · mask` of a rollout correction (see the module doc).

    logprobs/old_logprobs/rollout_logprobs/mask are [B, S], advantages [B]. Returns (loss [B, S], stats):
    clipped_tokens (kept tokens where the clipped branch is active, hence zero gradient), masked_tokens (tokens
    MIS removed), is_weight_sum (Σ w over completion tokens, 0 for masked ones), is_weight_max (max w), ratio_sum
    (Σ R), rollout_kl_sum (Σ of the k3 estimate r - log r - 1 of KL(π_q || π_old) on tokens sampled from π_q),
    rollout_ratio_max (max r, uncapped). `*_max` are maxima.
    """
    dtype = logprobs.dtype
    mask = mask.to(dtype)
    live = mask > 0
    log_r = rollout_log_ratio(old_logprobs.to(dtype), rollout_logprobs.to(dtype), mask)
    weight, kept = importance_weights(log_r, mask, correction, level, cap)

    ratio = torch.exp(logprobs - old_logprobs.detach().to(dtype))
    adv = advantages.unsqueeze(-1).to(dtype)
    low = 1.0 - clip_low
    if correction == "acr":
        # upper clip on π_θ/π_q: R·r <= 1 + ε_high, never below the lower bound (empty interval -> R held at `low`)
        high = ((1.0 + clip_high) * torch.exp(-log_r)).clamp(min=low)
        clipped_ratio = torch.minimum(ratio.clamp(min=low), high)
    else:
        clipped_ratio = ratio.clamp(low, 1.0 + clip_high)
    unclipped = ratio * adv
    clipped = clipped_ratio * adv
    loss = -(weight * torch.minimum(unclipped, clipped)) * mask

    with torch.no_grad():
        used = live & kept
        applied = torch.where(live, weight, torch.zeros_like(weight))
        r = torch.where(live, torch.exp(log_r), torch.zeros_like(log_r))
        stats = {
            "clipped_tokens": ((clipped < unclipped) & used).to(dtype).sum(),
            "masked_tokens": (live & ~kept).to(dtype).sum(),
            "is_weight_sum": applied.sum(),
            "is_weight_max": applied.max() if applied.numel() else applied.new_zeros(()),
            "ratio_sum": (ratio.detach() * mask).sum(),
            "rollout_kl_sum": ((torch.expm1(log_r) - log_r) * mask).sum(),
            "rollout_ratio_max": r.max() if r.numel() else r.new_zeros(()),
        }
    return loss, stats


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π_θ || π_ref) on tokens sampled from π_θ (Schulman's estimators).

    k1: log π_θ - log π_ref (unbiased, can be negative); k3: exp(d) - d - 1 with d = log π_ref - log π_θ (unbiased,
    always >= 0, lower variance). Gradient flows through `logprobs` only.
    """
    ref = ref_logprobs.detach().to(logprobs.dtype)
    if kind == "k1":
        return logprobs - ref
    if kind == "k3":
        d = ref - logprobs
        return torch.expm1(d) - d
    raise ValueError(f"unknown KL estimator {kind!r}; use k1 or k3")

"""Rollout corrections (TIS, MIS, QuRL ACR), seq_sum_norm, KL/entropy terms and DAPO overlong shaping.

Every expected number is worked out by hand in the comments; nothing is recomputed with the formula under test.
Notation: r = π_old/π_q (rollout gap), R = π_θ/π_old (PPO ratio), w the detached weight, A the advantage.
The gradient of a token's loss -w·min(R·A, clip(R)·A) with respect to log π_θ is -w·R·A on the unclipped branch
and exactly 0 on the clipped one (and on masked tokens).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from qrl_megatron.algos.corrections import corrected_ppo_token_loss, importance_weights, kl_penalty
from qrl_megatron.algos.losses import aggregate
from qrl_megatron.algos.policy_loss import MAX_STATS, grpo_loss
from qrl_megatron.config import AlgoConfig, ConfigError, load_config
from qrl_megatron.learner.batch import TokenBatch
from qrl_megatron.rewards.shaping import mask_truncated, overlong_penalty, truncation_keep

pytestmark = pytest.mark.unit

F64 = torch.float64
LN2 = math.log(2.0)
STAT_KEYS = {
    "clipped_tokens",
    "masked_tokens",
    "is_weight_sum",
    "is_weight_max",
    "ratio_sum",
    "rollout_kl_sum",
    "rollout_ratio_max",
}


def _inputs(
    log_r: list[list[float]], log_big_r: list[list[float]], old: list[list[float]] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs requiring grad, old_logprobs, rollout_logprobs) with log(π_old/π_q) = log_r, log(π_θ/π_old) = log_R.

    With old = 0 the rollout log-ratio old - rollout = 0 - (-log_r) is exactly log_r (boundary tests rely on it).
    """
    lr = torch.tensor(log_r, dtype=F64)
    old_t = torch.zeros_like(lr) if old is None else torch.tensor(old, dtype=F64)
    rollout = old_t - lr
    logprobs = (old_t + torch.tensor(log_big_r, dtype=F64)).requires_grad_(True)
    return logprobs, old_t, rollout


def _ln(values: list[list[float]]) -> list[list[float]]:
    return [[math.log(v) for v in row] for row in values]


def _run(logprobs, old, rollout, adv, mask, correction, level="token", cap=2.0, clip_low=0.2, clip_high=0.28):
    loss, stats = corrected_ppo_token_loss(
        logprobs,
        old,
        rollout,
        torch.tensor(adv, dtype=F64),
        torch.tensor(mask, dtype=F64),
        clip_low,
        clip_high,
        correction=correction,
        level=level,
        cap=cap,
    )
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    return loss.detach(), grad, stats


# --------------------------------------------------------------------------------------------- TIS
# clip range [0.8, 1.28]; C = 2. Row 0: A = +1, row 1: A = -2. Last column masked with a huge r = e^5.
TIS_R = [[0.5, 4.0, 1.5, math.exp(5.0)], [2.0, 0.25, 1.0, math.exp(5.0)]]
TIS_BIG_R = [[1.1, 1.5, 0.5, 1.0], [1.1, 0.5, 1.5, 1.0]]
TIS_OLD = [[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.2, -2.5, -0.1]]
TIS_MASK = [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]]
TIS_ADV = [1.0, -2.0]


def test_tis_token_level_hand_computed() -> None:
    logprobs, old, rollout = _inputs(_ln(TIS_R), _ln(TIS_BIG_R), TIS_OLD)
    loss, grad, stats = _run(logprobs, old, rollout, TIS_ADV, TIS_MASK, "tis")
    # row 0 (A=+1): w = min(r, 2) = 0.5, 2, 1.5
    #   t0 R=1.1 inside -> -0.5*1.1 = -0.55, grad -0.55
    #   t1 R=1.5 > 1.28 clipped -> -2*1.28 = -2.56, grad 0
    #   t2 R=0.5 < 0.8, A>0 so min(0.5, 0.8) = 0.5 unclipped -> -1.5*0.5 = -0.75, grad -0.75
    # row 1 (A=-2): w = 2, 0.25, 1
    #   t0 R=1.1 inside -> -2*(-2.2) = 4.4, grad -2*1.1*(-2) = 4.4
    #   t1 R=0.5: min(-1.0, 0.8*-2=-1.6) = -1.6 clipped -> 0.25*1.6 = 0.4, grad 0
    #   t2 R=1.5: min(-3.0, -2.56) = -3.0 unclipped -> 3.0, grad 3.0
    assert_close(loss, torch.tensor([[-0.55, -2.56, -0.75, 0.0], [4.4, 0.4, 3.0, 0.0]], dtype=F64))
    assert_close(grad, torch.tensor([[-0.55, 0.0, -0.75, 0.0], [4.4, 0.0, 3.0, 0.0]], dtype=F64))
    assert grad[0, 1] == 0 and grad[1, 1] == 0 and grad[0, 3] == 0 and grad[1, 3] == 0
    assert set(stats) == STAT_KEYS
    assert stats["clipped_tokens"].item() == 2.0
    assert stats["masked_tokens"].item() == 0.0
    assert_close(stats["is_weight_sum"], torch.tensor(7.25, dtype=F64))  # 0.5 + 2 + 1.5 + 2 + 0.25 + 1
    assert_close(stats["is_weight_max"], torch.tensor(2.0, dtype=F64))
    assert_close(stats["ratio_sum"], torch.tensor(6.2, dtype=F64))  # 1.1 + 1.5 + 0.5 + 1.1 + 0.5 + 1.5
    # the masked e^5 is not the maximum: largest live r is 4
    assert_close(stats["rollout_ratio_max"], torch.tensor(4.0, dtype=F64))
    # Σ (r - ln r - 1): (ln2 - .5) + (3 - 2ln2) + (.5 - ln1.5) + (1 - ln2) + (2ln2 - .75) + 0 = 3.25 - ln 1.5
    assert_close(stats["rollout_kl_sum"], torch.tensor(3.25 - math.log(1.5), dtype=F64))


def test_tis_sequence_level_hand_computed() -> None:
    logprobs, old, rollout = _inputs(_ln(TIS_R), _ln(TIS_BIG_R), TIS_OLD)
    loss, grad, stats = _run(logprobs, old, rollout, TIS_ADV, TIS_MASK, "tis", level="sequence")
    # r_seq over the masked tokens only: row 0 0.5*4*1.5 = 3 -> w = 2; row 1 2*0.25*1 = 0.5 -> w = 0.5
    # (with the masked e^5 included, row 1 would be capped at 2 instead)
    # row 0: -2*1.1, -2*1.28 (clipped), -2*0.5; row 1: 0.5*2.2, 0.5*1.6 (clipped), 0.5*3.0
    assert_close(loss, torch.tensor([[-2.2, -2.56, -1.0, 0.0], [1.1, 0.8, 1.5, 0.0]], dtype=F64))
    assert_close(grad, torch.tensor([[-2.2, 0.0, -1.0, 0.0], [1.1, 0.0, 1.5, 0.0]], dtype=F64))
    assert_close(stats["is_weight_sum"], torch.tensor(7.5, dtype=F64))  # 3*2 + 3*0.5
    assert_close(stats["is_weight_max"], torch.tensor(2.0, dtype=F64))
    assert stats["clipped_tokens"].item() == 2.0 and stats["masked_tokens"].item() == 0.0


def test_sequence_weight_survives_overflow() -> None:
    # Σ log r = 800 overflows exp in float64: min(inf, C) = C, no NaN
    log_r = torch.tensor([[400.0, 400.0]], dtype=F64)
    weight, kept = importance_weights(log_r, torch.ones(1, 2, dtype=F64), "tis", "sequence", 2.0)
    assert torch.equal(weight, torch.full((1, 2), 2.0, dtype=F64)) and bool(kept.all())
    weight, kept = importance_weights(log_r, torch.ones(1, 2, dtype=F64), "mis", "sequence", 2.0)
    assert torch.equal(weight, torch.zeros(1, 2, dtype=F64)) and not bool(kept.any())


# --------------------------------------------------------------------------------------------- MIS
def test_mis_token_level_hand_computed_and_boundaries() -> None:
    # C = 2: keep r in [0.5, 2]; both ends exactly (log r = ±ln2) are kept
    log_r = [[-LN2, LN2, math.log(2.5), math.log(0.4)], [0.0, math.log(1.25), math.log(100.0), 5.0]]
    big_r = [[1.1, 1.5, 1.1, 0.9], [1.1, 0.5, 1.0, 1.0]]
    mask = [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]]
    logprobs, old, rollout = _inputs(log_r, _ln(big_r))
    loss, grad, stats = _run(logprobs, old, rollout, [1.0, -1.0], mask, "mis")
    # row 0 (A=+1): t0 r=0.5 kept, w=0.5: -0.55, grad -0.55 | t1 r=2 kept, w=2, R=1.5 clipped: -2.56, grad 0
    #               t2 r=2.5 masked | t3 r=0.4 masked
    # row 1 (A=-1): t0 r=1, w=1: 1.1, grad 1.1 | t1 r=1.25, R=0.5: min(-0.5, -0.8) clipped: 1.25*0.8 = 1.0, grad 0
    #               t2 r=100 masked | t3 padding
    assert_close(loss, torch.tensor([[-0.55, -2.56, 0.0, 0.0], [1.1, 1.0, 0.0, 0.0]], dtype=F64))
    assert_close(grad, torch.tensor([[-0.55, 0.0, 0.0, 0.0], [1.1, 0.0, 0.0, 0.0]], dtype=F64))
    assert torch.all(grad[0, 1:] == 0) and torch.all(grad[1, 1:] == 0)
    assert stats["masked_tokens"].item() == 3.0
    assert stats["clipped_tokens"].item() == 2.0  # masked tokens never count as clipped
    assert_close(stats["is_weight_sum"], torch.tensor(4.75, dtype=F64))  # 0.5 + 2 + 1 + 1.25 (masked: 0)
    assert_close(stats["is_weight_max"], torch.tensor(2.0, dtype=F64))
    assert_close(stats["rollout_ratio_max"], torch.tensor(100.0, dtype=F64))


def test_mis_sequence_level_hand_computed_and_boundaries() -> None:
    # R = 1 everywhere so the unmasked loss is -w·A; last column is padding with a huge log r = 5
    log_r = [
        [LN2, LN2, -LN2, 5.0],  # r_seq = 2 (upper boundary): kept, w = 2
        [LN2, LN2, 0.0, 5.0],  # r_seq = 4: masked
        [-LN2, 0.0, 0.0, 5.0],  # r_seq = 0.5 (lower boundary): kept, w = 0.5
        [-LN2, -LN2, 0.0, 5.0],  # r_seq = 0.25: masked
    ]
    mask = [[1.0, 1.0, 1.0, 0.0]] * 4
    logprobs, old, rollout = _inputs(log_r, [[0.0] * 4] * 4)
    loss, grad, stats = _run(logprobs, old, rollout, [1.0, 1.0, -1.0, -1.0], mask, "mis", level="sequence")
    # row 0: -2*1 per token; row 2: -0.5*(-1) = 0.5; rows 1, 3: 0. Gradient -w·R·A is the same numbers.
    expected = torch.tensor([[-2.0] * 3 + [0.0], [0.0] * 4, [0.5] * 3 + [0.0], [0.0] * 4], dtype=F64)
    assert_close(loss, expected)
    assert_close(grad, expected)
    assert torch.all(grad[1] == 0) and torch.all(grad[3] == 0)
    assert stats["masked_tokens"].item() == 6.0
    assert_close(stats["is_weight_sum"], torch.tensor(7.5, dtype=F64))  # 3*2 + 3*0.5
    assert_close(stats["is_weight_max"], torch.tensor(2.0, dtype=F64))


def test_mis_geometric_level_hand_computed_and_boundaries() -> None:
    # geometric mean exp(mean log r) over the 2 completion tokens; column 2 is padding (log r = 5 must not count)
    log_r = [
        [2 * LN2, 0.0, 5.0],  # mean ln2 -> r_geo = 2 (boundary): kept
        [2 * LN2, 2 * LN2, 5.0],  # r_geo = 4: masked
        [-2 * LN2, 0.0, 5.0],  # r_geo = 0.5 (boundary): kept (sequence level would mask: r_seq = 0.25)
        [3 * LN2, -3 * LN2, 5.0],  # r_geo = 1: kept (token level would mask both tokens)
    ]
    mask = [[1.0, 1.0, 0.0]] * 4
    logprobs, old, rollout = _inputs(log_r, [[0.0] * 3] * 4)
    loss, grad, stats = _run(logprobs, old, rollout, [1.0, -1.0, 1.0, -1.0], mask, "mis", level="geometric")
    # rejection only: kept sequences get w = 1, so loss = -A and grad = -A on kept tokens
    expected = torch.tensor([[-1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [-1.0, -1.0, 0.0], [1.0, 1.0, 0.0]], dtype=F64)
    assert_close(loss, expected)
    assert_close(grad, expected)
    assert torch.all(grad[1] == 0)
    assert stats["masked_tokens"].item() == 2.0
    assert_close(stats["is_weight_sum"], torch.tensor(6.0, dtype=F64))
    assert_close(stats["is_weight_max"], torch.tensor(1.0, dtype=F64))


# --------------------------------------------------------------------------------------------- ACR
def test_acr_hand_computed() -> None:
    # ε_low = ε_high = 0.2, C = 2: lower clip 0.8 on R, upper clip (1.2)/r on R (i.e. 1.2 on π_θ/π_q)
    r = [[0.5, 0.5, 1.2, 1.2], [0.5, 4.0, 4.0, 1.2], [4.0, 1.0, 1.0, 1.0]]
    big_r = [[2.0, 3.0, 1.1, 0.9], [2.0, 0.9, 0.5, 0.7], [1.0, 1.1, 1.0, 1.0]]
    mask = [[1.0] * 4, [1.0] * 4, [1.0, 1.0, 0.0, 0.0]]
    logprobs, old, rollout = _inputs(_ln(r), _ln(big_r), [[-0.3, -1.0, -2.0, -0.6]] * 3)
    loss, grad, stats = _run(logprobs, old, rollout, [1.0, -1.0, 1.0], mask, "acr", clip_low=0.2, clip_high=0.2)
    # row 0 (A=+1)
    #   t0 r=0.5: hi = 2.4; R=2 inside (plain PPO would clip at 1.2) -> w=0.5: -1.0, grad -0.5*2 = -1.0
    #   t1 r=0.5: R=3 > 2.4 clipped -> -0.5*2.4 = -1.2, grad 0
    #   t2 r=1.2: hi = 1.0; R=1.1 > 1.0 clipped (plain PPO would not) -> w=1.2: -1.2*1.0 = -1.2, grad 0
    #   t3 r=1.2: R=0.9 in [0.8, 1.0] -> -1.2*0.9 = -1.08, grad -1.08
    # row 1 (A=-1)
    #   t0 r=0.5: R=2: min(-2, -2) -> 0.5*2 = 1.0, grad -0.5*2*(-1) = 1.0
    #   t1 r=4: (1.2)/4 = 0.3 < 0.8, bound held at 0.8; R=0.9: min(-0.9, -0.8) = -0.9 -> w=2: 1.8, grad 1.8
    #   t2 r=4: R=0.5 -> clip to 0.8: min(-0.5, -0.8) = -0.8 -> 2*0.8 = 1.6, grad 0
    #   t3 r=1.2: R=0.7 -> clip to 0.8: -0.8 -> 1.2*0.8 = 0.96, grad 0
    # row 2 (A=+1)
    #   t0 r=4: interval collapses to 0.8; R=1: min(1, 0.8) = 0.8 -> w=2: -1.6, grad 0 (no push up)
    #   t1 r=1: hi = 1.2; R=1.1 inside -> -1.1, grad -1.1
    assert_close(
        loss,
        torch.tensor([[-1.0, -1.2, -1.2, -1.08], [1.0, 1.8, 1.6, 0.96], [-1.6, -1.1, 0.0, 0.0]], dtype=F64),
    )
    assert_close(grad, torch.tensor([[-1.0, 0.0, 0.0, -1.08], [1.0, 1.8, 0.0, 0.0], [0.0, -1.1, 0.0, 0.0]], dtype=F64))
    clipped = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.all(grad[clipped] == 0)
    assert stats["clipped_tokens"].item() == 5.0 and stats["masked_tokens"].item() == 0.0
    # 0.5 + 0.5 + 1.2 + 1.2 + 0.5 + 2 + 2 + 1.2 + 2 + 1 = 12.1
    assert_close(stats["is_weight_sum"], torch.tensor(12.1, dtype=F64))
    assert_close(stats["is_weight_max"], torch.tensor(2.0, dtype=F64))
    assert_close(stats["rollout_ratio_max"], torch.tensor(4.0, dtype=F64))


@pytest.mark.parametrize(
    ("r", "bound"),
    [
        (0.5, 2.4),  # r < 1: upper bound (1 + 0.2)/0.5 = 2.4 lies ABOVE plain PPO's 1.2 (looser)
        (0.8, 1.5),  # r < 1: 1.2/0.8 = 1.5 > 1.2
        (1.2, 1.0),  # r > 1: 1.2/1.2 = 1.0 lies BELOW plain PPO's 1.2 (tighter)
        (1.25, 0.96),  # r > 1: 1.2/1.25 = 0.96 < 1.2
    ],
)
def test_acr_upper_bound_position(r: float, bound: float) -> None:
    # A > 0: the gradient is live just below the upper bound and exactly 0 just above it
    big_r = [[bound * 0.98, bound * 1.02, 1.19, 1.21]]
    logprobs, old, rollout = _inputs([[math.log(r)] * 4], _ln(big_r), [[-1.0] * 4])
    _, grad, _ = _run(logprobs, old, rollout, [1.0], [[1.0] * 4], "acr", clip_low=0.2, clip_high=0.2)
    w = min(r, 2.0)
    assert_close(grad[0, 0], torch.tensor(-w * bound * 0.98, dtype=F64))
    assert grad[0, 1] == 0
    # around plain PPO's 1.2: for r < 1 both 1.19 and 1.21 are still inside (bound > 1.2), for r > 1 both are clipped
    if r < 1:
        assert grad[0, 2] != 0 and grad[0, 3] != 0
    else:
        assert grad[0, 2] == 0 and grad[0, 3] == 0
    # plain PPO clips at 1.2 whatever r is
    _, grad_ppo, _ = _run(logprobs, old, rollout, [1.0], [[1.0] * 4], "none", clip_low=0.2, clip_high=0.2)
    assert grad_ppo[0, 2] != 0 and grad_ppo[0, 3] == 0


def test_acr_with_r_equal_one_is_plain_ppo() -> None:
    logprobs, old, rollout = _inputs([[0.0] * 4], _ln([[0.7, 0.9, 1.1, 1.3]]), [[-1.0, -0.5, -2.0, -0.1]])
    for adv in ([1.0], [-1.0]):
        acr_loss, acr_grad, _ = _run(logprobs, old, rollout, adv, [[1.0] * 4], "acr", clip_low=0.2, clip_high=0.2)
        ppo_loss, ppo_grad, _ = _run(logprobs, old, rollout, adv, [[1.0] * 4], "none", clip_low=0.2, clip_high=0.2)
        assert_close(acr_loss, ppo_loss)
        assert_close(acr_grad, ppo_grad)


# --------------------------------------------------------------------------------------------- none
def test_none_ignores_the_rollout_policy() -> None:
    # r far from 1 does not matter: w = 1; clip [0.8, 1.28]
    logprobs, old, rollout = _inputs([[5.0, -5.0, 0.0]], _ln([[1.1, 1.5, 0.5]]), [[-1.0, -0.2, -3.0]])
    loss, grad, stats = _run(logprobs, old, rollout, [2.0], [[1.0, 1.0, 1.0]], "none")
    # A=2: -2.2 | R=1.5 clipped: -2.56, grad 0 | R=0.5: -1.0 (min(1.0, 1.6)), grad -1.0
    assert_close(loss, torch.tensor([[-2.2, -2.56, -1.0]], dtype=F64))
    assert_close(grad, torch.tensor([[-2.2, 0.0, -1.0]], dtype=F64))
    assert stats["is_weight_sum"].item() == 3.0 and stats["is_weight_max"].item() == 1.0
    assert stats["masked_tokens"].item() == 0.0 and stats["clipped_tokens"].item() == 1.0
    assert_close(stats["rollout_ratio_max"], torch.tensor(math.exp(5.0), dtype=F64))


def test_bad_correction_arguments_raise() -> None:
    logprobs, old, rollout = _inputs([[0.0]], [[0.0]])
    with pytest.raises(ValueError, match="unknown rollout correction"):
        _run(logprobs, old, rollout, [1.0], [[1.0]], "ppo")
    with pytest.raises(ValueError, match="acr"):
        _run(logprobs, old, rollout, [1.0], [[1.0]], "acr", level="sequence")
    with pytest.raises(ValueError, match="tis"):
        _run(logprobs, old, rollout, [1.0], [[1.0]], "tis", level="geometric")
    with pytest.raises(ValueError, match="> 1"):
        _run(logprobs, old, rollout, [1.0], [[1.0]], "mis", cap=1.0)


# --------------------------------------------------------------------------------------------- seq_sum_norm
TOKEN_LOSS = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
AGG_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_aggregate_seq_sum_norm() -> None:
    # (1 + 2 + 3 + 4) / (3 sequences * 4 tokens) = 10/12; with 8 tokens: 10/24
    assert_close(aggregate(TOKEN_LOSS, AGG_MASK, "seq_sum_norm", 4.0, 3.0, norm_tokens=4.0), torch.tensor(10 / 12))
    assert_close(aggregate(TOKEN_LOSS, AGG_MASK, "seq_sum_norm", 4.0, 3.0, norm_tokens=8.0), torch.tensor(10 / 24))
    # the normaliser ignores the token count (contrast token_mean: 10/4) and the lengths (seq_mean: (2 + 4)/3)
    assert_close(aggregate(TOKEN_LOSS, AGG_MASK, "seq_sum_norm", 99.0, 3.0, norm_tokens=4.0), torch.tensor(10 / 12))
    parts = sum(
        aggregate(TOKEN_LOSS[i : i + 1], AGG_MASK[i : i + 1], "seq_sum_norm", 4.0, 3.0, norm_tokens=4.0)
        for i in range(3)
    )
    assert_close(parts, torch.tensor(10 / 12))
    with pytest.raises(ValueError, match="norm_tokens"):
        aggregate(TOKEN_LOSS, AGG_MASK, "seq_sum_norm", 4.0, 3.0)


def _batch(old, rollout, adv, mask, ref=None) -> TokenBatch:
    zeros = torch.zeros(mask.shape, dtype=torch.long)
    extra = {} if ref is None else {"ref_logprobs": ref}
    return TokenBatch(
        tokens=zeros,
        labels=zeros,
        loss_mask=mask,
        advantages=adv,
        rollout_logprobs=rollout,
        old_logprobs=old,
        **extra,
    )


def test_grpo_loss_seq_sum_norm_budget() -> None:
    # on-policy, A = [1, -1], mask 3 + 1 tokens: token losses -1, -1, -1 | +1 -> sum -2
    old = torch.full((2, 4), -1.0, dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=F64)
    mb = _batch(old, old.clone(), torch.tensor([1.0, -1.0], dtype=F64), mask)
    # budget from rollout.max_new_tokens = 5: -2 / (2 * 5) = -0.2
    loss, _ = grpo_loss(AlgoConfig(loss_agg="seq_sum_norm"), max_new_tokens=5)(old.clone(), mb, 4.0, 2.0)
    assert_close(loss, torch.tensor(-0.2, dtype=F64))
    # algo.loss_norm_tokens = 10 wins: -2 / 20 = -0.1
    algo = AlgoConfig(loss_agg="seq_sum_norm", loss_norm_tokens=10)
    assert_close(grpo_loss(algo, max_new_tokens=5)(old.clone(), mb, 4.0, 2.0)[0], torch.tensor(-0.1, dtype=F64))
    with pytest.raises(ValueError, match="loss_norm_tokens"):
        grpo_loss(AlgoConfig(loss_agg="seq_sum_norm"))


# --------------------------------------------------------------------------------------------- KL, entropy
def test_kl_estimators_hand_computed() -> None:
    logprobs = torch.tensor([math.log(0.5), math.log(0.25), -1.0], dtype=F64, requires_grad=True)
    ref = torch.tensor([math.log(0.25), math.log(0.5), -1.0], dtype=F64)
    # k1 = logp - ref = ln2, -ln2, 0; gradient 1
    k1 = kl_penalty(logprobs, ref, "k1")
    assert_close(k1, torch.tensor([LN2, -LN2, 0.0], dtype=F64))
    (g1,) = torch.autograd.grad(k1.sum(), logprobs)
    assert_close(g1, torch.ones(3, dtype=F64))
    # k3 with d = ref - logp = -ln2, ln2, 0: e^d - d - 1 = 0.5 + ln2 - 1, 2 - ln2 - 1, 0; gradient 1 - e^d = 0.5, -1, 0
    k3 = kl_penalty(logprobs, ref, "k3")
    assert_close(k3, torch.tensor([LN2 - 0.5, 1.0 - LN2, 0.0], dtype=F64))
    assert bool((k3 >= 0).all())
    (g3,) = torch.autograd.grad(k3.sum(), logprobs)
    assert_close(g3, torch.tensor([0.5, -1.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="k1 or k3"):
        kl_penalty(logprobs, ref, "k2")


def test_grpo_loss_kl_and_entropy_terms() -> None:
    # A = 0 and R = 1: the policy term is 0; k1 KL = logp - ref = 0.3, -0.1 (padding: 9); entropy 2, 1 (padding 5)
    old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
    ref = old - torch.tensor([[0.3, -0.1, 9.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=F64)
    mb = _batch(old, old.clone(), torch.zeros(1, dtype=F64), mask, ref=ref)
    logprobs = old.clone().requires_grad_(True)
    entropy = torch.tensor([[2.0, 1.0, 5.0]], dtype=F64, requires_grad=True)
    algo = AlgoConfig(kl_coef=0.5, kl_estimator="k1", entropy_coef=0.1)
    loss, stats = grpo_loss(algo)(logprobs, mb, 2.0, 1.0, entropy=entropy)
    # tokens: 0.5*0.3 - 0.1*2 = -0.05; 0.5*(-0.1) - 0.1*1 = -0.15; token mean over 2: -0.1
    assert_close(loss, torch.tensor(-0.1, dtype=F64))
    assert_close(stats["kl_sum"], torch.tensor(0.2, dtype=F64))
    assert set(stats) == STAT_KEYS | {"kl_sum", "tokens"}
    loss.backward()
    # d/dlogp: policy term -R·A = 0, KL 0.5 * 1 / 2 tokens = 0.25; d/dentropy: -0.1 / 2 = -0.05; padding 0
    assert_close(logprobs.grad, torch.tensor([[0.25, 0.25, 0.0]], dtype=F64))
    assert_close(entropy.grad, torch.tensor([[-0.05, -0.05, 0.0]], dtype=F64))

    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(algo)(logprobs, _batch(old, old.clone(), torch.zeros(1, dtype=F64), mask), 2.0, 1.0, entropy)
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(algo)(logprobs, mb, 2.0, 1.0)
    # both off (the defaults): no KL stat, no entropy needed
    _, plain = grpo_loss(AlgoConfig())(logprobs, mb, 2.0, 1.0)
    assert set(plain) == STAT_KEYS | {"tokens"}


def test_grpo_loss_applies_the_configured_correction() -> None:
    # the TIS example through grpo_loss with token_mean over 8 tokens: sum of the hand losses / 8
    logprobs, old, rollout = _inputs(_ln(TIS_R), _ln(TIS_BIG_R), TIS_OLD)
    mb = _batch(old, rollout, torch.tensor(TIS_ADV, dtype=F64), torch.tensor(TIS_MASK, dtype=F64))
    algo = AlgoConfig(clip_low=0.2, clip_high=0.28, correction="tis", correction_cap=2.0)
    loss, stats = grpo_loss(algo)(logprobs, mb, 8.0, 2.0)
    # -0.55 - 2.56 - 0.75 + 4.4 + 0.4 + 3.0 = 3.94
    assert_close(loss, torch.tensor(3.94 / 8.0, dtype=F64))
    assert stats["tokens"].item() == 6.0 and stats["clipped_tokens"].item() == 2.0
    assert set(MAX_STATS) == {key for key in stats if key.endswith("_max")}


def test_token_batch_split_carries_ref_logprobs() -> None:
    mask = torch.ones(4, 2)
    batch = _batch(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4), mask, ref=torch.arange(8.0).view(4, 2))
    parts = batch.split(2)
    assert torch.equal(parts[1].ref_logprobs, torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert _batch(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4), mask).split(2)[0].ref_logprobs.numel() == 0


# --------------------------------------------------------------------------------------------- DAPO overlong
def test_overlong_penalty_hand_computed() -> None:
    # max_len 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 at 10 and beyond
    lengths = [0, 5, 6, 7, 8, 9, 10, 12]
    assert_close(overlong_penalty(lengths, 10, 4, 1.0), torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]))
    assert_close(
        overlong_penalty(torch.tensor(lengths), 10, 4, 0.5),
        torch.tensor([0.0, 0.0, 0.0, -0.125, -0.25, -0.375, -0.5, -0.5]),
    )
    assert torch.equal(overlong_penalty(lengths, 10, 0, 1.0), torch.zeros(8))
    assert overlong_penalty(lengths, 10, 4).dtype == torch.float32
    with pytest.raises(ValueError, match="overlong buffer"):
        overlong_penalty(lengths, 10, 11)


def test_mask_truncated() -> None:
    loss_mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert torch.equal(truncation_keep([True, False, True]), torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(
        mask_truncated(loss_mask, [True, False, True]), torch.tensor([[0.0, 1.0, 1.0], [0.0] * 3, [1.0, 1.0, 0.0]])
    )
    with pytest.raises(ValueError, match="2 finished flags"):
        mask_truncated(loss_mask, [True, False])


# --------------------------------------------------------------------------------------------- config
def test_new_algo_config_defaults() -> None:
    algo = AlgoConfig()
    assert (algo.correction, algo.correction_level, algo.correction_cap) == ("none", "token", 2.0)
    assert (algo.kl_coef, algo.kl_estimator, algo.entropy_coef, algo.loss_norm_tokens) == (0.0, "k1", 0.0, 0)
    assert (algo.overlong_buffer, algo.overlong_penalty, algo.mask_truncated) == (0, 1.0, False)
    cfg = load_config(None, ["algo.correction=mis", "algo.correction_level=geometric", "algo.loss_agg=seq_sum_norm"])
    assert cfg.algo.correction_level == "geometric" and cfg.algo.loss_agg == "seq_sum_norm"


@pytest.mark.parametrize(
    ("overrides", "parts"),
    [
        (["algo.correction=tiss"], ["algo.correction", "tis"]),
        (["algo.correction=acr", "algo.correction_level=sequence"], ["algo.correction_level", "token"]),
        (["algo.correction=tis", "algo.correction_level=geometric"], ["algo.correction_level", "sequence"]),
        (["algo.correction_cap=1.0"], ["algo.correction_cap=1.0", "> 1"]),
        (["algo.loss_agg=seq_sum"], ["algo.loss_agg", "seq_sum_norm"]),
        (["algo.loss_norm_tokens=-1"], ["algo.loss_norm_tokens=-1", ">= 0"]),
        (["algo.kl_coef=-0.1"], ["algo.kl_coef", ">= 0"]),
        (["algo.kl_estimator=k2"], ["algo.kl_estimator", "k1", "k3"]),
        (["algo.entropy_coef=-1"], ["algo.entropy_coef", ">= 0"]),
        (["algo.overlong_penalty=-1"], ["algo.overlong_penalty", ">= 0"]),
        (["algo.overlong_buffer=8"], ["algo.overlong_buffer=8", "rollout.max_new_tokens=8"]),
    ],
)
def test_bad_algo_values_name_the_key(overrides: list[str], parts: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for part in parts:
        assert part in str(info.value), (part, str(info.value))

"""Advantages, policy losses, loss functions and token batches, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from qrl_megatron.algos.advantages import group_advantages
from qrl_megatron.algos.corrections import corrected_ppo_token_loss
from qrl_megatron.algos.losses import aggregate, sft_token_loss
from qrl_megatron.algos.policy_loss import grpo_loss, sft_loss
from qrl_megatron.config import AlgoConfig
from qrl_megatron.learner.batch import TokenBatch, pack_sequences

pytestmark = pytest.mark.unit

F64 = torch.float64


# --------------------------------------------------------------------------------------------- advantages
def test_grpo_advantages_hand_computed() -> None:
    # group 1: mean 0.25, centered [0.75, -0.25, -0.25, -0.25], population std sqrt(0.1875) = sqrt(3) / 4
    # group 2: mean 0.5, centered [0.5, 0.5, -0.5, -0.5], std 0.5
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    adv = group_advantages(rewards, 4, "grpo", std_eps=0.0)
    s3 = math.sqrt(3.0)
    assert_close(adv, torch.tensor([s3, -1 / s3, -1 / s3, -1 / s3, 1.0, 1.0, -1.0, -1.0]))
    # with the epsilon: 0.75 / (sqrt(3)/4 + 0.1)
    adv_eps = group_advantages(rewards, 4, "grpo", std_eps=0.1)
    assert_close(adv_eps[0], torch.tensor(0.75 / (s3 / 4 + 0.1)))
    assert_close(adv_eps[4], torch.tensor(0.5 / 0.6))
    assert adv.dtype == torch.float32 and adv.shape == (8,)


def test_drgrpo_advantages_are_centered_rewards() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    adv = group_advantages(rewards, 4, "drgrpo")
    assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]))
    # groups of 2: [3, 1] -> [1, -1]; [0, 0.5] -> [-0.25, 0.25]
    assert_close(
        group_advantages(torch.tensor([3.0, 1.0, 0.0, 0.5]), 2, "drgrpo"), torch.tensor([1.0, -1.0, -0.25, 0.25])
    )


@pytest.mark.parametrize("mode", ["grpo", "drgrpo"])
def test_all_equal_group_gives_zero_advantage(mode: str) -> None:
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.5])
    adv = group_advantages(rewards, 3, mode)
    assert torch.equal(adv[:6], torch.zeros(6))
    assert adv[6] > 0 and adv[7] < 0 and adv[8] == 0


def test_group_size_one_gives_zero() -> None:
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0, 1.0]), 1, "grpo"), torch.zeros(3))


def test_group_size_mismatch_and_unknown_mode_raise() -> None:
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.ones(6), 4)
    with pytest.raises(ValueError, match="unknown advantage mode"):
        group_advantages(torch.ones(4), 2, "ppo")


# --------------------------------------------------------------------------------------------- ppo clip loss
def plain_ppo_clip(logprobs, old, adv, mask, clip_low, clip_high):
    # the plain PPO clip loss: no rollout correction, the engine sampled from the proximal policy itself
    return corrected_ppo_token_loss(logprobs, old, old, adv, mask, clip_low, clip_high, correction="none")


CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # ratio range [0.8, 1.28]
# row 0 has A = +2, row 1 has A = -1; the last position of each row is masked (huge ratio there)
RATIOS = [[1.1, 1.5, 0.5, 1.25, math.exp(3.0)], [1.1, 1.5, 0.5, 0.75, math.exp(3.0)]]
MASK = [[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0]]
ADV = [2.0, -1.0]
# A > 0: -min(r A, clip(r) A); A < 0 likewise
EXPECTED_LOSS = [
    [-1.1 * 2, -1.28 * 2, -0.5 * 2, -1.25 * 2, 0.0],  # inside, clipped high, unclipped low, inside (< 1+clip_high)
    [1.1, 1.5, 0.8, 0.8, 0.0],  # inside, unclipped high, clipped low, clipped low (< 1-clip_low)
]
# d loss / d logprob = -r A where the unclipped branch is active, 0 where the clipped one is (and where masked)
EXPECTED_GRAD = [[-2.2, 0.0, -1.0, -2.5, 0.0], [1.1, 1.5, 0.0, 0.0, 0.0]]


def _ppo_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0], [-0.7, -1.2, -2.5, -0.1, -4.0]], dtype=F64)
    logprobs = (old + torch.tensor(RATIOS, dtype=F64).log()).requires_grad_(True)
    return logprobs, old, torch.tensor(ADV, dtype=F64), torch.tensor(MASK, dtype=F64)


def test_ppo_clip_loss_values_and_gradients() -> None:
    logprobs, old, adv, mask = _ppo_inputs()
    loss, stats = plain_ppo_clip(logprobs, old, adv, mask, CLIP_LOW, CLIP_HIGH)
    assert_close(loss, torch.tensor(EXPECTED_LOSS, dtype=F64))
    loss.sum().backward()
    assert_close(logprobs.grad, torch.tensor(EXPECTED_GRAD, dtype=F64))
    # clipped branch active exactly where the gradient vanishes on unmasked tokens
    assert stats["clipped_tokens"].item() == 3.0
    assert_close(stats["ratio_sum"], torch.tensor(2 * (1.1 + 1.5 + 0.5) + 1.25 + 0.75, dtype=F64))


def test_ppo_clip_gradient_zero_exactly_where_clipped_branch_is_active() -> None:
    logprobs, old, adv, mask = _ppo_inputs()
    loss, _ = plain_ppo_clip(logprobs, old, adv, mask, CLIP_LOW, CLIP_HIGH)
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    ratio = torch.tensor(RATIOS, dtype=F64)
    a = adv.unsqueeze(-1)
    clipped_active = ((a > 0) & (ratio > 1 + CLIP_HIGH)) | ((a < 0) & (ratio < 1 - CLIP_LOW))
    live = mask.bool()
    assert torch.all(grad[clipped_active & live] == 0)
    assert torch.all(grad[~clipped_active & live] != 0)
    assert torch.all(grad[~live] == 0)
    assert torch.all(loss[~live] == 0)


def test_ppo_clip_on_policy_loss_is_minus_advantage() -> None:
    # ratio 1 everywhere: loss = -A on every unmasked token, gradient -A
    logprobs = torch.full((2, 3), -1.5, dtype=F64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=F64)
    loss, stats = plain_ppo_clip(logprobs, logprobs.detach(), torch.tensor([0.5, -3.0], dtype=F64), mask, 0.2, 0.2)
    assert_close(loss, torch.tensor([[-0.5, -0.5, 0.0], [0.0, 3.0, 3.0]], dtype=F64))
    loss.sum().backward()
    assert_close(logprobs.grad, torch.tensor([[-0.5, -0.5, 0.0], [0.0, 3.0, 3.0]], dtype=F64))
    assert stats["clipped_tokens"].item() == 0.0


# --------------------------------------------------------------------------------------------- aggregation, sft
TOKEN_LOSS = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
AGG_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_aggregate_token_mean_vs_seq_mean() -> None:
    # token mean: (1 + 2 + 3 + 4) / 4 tokens = 2.5; seq mean: (6/3 + 4/1 + 0) / 3 sequences = 2.0
    assert_close(aggregate(TOKEN_LOSS, AGG_MASK, "token_mean", 4.0, 3.0), torch.tensor(2.5))
    assert_close(aggregate(TOKEN_LOSS, AGG_MASK, "seq_mean", 4.0, 3.0), torch.tensor(2.0))
    # global normalisers larger than this micro-batch's share
    assert_close(aggregate(TOKEN_LOSS, AGG_MASK, "token_mean", 8.0, 3.0), torch.tensor(1.25))
    assert_close(aggregate(TOKEN_LOSS, AGG_MASK, "seq_mean", 4.0, 6.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(TOKEN_LOSS, AGG_MASK, "sum", 4.0, 3.0)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_aggregate_micro_batches_sum_to_the_global_mean(mode: str) -> None:
    whole = aggregate(TOKEN_LOSS, AGG_MASK, mode, 4.0, 3.0)
    parts = sum(aggregate(TOKEN_LOSS[i : i + 1], AGG_MASK[i : i + 1], mode, 4.0, 3.0) for i in range(3))
    assert_close(parts, whole)


def test_sft_token_loss() -> None:
    logprobs = torch.tensor([[-0.5, -1.0, -2.0], [-3.0, -0.25, -7.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss = sft_token_loss(logprobs, mask)
    assert_close(loss, torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.25, 0.0]]))
    loss.sum().backward()
    assert_close(logprobs.grad, -mask)


# --------------------------------------------------------------------------------------------- policy_loss
def _micro_batch(old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> TokenBatch:
    zeros = torch.zeros(mask.shape, dtype=torch.long)
    return TokenBatch(
        tokens=zeros, labels=zeros, loss_mask=mask, advantages=adv, rollout_logprobs=old.clone(), old_logprobs=old
    )


def test_grpo_loss_token_mean_and_seq_mean() -> None:
    logprobs, old, adv, mask = _ppo_inputs()
    mb = _micro_batch(old, adv, mask)
    algo = AlgoConfig(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, loss_agg="token_mean")
    loss, stats = grpo_loss(algo)(logprobs, mb, 8.0, 2.0)
    expected = torch.tensor(EXPECTED_LOSS, dtype=F64)
    assert_close(loss, expected.sum() / 8.0)
    assert stats["tokens"].item() == 8.0 and stats["clipped_tokens"].item() == 3.0
    loss.backward()
    assert_close(logprobs.grad, torch.tensor(EXPECTED_GRAD, dtype=F64) / 8.0)

    algo_seq = AlgoConfig(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, loss_agg="seq_mean")
    loss_seq, _ = grpo_loss(algo_seq)(logprobs.detach(), mb, 8.0, 4.0)
    assert_close(loss_seq, (expected[0].sum() / 4 + expected[1].sum() / 4) / 4.0)


def test_sft_loss_is_token_mean_nll() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -0.5, -9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    mb = _micro_batch(torch.zeros(2, 3), torch.zeros(2), mask)
    loss, stats = sft_loss(logprobs, mb, 4.0, 2.0)
    assert_close(loss, torch.tensor((2.0 + 4.0 + 0.5 + 0.5) / 4.0))
    assert stats["tokens"].item() == 4.0


# --------------------------------------------------------------------------------------------- token batches
PAD = 0


def test_pack_sequences_alignment() -> None:
    batch = pack_sequences(
        prompts=[[5, 6, 7], [8]],
        completions=[[9, 10], [11, 12, 13]],
        seq_length=6,
        pad_id=PAD,
        advantages=[0.5, -0.5],
        rollout_logprobs=[[-0.1, -0.2], [-0.3, -0.4, -0.5]],
    )
    assert torch.equal(batch.tokens, torch.tensor([[5, 6, 7, 9, 10, 0], [8, 11, 12, 13, 0, 0]]))
    assert torch.equal(batch.labels, torch.tensor([[6, 7, 9, 10, 0, 0], [11, 12, 13, 0, 0, 0]]))
    # position t predicts token t+1: completion tokens are predicted at p-1 .. p+k-2
    assert torch.equal(batch.loss_mask, torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(batch.labels[0][batch.loss_mask[0].bool()], torch.tensor([9, 10]))
    assert torch.equal(batch.labels[1][batch.loss_mask[1].bool()], torch.tensor([11, 12, 13]))
    assert torch.equal(
        batch.rollout_logprobs,
        torch.tensor([[0.0, 0.0, -0.1, -0.2, 0.0, 0.0], [-0.3, -0.4, -0.5, 0.0, 0.0, 0.0]]),
    )
    assert torch.equal(batch.advantages, torch.tensor([0.5, -0.5]))
    assert batch.tokens.dtype == torch.long and batch.labels.dtype == torch.long
    assert batch.num_tokens == 5.0 and len(batch) == 2
    assert batch.old_logprobs.numel() == 0


def test_pack_sequences_exact_fit_and_defaults() -> None:
    batch = pack_sequences([[1, 2]], [[3, 4, 5, 6]], seq_length=6, pad_id=63)
    assert torch.equal(batch.tokens, torch.tensor([[1, 2, 3, 4, 5, 6]]))
    assert torch.equal(batch.labels, torch.tensor([[2, 3, 4, 5, 6, 63]]))
    assert torch.equal(batch.loss_mask, torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]]))
    assert torch.equal(batch.advantages, torch.zeros(1))
    assert torch.equal(batch.rollout_logprobs, torch.zeros(1, 6))


def test_pack_sequences_too_long_raises() -> None:
    with pytest.raises(ValueError, match="sequence 1 has 7 tokens"):
        pack_sequences([[1, 2], [1, 2, 3]], [[3], [4, 5, 6, 7]], seq_length=6, pad_id=PAD)


def _numbered_batch(n: int = 4) -> TokenBatch:
    return pack_sequences(
        prompts=[[i + 1] for i in range(n)],
        completions=[[10 + i, 20 + i] for i in range(n)],
        seq_length=4,
        pad_id=PAD,
        advantages=[float(i) for i in range(n)],
        rollout_logprobs=[[-float(i), -float(i) - 0.5] for i in range(n)],
    )


def test_token_batch_split() -> None:
    batch = _numbered_batch(4)
    parts = batch.split(2)
    assert [len(p) for p in parts] == [2, 2]
    assert torch.equal(parts[0].advantages, torch.tensor([0.0, 1.0]))
    assert torch.equal(parts[1].advantages, torch.tensor([2.0, 3.0]))
    assert torch.equal(parts[1].tokens, batch.tokens[2:])
    assert torch.equal(parts[1].labels, batch.labels[2:])
    assert torch.equal(parts[1].rollout_logprobs, torch.tensor([[-2.0, -2.5, 0.0, 0.0], [-3.0, -3.5, 0.0, 0.0]]))
    # an unset old_logprobs stays empty instead of failing to index
    assert parts[0].old_logprobs.numel() == 0 and parts[1].old_logprobs.numel() == 0
    assert sum(p.num_tokens for p in parts) == batch.num_tokens == 8.0


def test_token_batch_select_with_index_and_old_logprobs() -> None:
    batch = _numbered_batch(4)
    batch.old_logprobs = torch.arange(16, dtype=torch.float32).view(4, 4)
    picked = batch.select(torch.tensor([3, 0]))
    assert torch.equal(picked.advantages, torch.tensor([3.0, 0.0]))
    assert torch.equal(picked.tokens, torch.tensor([[4, 13, 23, 0], [1, 10, 20, 0]]))
    assert torch.equal(picked.old_logprobs, torch.tensor([[12.0, 13.0, 14.0, 15.0], [0.0, 1.0, 2.0, 3.0]]))
    assert torch.equal(picked.loss_mask, batch.loss_mask[[3, 0]])


def test_split_refuses_uneven_parts() -> None:
    from qrl_megatron.learner.batch import pack_sequences

    batch = pack_sequences([[2, 3]] * 3, [[4]] * 3, 8, 0)
    with pytest.raises(ValueError, match="3 sequences"):
        batch.split(2)


def test_learning_rate_schedule() -> None:
    from qrl_megatron.learner.learner import scheduled_lr

    def rl(step: int) -> float:  # learner.lr=1e-4, lr_warmup_steps=10, cosine to 10% at trainer.max_steps=110
        return scheduled_lr(1e-4, step, 110, warmup_steps=10, schedule="cosine", min_ratio=0.1)

    assert rl(1) == pytest.approx(1e-5)
    assert rl(10) == pytest.approx(1e-4)
    assert rl(60) == pytest.approx(1e-4 * (0.1 + 0.9 * 0.5))
    assert rl(110) == pytest.approx(1e-5)
    assert scheduled_lr(1e-4, 1, 110, schedule="constant") == scheduled_lr(1e-4, 110, 110, schedule="constant") == 1e-4
    # the warm-start's schedule (0-based steps, no warm-up, cosine to 10% of warmstart.lr at warmstart.steps)
    for step in range(300):
        expected = 3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / 300)))
        assert scheduled_lr(3e-3, step, 300) == pytest.approx(expected, rel=1e-14)

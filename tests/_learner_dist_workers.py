"""Spawn-importable workers for the learner invariance tests (tests/test_learner.py)."""

from __future__ import annotations

import torch

from qrl_megatron.algos.policy_loss import grpo_loss
from qrl_megatron.config import AlgoConfig, LearnerConfig
from qrl_megatron.learner.batch import pack_sequences
from qrl_megatron.learner.learner import Learner
from qrl_megatron.models.base import load_hf_weights
from qrl_megatron.models.registry import load_spec
from qrl_megatron.platform import init_distributed

SEQ_LENGTH = 16


def rollout_like_batch(vocab_size: int, size: int = 8):
    """A deterministic GRPO batch: random prompts/completions, advantages and behaviour logprobs."""
    g = torch.Generator().manual_seed(1234)
    prompts = [
        torch.randint(2, vocab_size, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(size)
    ]
    completions = [
        torch.randint(1, vocab_size, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
        for _ in range(size)
    ]
    behaviour = [(-torch.rand(len(c), generator=g) * 3).tolist() for c in completions]
    advantages = torch.randn(size, generator=g)
    return pack_sequences(prompts, completions, SEQ_LENGTH, 0, advantages=advantages, rollout_logprobs=behaviour)


def update_worker(
    rank: int,
    world_size: int,
    tp: int,
    pp: int,
    dp: int,
    model_dir: str,
    micro_batch_size: int,
    options: dict | None = None,
) -> dict:
    """Two GRPO updates on the same global batch; returns losses, logprobs and the gathered weights (rank 0).

    ``options``: further LearnerConfig fields (the memory settings); the result then also holds this stage's
    saved-activation bytes of one micro-batch."""
    from qrl_megatron.learner.activations import measure_saved_activation_bytes

    layout = init_distributed(tp, pp, dp, seed=0)
    torch.set_num_threads(1)
    spec = load_spec(model_dir)
    cfg = LearnerConfig(tp=tp, pp=pp, dp=dp, lr=1e-3, micro_batch_size=micro_batch_size, **(options or {}))
    learner = Learner(spec, layout, cfg, load_hf_weights(model_dir), lr=cfg.lr, seq_length=SEQ_LENGTH)
    batch = rollout_like_batch(spec.vocab_size)
    local = batch.split(dp)[layout.dp_rank]
    saved = measure_saved_activation_bytes(learner, local) if options else None
    out = learner.logprobs(local)
    if out is not None:  # last stage only: shift the proximal policy so the ratio is not 1 and the clip acts
        local.old_logprobs = out[0] + 0.15 * local.loss_mask * torch.sign(local.advantages).unsqueeze(-1)
    loss_fn = grpo_loss(AlgoConfig(clip_low=0.2, clip_high=0.28))
    losses = [learner.train_step(local, loss_fn, batch.num_tokens, len(batch))["loss"] for _ in range(2)]
    after = learner.logprobs(local)
    gathered = learner.gather_hf_weights(dtype=torch.float32, dst=0)
    logprobs = torch.cat([torch.zeros(0)] + ([out[0]] if out is not None else []))
    return {
        "rank": rank,
        "dp_rank": layout.dp_rank,
        "last_stage": layout.is_last_stage,
        "tp_rank": layout.tp_rank,
        "losses": losses,
        "old_logprobs": logprobs,
        "new_logprobs": after[0] if after is not None else None,
        "weights": gathered,
        "loss_mask": local.loss_mask,
        "saved_activation_bytes": saved,
    }


def direction_worker(rank: int, world_size: int, model_dir: str) -> dict:
    """One GRPO step: how the sequence logprobs of positive- and negative-advantage samples move."""
    layout = init_distributed(1, 1, 1, seed=0)
    spec = load_spec(model_dir)
    cfg = LearnerConfig(lr=1e-3, micro_batch_size=8)
    learner = Learner(spec, layout, cfg, load_hf_weights(model_dir), lr=cfg.lr, seq_length=SEQ_LENGTH)
    batch = rollout_like_batch(spec.vocab_size)
    before = learner.logprobs(batch)[0]
    batch.old_logprobs = before
    learner.train_step(batch, grpo_loss(AlgoConfig()), batch.num_tokens, len(batch))
    after = learner.logprobs(batch)[0]
    change = ((after - before) * batch.loss_mask).sum(-1)
    return {"change": change, "advantages": batch.advantages}

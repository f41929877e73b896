"""Spawn-importable workers for the fault tests (tests/test_faults.py): faults are injected here, never in the code."""

from __future__ import annotations

import math

import torch
from _learner_dist_workers import SEQ_LENGTH, rollout_like_batch

from qrl_megatron.algos.policy_loss import grpo_loss
from qrl_megatron.config import AlgoConfig, LearnerConfig
from qrl_megatron.learner.learner import Learner
from qrl_megatron.models.base import load_hf_weights
from qrl_megatron.models.registry import load_spec
from qrl_megatron.platform import init_distributed


def _adam_moments(learner: Learner) -> list[torch.Tensor]:
    return [
        value.clone()
        for state in learner.optimizer.optimizer.state.values()
        for key, value in sorted(state.items())
        if torch.is_tensor(value)
    ]


def nan_step_worker(rank: int, world_size: int, tp: int, model_dir: str) -> dict:
    """A good step, then one whose loss is NaN on tensor-parallel rank ``tp - 1`` only, then a good step again."""
    layout = init_distributed(tp, 1, 1, seed=0)
    torch.set_num_threads(1)
    spec = load_spec(model_dir)
    cfg = LearnerConfig(tp=tp, lr=1e-3, micro_batch_size=8)
    learner = Learner(spec, layout, cfg, load_hf_weights(model_dir), lr=cfg.lr, seq_length=SEQ_LENGTH)
    batch = rollout_like_batch(spec.vocab_size)
    batch.old_logprobs = learner.logprobs(batch)[0]
    good = grpo_loss(AlgoConfig())

    def poisoned(*args, **kwargs):
        loss, metrics = good(*args, **kwargs)
        return (loss * math.nan if layout.tp_rank == tp - 1 else loss), metrics

    first = learner.train_step(batch, good, batch.num_tokens, len(batch))
    weights, moments = learner.gather_hf_weights(dtype=torch.float32, dst=None), _adam_moments(learner)
    skipped = learner.train_step(batch, poisoned, batch.num_tokens, len(batch))
    weights_after, moments_after = learner.gather_hf_weights(dtype=torch.float32, dst=None), _adam_moments(learner)
    recovered = learner.train_step(batch, good, batch.num_tokens, len(batch))
    weights_final = learner.gather_hf_weights(dtype=torch.float32, dst=None)
    return {
        "first_skipped": first["update_skipped"],
        "skipped": skipped["update_skipped"],
        "skipped_grad_norm": skipped["grad_norm"],
        "weights_untouched": all(torch.equal(weights[k], weights_after[k]) for k in weights),
        "moments_untouched": len(moments) > 0 and all(torch.equal(a, b) for a, b in zip(moments, moments_after)),
        "recovered_skipped": recovered["update_skipped"],
        "recovered_moved": any(not torch.equal(weights[k], weights_final[k]) for k in weights),
        "recovered_finite": all(bool(torch.isfinite(t).all()) for t in weights_final.values()),
    }

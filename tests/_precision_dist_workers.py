"""Spawn-importable workers for tests/test_precision.py (the learner's fp8/nvfp4 emulation under TP)."""

from __future__ import annotations

import torch
from _learner_dist_workers import SEQ_LENGTH, rollout_like_batch

from qrl_megatron.algos.policy_loss import sft_loss
from qrl_megatron.config import LearnerConfig
from qrl_megatron.learner.learner import Learner
from qrl_megatron.models.base import load_hf_weights
from qrl_megatron.models.registry import load_spec
from qrl_megatron.platform import init_distributed


def first_steps_worker(rank: int, world_size: int, tp: int, model_dir: str, precisions: tuple[str, ...]) -> dict:
    """Per precision: token logprobs of a fixed batch and the losses of two SFT steps (the loss depends on every
    logit, unlike a GRPO loss at ratio 1). Results are those of the last-stage TP-rank-0 rank (None elsewhere)."""
    layout = init_distributed(tp, 1, 1, seed=0)
    torch.set_num_threads(1)
    spec = load_spec(model_dir)
    weights = load_hf_weights(model_dir)
    batch = rollout_like_batch(spec.vocab_size)
    results: dict[str, dict] = {}
    for precision in precisions:
        cfg = LearnerConfig(tp=tp, lr=1e-3, micro_batch_size=4, precision=precision, lr_warmup_steps=0)
        learner = Learner(spec, layout, cfg, weights, lr=cfg.lr, seq_length=SEQ_LENGTH)
        out = learner.logprobs(batch)
        losses = [learner.train_step(batch, sft_loss, batch.num_tokens, len(batch))["loss"] for _ in range(2)]
        results[precision] = {"logprobs": None if out is None else out[0] * batch.loss_mask, "losses": losses}
        del learner
    return {"tp_rank": layout.tp_rank, "results": results}

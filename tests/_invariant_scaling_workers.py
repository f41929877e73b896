"""Spawn-importable worker for tests/test_invariant_scaling.py: the Megatron learner's forward after scaling."""

from __future__ import annotations

import torch
from _learner_dist_workers import SEQ_LENGTH, rollout_like_batch

from qrl_megatron.algos.invariant_scaling import apply_invariant_scaling
from qrl_megatron.config import LearnerConfig
from qrl_megatron.learner.learner import Learner
from qrl_megatron.models.base import load_hf_weights
from qrl_megatron.models.registry import load_spec
from qrl_megatron.platform import init_distributed


def learner_logprobs_worker(
    rank: int, world_size: int, tp: int, pp: int, model_dir: str, s: float, targets: list[str]
) -> dict:
    """Per-token logprobs of one batch from a learner built on the plain and on the scaled HF weights."""
    layout = init_distributed(tp, pp, 1, seed=0)
    torch.set_num_threads(1)
    spec = load_spec(model_dir)
    cfg = LearnerConfig(tp=tp, pp=pp, micro_batch_size=8)
    weights = load_hf_weights(model_dir)
    batch = rollout_like_batch(spec.vocab_size)
    out = {}
    for name, hf in (("plain", weights), ("scaled", apply_invariant_scaling(weights, s, targets))):
        learner = Learner(spec, layout, cfg, hf, lr=cfg.lr, seq_length=SEQ_LENGTH)
        result = learner.logprobs(batch)
        out[name] = None if result is None else result[0] * batch.loss_mask
    return {"rank": rank, "last_stage": layout.is_last_stage, "tp_rank": layout.tp_rank, **out}

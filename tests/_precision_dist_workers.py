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


def tp_shard_quantize_worker(rank: int, world_size: int, precision: str) -> dict:
    """Fake-quantize this rank's TP shards of a fixed weight and input through the real gloo all-reduce (the
    test's TP=2 half): column-parallel weight rows, row-parallel weight columns, row-parallel input columns."""
    import torch.distributed as dist

    from qrl_megatron.learner.precision import FakeQuantGemm

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    w, x = tp_test_tensors()
    group = dist.group.WORLD
    column, row = FakeQuantGemm(precision, group), FakeQuantGemm(precision, group, input_split=True)
    local_w, local_x = FakeQuantGemm(precision), FakeQuantGemm(precision)  # shard-local statistics
    w_rows, w_cols, x_cols = w.chunk(2, 0)[rank], w.chunk(2, 1)[rank], x.chunk(2, -1)[rank]
    out = {
        "col_w": column.quantize_weight(w_rows.contiguous()),
        "row_w": row.quantize_weight(w_cols.contiguous()),
        "row_x": row.quantize_input(x_cols.contiguous()),
        "col_x": column.quantize_input(x),  # replicated column-parallel input: no reduction
        "local_col_w": local_w.quantize_weight(w_rows.contiguous()),
        "local_row_w": local_w.quantize_weight(w_cols.contiguous()),
        "local_row_x": local_x.quantize_input(x_cols.contiguous()),
    }
    return out


def tp_test_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """A weight whose amax lies in one shard only and an input with token amaxes in either half of the hidden dim."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(96, 352, generator=gen) * 0.05
    w[70, 3] = 0.4
    x = torch.randn(3, 2, 352, generator=gen)
    x[1, 0, 300] = 9.0
    x[2, 1, 10] = -7.0
    return w, x

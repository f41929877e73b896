"""Spawn-importable workers for the LoRA learner tests (tests/test_lora.py)."""

from __future__ import annotations

import torch

from qrl_megatron.algos.policy_loss import grpo_loss
from qrl_megatron.config import AlgoConfig, LearnerConfig
from qrl_megatron.learner.config import LoRAConfig
from qrl_megatron.learner.learner import Learner
from qrl_megatron.learner.memory import learner_memory, planned_learner_memory
from qrl_megatron.lora.layers import gather_adapter
from qrl_megatron.models.base import load_hf_weights
from qrl_megatron.models.registry import load_spec
from qrl_megatron.platform import init_distributed
from tests._learner_dist_workers import SEQ_LENGTH, rollout_like_batch


def lora_update_worker(
    rank: int,
    world_size: int,
    tp: int,
    pp: int,
    dp: int,
    model_dir: str,
    nvfp4_dir: str | None,
    train_norms: bool,
) -> dict:
    """Two GRPO updates of a LoRA learner on one global batch: losses, logprobs and the gathered adapter (rank 0)."""
    layout = init_distributed(tp, pp, dp, seed=0)
    torch.set_num_threads(1)
    spec = load_spec(model_dir)
    cfg = LearnerConfig(
        tp=tp,
        pp=pp,
        dp=dp,
        lr=1e-2,
        micro_batch_size=4,
        lora=LoRAConfig(rank=4, alpha=8.0, train_norms=train_norms),
        base_format="nvfp4" if nvfp4_dir else "bf16",
    )
    base = load_hf_weights(nvfp4_dir) if nvfp4_dir else None
    learner = Learner(
        spec, layout, cfg, load_hf_weights(model_dir), lr=cfg.lr, seq_length=SEQ_LENGTH, frozen_base=base, seed=3
    )
    batch = rollout_like_batch(spec.vocab_size)
    local = batch.split(dp)[layout.dp_rank]
    out = learner.logprobs(local)
    if out is not None:
        local.old_logprobs = out[0] + 0.15 * local.loss_mask * torch.sign(local.advantages).unsqueeze(-1)
    loss_fn = grpo_loss(AlgoConfig(clip_low=0.2, clip_high=0.28))
    losses = [learner.train_step(local, loss_fn, batch.num_tokens, len(batch))["loss"] for _ in range(2)]
    after = learner.logprobs(local)
    adapter = gather_adapter(
        learner.model.module, spec, layout, cfg.lora.adapter(), norms=train_norms, dtype=torch.float32
    )
    trainable = sorted(n for n, p in learner.model.module.named_parameters() if p.requires_grad)
    dense = sorted(n for n, p in learner.model.module.named_parameters() if n.endswith("linear_qkv.weight"))
    state = learner.optimizer.optimizer.state if hasattr(learner.optimizer, "optimizer") else {}
    return {
        "rank": rank,
        "last_stage": layout.is_last_stage,
        "dp_rank": layout.dp_rank,
        "tp_rank": layout.tp_rank,
        "losses": losses,
        "old_logprobs": out[0] if out is not None else None,
        "new_logprobs": after[0] if after is not None else None,
        "adapter": adapter,
        "trainable": trainable,
        "dense_qkv": dense,
        "memory": learner_memory(learner),
        # meta build: only one stage (with PP, tied embeddings make construction collective)
        "planned_memory": planned_learner_memory(spec, layout, cfg) if world_size == 1 else None,
        "optimizer_state_numel": sum(t.numel() for s in state.values() for t in s.values() if torch.is_tensor(t)),
    }

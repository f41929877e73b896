"""Spawn-importable workers for the LoRA learner tests (tests/test_lora.py)."""

from __future__ import annotations

import torch

from qrl_megatron.algos.policy_loss import grpo_loss
from qrl_megatron.bridge.adapter_sync import AdapterSync, learner_prompt_logprobs
from qrl_megatron.bridge.checksum import WeightVerificationError
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


class _StaleEngine:
    """An engine that acknowledges every adapter update and keeps serving the first adapter it had: its logprobs are
    the learner's before training (what vLLM would return if the swap silently did nothing)."""

    def __init__(self, stale: list[list[float]]) -> None:
        self.stale = stale

    def update_adapter(self, tensors, checksums) -> None:
        pass

    def update_norms(self, tensors, checksums) -> None:
        pass

    def prompt_logprobs(self, sequences):
        return self.stale


class _HonestEngine(_StaleEngine):
    def __init__(self, learner, sequences) -> None:
        self.learner, self.sequences = learner, sequences

    def prompt_logprobs(self, sequences):
        return learner_prompt_logprobs(self.learner, sequences)


def adapter_probe_worker(rank: int, world_size: int, model_dir: str) -> dict:
    """The adapter sync's probe gate: passes for an engine serving the learner's adapter, fires for a stale one."""
    layout = init_distributed(1, 1, 1, seed=0)
    torch.set_num_threads(1)
    spec = load_spec(model_dir)
    cfg = LearnerConfig(lr=0.05, micro_batch_size=4, lora=LoRAConfig(rank=4, alpha=8.0), grad_clip=0.0)
    learner = Learner(spec, layout, cfg, load_hf_weights(model_dir), lr=cfg.lr, seq_length=SEQ_LENGTH, seed=1)
    sequences = [[1, 5, 9, 12, 20, 7, 3], [2, 8, 8, 30, 11, 4]]
    before = learner_prompt_logprobs(learner, sequences)
    batch = rollout_like_batch(spec.vocab_size)
    out = learner.logprobs(batch)
    batch.old_logprobs = out[0]
    loss_fn = grpo_loss(AlgoConfig())
    for _ in range(3):
        learner.train_step(batch, loss_fn, batch.num_tokens, len(batch))
    sync = AdapterSync(spec, cfg.lora.adapter(), sequences, probe_every=1, probe_tolerance=0.1)
    honest = sync(learner, _HonestEngine(learner, sequences), 1)
    try:
        sync(learner, _StaleEngine(before), 2)
        stale_error = ""
    except WeightVerificationError as err:
        stale_error = str(err)
    return {"honest": honest, "stale_error": stale_error}

"""QeRL's weight sync: only the LoRA adapter (and trained norms) go to the engine; the frozen base never moves.

The engine started from the base in the rollout format (the NVFP4 codes the learner also holds, or bf16) with LoRA
enabled. Each step: gather the adapter from the learner's TP/PP shards to the rank that drives the engine
(:func:`~qrl_megatron.lora.layers.gather_adapter`), stream it checksummed through the engine's transport
(``update_adapter``: the engine verifies, builds the new adapter and swaps it in atomically), then -- when the
norms train, or when AQN put noise on the engine's norms -- the per-layer norms (``update_norms``).

Verification: per-tensor checksums in the engine, and every ``probe_every`` syncs a logprob probe against the
learner's *own* forward (dequantized base + adapter) on fixed sequences -- no second model is built.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from qrl_megatron.bridge.checksum import WeightVerificationError, checksums
from qrl_megatron.bridge.sync import logprob_gaps
from qrl_megatron.learner.batch import pack_sequences
from qrl_megatron.lora.adapter import AdapterSpec, adapter_bytes, norm_shapes
from qrl_megatron.lora.layers import gather_adapter

__all__ = ["AdapterSync", "learner_prompt_logprobs"]


def learner_prompt_logprobs(learner: Any, sequences: Sequence[Sequence[int]], dst: int = 0) -> list[list[float]] | None:
    """Collective: the learner's logprob of every token after the first of each sequence, at temperature 1, on
    ``dst`` (the engine's ``prompt_logprobs``, computed by the learner itself)."""
    from megatron.core import parallel_state

    seq_length = learner.seq_length
    rows = [list(s)[:seq_length] for s in sequences]
    batch = pack_sequences([r[:1] for r in rows], [r[1:] for r in rows], seq_length, 0)
    temperature, learner.temperature = learner.temperature, 1.0
    try:
        out = learner.logprobs(batch)
    finally:
        learner.temperature = temperature
    payload: list[Any] = [None]
    if out is not None:
        payload = [[out[0][i, : len(r) - 1].tolist() for i, r in enumerate(rows)]]
    if learner.layout.pp > 1:  # the last stage has them; dst is on the first
        dist.broadcast_object_list(
            payload,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return payload[0] if dist.get_rank() == dst else None


class AdapterSync:
    plan = None  # no full-weight plan: the base is never streamed

    def __init__(
        self,
        spec: Any,
        adapter: AdapterSpec,
        probe_sequences: Sequence[Sequence[int]] = (),
        probe_every: int = 0,
        probe_tolerance: float = 0.05,
        send_norms: bool = False,
        verify_checksums: bool = True,
        dst: int = 0,
    ) -> None:
        """``send_norms``: stream the per-layer norms every sync (trained norms, or AQN noise to wash out)."""
        self.spec, self.adapter, self.dst = spec, adapter, dst
        self.sequences = [list(s) for s in probe_sequences if len(s) > 1]
        self.probe_every, self.probe_tolerance = probe_every, probe_tolerance
        self.send_norms = send_norms or adapter.train_norms
        self.verify_checksums = verify_checksums
        self.adapter_bytes = adapter_bytes(spec, adapter.rank, adapter.targets)
        self.norm_bytes = sum(2 * s[0] for s in norm_shapes(spec).values()) if self.send_norms else 0

    def gather(self, learner: Any) -> dict[str, torch.Tensor] | None:
        """Collective: the adapter (+ norms when they stream) on ``dst`` in bf16, PEFT / HF names."""
        return gather_adapter(
            learner.model.module, self.spec, learner.layout, self.adapter, dst=self.dst, norms=self.send_norms
        )

    def __call__(self, learner: Any, engine: Any | None, step: int) -> dict[str, float]:
        start = time.perf_counter()
        tensors = self.gather(learner)
        probing = bool(self.sequences) and self.probe_every > 0 and step % self.probe_every == 0
        reference = learner_prompt_logprobs(learner, self.sequences, self.dst) if probing else None
        if tensors is None:
            return {}
        if engine is None:
            raise ValueError(f"adapter sync: rank {self.dst} drives the engine but was given none")
        lora = {k: v for k, v in tensors.items() if ".lora_" in k}
        norms = {k: v for k, v in tensors.items() if ".lora_" not in k}
        engine.update_adapter(lora, checksums(lora) if self.verify_checksums else {})
        if norms:
            engine.update_norms(norms, checksums(norms) if self.verify_checksums else {})
        sent = sum(t.numel() * t.element_size() for t in tensors.values())
        seconds = time.perf_counter() - start
        metrics = {
            "sync_seconds": seconds,
            "sync_bytes": float(sent),
            "sync_adapter_bytes": float(sum(t.numel() * t.element_size() for t in lora.values())),
            "sync_base_bytes": 0.0,  # the frozen base is never streamed (the engine loaded it at start)
            "sync_gbps": sent / max(seconds, 1e-9) / 1e9,
        }
        if reference is not None:
            gap_max, gap_mean = logprob_gaps(engine.prompt_logprobs(self.sequences), reference)
            metrics.update(probe_gap_max=gap_max, probe_gap_mean=gap_mean)
            if not gap_mean <= self.probe_tolerance:
                raise WeightVerificationError(
                    f"logprob probe after the adapter sync of step {step}: the engine is {gap_mean:.4f} nats on "
                    f"average (max {gap_max:.4f}) off the learner's own forward, above sync.probe_tolerance="
                    f"{self.probe_tolerance}; the engine is not serving the adapter the learner sent"
                )
        return metrics

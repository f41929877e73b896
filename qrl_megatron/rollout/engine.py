"""What every rollout engine provides: the :class:`RolloutEngine` protocol, its result type and shared helpers.

Two engines implement it: the colocated vLLM ``LLM`` (:mod:`qrl_megatron.rollout.vllm_engine`) and a separate
``vllm serve`` process driven over HTTP (:mod:`qrl_megatron.rollout.server_engine`); :mod:`qrl_megatron.rollout.pool`
implements it over N of them (data-parallel rollout). Both move weights through
:class:`qrl_megatron.bridge.transport.SharedMemoryTransport`, seed sampling with :func:`sampling_seed` and keep the
launcher's torchrun variables (:data:`LAUNCHER_ENV`) out of vLLM's processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from qrl_megatron.lora.adapter import AdapterSpec

# Variables torchrun sets for the learner; the engine core is a separate process with a torch.distributed world
# of its own, and inheriting these makes it join (and hang on) the learner's rendezvous.
LAUNCHER_ENV = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
    "GROUP_WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE", "OMP_NUM_THREADS",
)  # fmt: skip


@contextmanager
def engine_environment() -> Iterator[None]:
    """Run the body (an engine's start) without the :data:`LAUNCHER_ENV` variables; restore them afterwards."""
    saved = {k: os.environ.pop(k) for k in LAUNCHER_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def sampling_seed(seed: int, step: int, i: int) -> int:
    """The sampling seed of prompt ``i`` at ``step`` for an engine seeded with ``seed`` (the same in every engine)."""
    return (seed * 1_000_003 + step * 10_007 + i) % (2**31)


# vLLM's sleep-mode memory tags (LLM.sleep / wake_up, vLLM 0.32): the weights, then the KV cache
SLEEP_TAGS = ("weights", "kv_cache")


class EngineDied(RuntimeError):
    """The engine's process is gone (killed, OOM, crashed) or stopped answering within its timeout.

    Engines raise it from the calls a rollout makes, so the trainer can tell a lost engine -- restart it, re-sync
    it from the learner, retry the step -- from a bug, which must stop the run.
    """


@dataclass
class Completion:
    """One sampled completion and what the engine knew about it."""

    prompt_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    rollout_logprobs: list[float]
    text: str
    finished: bool  # ended with EOS (not cut at max_new_tokens)


@dataclass(frozen=True)
class LoRAServing:
    """QeRL mode: the engine serves its base with this LoRA adapter applied unmerged, on every request.

    ``adapter_dir`` is a PEFT adapter folder written once before the engine starts
    (:func:`qrl_megatron.lora.export.write_peft_adapter`); vLLM reads it for the first request only, and every
    later adapter arrives in memory through ``update_adapter``.
    """

    spec: AdapterSpec
    adapter_dir: str
    name: str = "qrl-policy"
    lora_id: int = 1  # vLLM ids start at 1; an OpenAI server numbers its --lora-modules from 1 in order


def lora_engine_args(adapter: LoRAServing | None) -> dict[str, Any]:
    """``LLM`` arguments that serve ``adapter`` (none without one); ``vllm serve`` gets the same as flags.

    One adapter id, ever, in one GPU slot and one CPU-cache slot. What keeps the start-up folder from being re-read
    over an adapter swapped in memory (vLLM 0.32.0, ``LRUCacheWorkerLoRAManager.add_adapter``): a request's adapter
    is loaded from its ``lora_path`` only when its id is not registered, or when ``load_inplace=True`` (never set
    here); with a single id and ``max_cpu_loras=1`` it is never evicted. The one other way it goes is
    ``reset_lora_state`` after a base-weight update, which the engines answer with ``qrl_reinstall_adapter``.
    """
    if adapter is None:
        return {}
    from qrl_megatron.rollout.lora_swap import VLLM_LORA_RANKS, smallest_lora_rank

    rank = smallest_lora_rank(adapter.spec.rank, VLLM_LORA_RANKS)
    return {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1, "max_cpu_loras": 1}


class TransportWeights:
    """The weight calls of an engine, delegated to its transport (one implementation for both engines).

    The engine sets ``self.transport`` (a :class:`~qrl_megatron.bridge.transport.SharedMemoryTransport` over its
    channel) and ``self.adapter`` (its :class:`LoRAServing`, or None).
    """

    transport: Any
    adapter: LoRAServing | None

    def load_weights(self, named_tensors: Mapping[str, torch.Tensor]) -> None:
        """In-place reload of HF-named weights: one checksummed bucket through the weight-transfer path."""
        self.transport.load_weights(named_tensors)
        self._reinstall_adapter()

    def start_weight_update(self) -> None:
        self.transport.start()

    def update_weights(self, tensors: Mapping[str, torch.Tensor], checksums: Mapping[str, str]) -> None:
        """Stream one bucket of checkpoint-format tensors; the engine verifies ``checksums`` before loading (its
        checksum report comes back in the RPC / HTTP error)."""
        self.transport.update(tensors, checksums)

    def finish_weight_update(self) -> None:
        self.transport.finish()  # and resets the prefix cache
        self._reinstall_adapter()

    def begin_step(self, step: int) -> None:
        """The training step now running; a single engine has no use for it (a pool names it when one dies)."""

    def step_metrics(self) -> dict[str, float]:
        """Per-engine figures since the last call (a pool: ``engine<i>/...``); a single engine has none of its own."""
        return {}

    def _reinstall_adapter(self) -> None:
        # vLLM drops every adapter after a base-weight update (reset_lora_state); put the in-memory one back
        if self.adapter is not None:
            self.transport.call_worker("qrl_reinstall_adapter")

    def update_adapter(self, tensors: Mapping[str, torch.Tensor], checksums: Mapping[str, str]) -> None:
        """QeRL mode: swap the served adapter (PEFT names) in memory; the previous one stays if any check fails."""
        from qrl_megatron.rollout.lora_swap import adapter_info

        if self.adapter is None:
            raise RuntimeError("update_adapter: this engine serves no LoRA adapter (start it with adapter=...)")
        self.transport.update_adapter(tensors, checksums, adapter_info(self.adapter.spec, self.adapter.lora_id))

    def update_norms(self, tensors: Mapping[str, torch.Tensor], checksums: Mapping[str, str]) -> None:
        """Trained decoder-layer RMSNorm weights (HF names), checksummed and copied in place."""
        self.transport.update_norms(tensors, checksums)


class RolloutEngine(Protocol):
    """The interface the rollout stage, the evaluation and the weight sync use."""

    tokenizer: Any

    def generate(
        self, prompts: list[str], n: int, temperature: float, max_new_tokens: int, step: int, first_index: int = 0
    ) -> list[Completion]:
        """`n` samples per prompt, grouped prompt by prompt; prompt i is seeded with :func:`sampling_seed` of
        ``first_index + i`` (a shard of a bigger batch samples what the whole batch would)."""
        ...

    def greedy(self, prompts: list[str], max_new_tokens: int) -> list[Completion]: ...

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Engine log-probability of every token after the first, for each token sequence."""
        ...

    def start_weight_update(self) -> None: ...

    def update_weights(self, tensors: Mapping[str, torch.Tensor], checksums: Mapping[str, str]) -> None:
        """One bucket of checkpoint-format tensors; the engine verifies ``checksums`` before loading."""
        ...

    def finish_weight_update(self) -> None: ...

    def load_weights(self, named_tensors: Mapping[str, torch.Tensor]) -> None:
        """In-place reload of HF-named weights (one checksummed bucket)."""
        ...

    def update_adapter(self, tensors: Mapping[str, torch.Tensor], checksums: Mapping[str, str]) -> None:
        """QeRL mode: swap the served LoRA adapter (PEFT names) in memory; on a failed check the engine keeps the
        previous one and this raises WeightVerificationError / AdapterUpdateError."""
        ...

    def update_norms(self, tensors: Mapping[str, torch.Tensor], checksums: Mapping[str, str]) -> None:
        """QeRL mode with trained norms: the decoder-layer RMSNorm weights (HF names), copied in place."""
        ...

    def release_memory(self) -> None:
        """After a rollout: free the engine's GPU memory for the learner phase (rollout.sleep_level; else no-op)."""
        ...

    def reacquire_memory(self, tags: Sequence[str] | None = None) -> None:
        """Take back what ``release_memory`` freed: ``["weights"]`` before a weight sync, all (``None``) before
        generating (every generate call does it itself); a no-op for what is held."""
        ...

    def parameter_checksums(self) -> dict[str, float]: ...

    def add_norm_noise(self, sigma: float, seed: int) -> dict[str, float]: ...

    def begin_step(self, step: int) -> None:
        """The training step now running (an engine pool names it when one of its engines dies)."""
        ...

    def step_metrics(self) -> dict[str, float]:
        """Per-engine figures since the last call (tokens/s, sync seconds and bytes of each engine of a pool)."""
        ...

    def close(self) -> None: ...

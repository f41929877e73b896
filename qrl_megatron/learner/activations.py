"""The activation memory of the learner, measured: what autograd saves for the backward over one micro-batch.

:func:`measure_saved_activation_bytes` runs one training-mode forward of the learner's first micro-batch of a
batch (the micro-batch the learner itself would cut: ``learner.micro_batch_size`` sequences, or the first
token-budget group) on this rank's pipeline stage, under ``torch.autograd.graph.saved_tensors_hooks``, and adds up
the distinct storages autograd keeps (a tensor saved by several nodes, or views of one buffer, count once).
Parameters and buffers are not activations and are left out. On the last stage the forward includes the token
logprobs and entropy (``learner.logprob_chunk_tokens``); a stage after the first starts from a zero hidden state
of the right shape (what the pipeline would receive), so no communication takes place and any rank can measure on
its own. The recompute setting (``learner.recompute``) is whatever the learner was built with; the memory planner
compares its estimate with this figure.
"""

from __future__ import annotations

from typing import Any

import torch

from qrl_megatron.learner.batch import TokenBatch
from qrl_megatron.learner.learner import token_logprobs_and_entropy
from qrl_megatron.learner.model import unwrap_model
from qrl_megatron.learner.precision import precision_autocast

__all__ = ["SavedTensorMeter", "measure_saved_activation_bytes"]


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return str(t.device), storage.data_ptr()


class SavedTensorMeter:
    """Context manager: the distinct storages autograd saves inside it (``bytes``), minus ``exclude``d tensors."""

    def __init__(self, exclude: Any = ()) -> None:
        self._excluded = {_storage_key(t) for t in exclude}
        self._seen: dict[tuple[str, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self._excluded and t.untyped_storage().nbytes():
            self._seen[key] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def measure_saved_activation_bytes(learner: Any, batch: TokenBatch) -> int:
    """Bytes autograd saves over one micro-batch's training forward on this rank's stage (see the module doc).

    No backward runs and no weights change; the graph is dropped on return. Needs a trainable learner (a frozen
    copy saves nothing).
    """
    microbatch, _ = learner._microbatches(batch)[0]
    module = unwrap_model(learner.model)
    state = (module.parameters(), module.buffers())
    exclude = [t for group in state for t in group]
    length = microbatch.tokens.shape[1]
    positions = torch.arange(length, device=learner.device).unsqueeze(0).expand(len(microbatch), -1)
    if not learner.layout.is_first_stage:
        hidden = torch.zeros(
            length,
            len(microbatch),
            learner.config.hidden_size,
            dtype=learner.params_dtype,
            device=learner.device,
            requires_grad=True,
        )
        module.set_input_tensor(hidden)  # type: ignore[operator]
    learner.model.train()
    with SavedTensorMeter(exclude) as meter:
        with precision_autocast(learner.te_recipe):
            output = learner.model(microbatch.tokens, positions, attention_mask=None)
        if learner.layout.is_last_stage:
            logp, entropy = token_logprobs_and_entropy(
                output, microbatch.labels, learner.temperature, learner.cfg.logprob_chunk_tokens
            )
            # a loss of both terms: the backward of a real policy loss keeps what these keep
            _ = (logp * microbatch.loss_mask).sum() + (entropy * microbatch.loss_mask).sum()
    if not learner.layout.is_first_stage:
        module.set_input_tensor(None)  # type: ignore[operator]
    return meter.bytes

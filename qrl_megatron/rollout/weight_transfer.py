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

import os
from dataclasses import dataclass, field
from typing import Any

BACKEND = "qrl_shm"


def register() -> None:
    """``vllm.general_plugins`` entry point: add the ``qrl_shm`` backend to vLLM's weight-transfer registry."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "SharedMemoryWeightTransferEngine")
    _keep_onednn_int8_tensors_alive()


def _keep_onednn_int8_tensors_alive() -> None:
    """Fix in-place reload of INT8 W8A8 layers on vLLM-CPU (the oneDNN path).

    ``CPUInt8ScaledMMLinearKernel`` builds a oneDNN handle from the layer's freshly processed ``weight_scale`` and
    ``azp_adj`` and the handle keeps pointing at those tensors' storage. vLLM's layerwise reload then copies the
    processed values into the *original* parameters and drops the fresh ones, so the handle reads freed memory
    (measured: NaN logprobs after every INT8 reload, correct ones after the first load). Keeping a reference to
    the tensors the handle was built from keeps its pointers valid.
    """
    try:
        from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUInt8ScaledMMLinearKernel
    except ImportError:  # not the CPU build
        return
    original = CPUInt8ScaledMMLinearKernel.process_weights_for_onednn
    if getattr(original, "_qrl_keepalive", False):
        return

    def process_weights_for_onednn(self: Any, layer: Any) -> None:
        original(self, layer)
        names = [n for n in self.layer_param_names if n]
        layer._qrl_onednn_tensors = [getattr(layer, n, None) for n in names]

    process_weights_for_onednn._qrl_keepalive = True  # type: ignore[attr-defined]
    CPUInt8ScaledMMLinearKernel.process_weights_for_onednn = process_weights_for_onednn  # type: ignore[method-assign]


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
            from safetensors.torch import load_file

            from qrl_megatron.bridge.checksum import compare_checksums

            if not os.path.isfile(update_info.path):
                raise FileNotFoundError(f"weight bucket {update_info.path} does not exist on the engine's host")
            tensors = load_file(update_info.path)
            if self.verify_checksums and update_info.checksums:  # an empty manifest: the sender opted out
                compare_checksums(update_info.checksums, tensors)
            self.model.load_weights(iter(tensors.items()))  # type: ignore[operator]
            for name, t in tensors.items():
                self.received[name] = t.numel()

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            from qrl_megatron.rollout.worker_extension import refresh_tied_lm_head

            finalize_layerwise_reload(self.model, self.model_config)
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

"""The vLLM weight-transfer engines that receive the bridge's checkpoint-format buckets.

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

On GPU the same buckets travel through vLLM's own backends, subclassed only to verify checksums before loading and
to finish like ``qrl_shm`` (the reload-warning filter, the tied lm_head refresh):

* ``qrl_cuda_ipc`` -- vLLM's ``IPCWeightTransferEngine`` (``ipc_engine.py``): the sender shares each tensor's CUDA
  allocation (``torch.multiprocessing.reductions.reduce_tensor``) and the worker maps it; for an engine on the
  sender's GPU (colocated). The handles travel as plain values (:func:`ipc_args_to_wire`), not pickled: vLLM's own
  path needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` for them (msgpack cannot carry the classes in them).
* ``qrl_nccl`` -- vLLM's ``NCCLWeightTransferEngine`` (``nccl_engine.py``), unpacked: one NCCL broadcast per tensor
  from the trainer (rank 0 of a group with the engine's workers), for an engine on other GPUs or hosts.

For a server on any host without a GPU path (CPU, or a network NCCL cannot use) ``qrl_tcp`` (a subclass of
``qrl_shm``: the same reload) connects each worker to the trainer at ``init_weight_transfer_engine`` and reads every
bucket's bytes from that stream (wire format and who listens: :mod:`qrl_megatron.bridge.tcp`); QeRL's adapter and
norm buckets too (:func:`receive_bucket`: the worker-extension methods take their bucket from a file or the stream).

All of them receive a whole bucket (bounded by ``sync.bucket_mib``), verify it (the device-side checksum of
:mod:`qrl_megatron.bridge.checksum`, no host copy) and only then hand it to the model's ``load_weights`` inside the
same layerwise reload, so a corrupted tensor never reaches the model and -- for NCCL -- a failed check never leaves
the sender waiting in a broadcast the worker has stopped receiving.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

BACKEND = "qrl_shm"
# sync.transport -> the backend name the engine is started with (--weight-transfer-config '{"backend": ...}')
BACKENDS = {"shm": BACKEND, "cuda_ipc": "qrl_cuda_ipc", "nccl": "qrl_nccl", "tcp": "qrl_tcp"}
_ENGINE_CLASSES = {
    BACKEND: "SharedMemoryWeightTransferEngine",
    "qrl_cuda_ipc": "CudaIpcWeightTransferEngine",
    "qrl_nccl": "NcclWeightTransferEngine",
    "qrl_tcp": "TcpWeightTransferEngine",
}
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
    """``vllm.general_plugins`` entry point: add our backends to vLLM's weight-transfer registry."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    for backend, class_name in _ENGINE_CLASSES.items():
        if backend not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(backend, __name__, class_name)


# The positional arguments of torch.multiprocessing.reductions.rebuild_cuda_tensor (torch 2.x), as reduce_tensor
# returns them for a CUDA tensor.
IPC_ARG_FIELDS = (
    "tensor_cls", "size", "stride", "offset", "storage_cls", "dtype", "device", "handle", "storage_size",
    "storage_offset", "requires_grad", "ref_counter_handle", "ref_counter_offset", "event_handle",
    "event_sync_required",
)  # fmt: skip


def ipc_args_to_wire(args: tuple[Any, ...]) -> dict[str, Any]:
    """``reduce_tensor``'s rebuild arguments as JSON/msgpack-native values: classes and dtypes by name, byte
    strings in base64 (the same dict travels in ``collective_rpc`` and over HTTP)."""
    import base64

    import torch

    if len(args) != len(IPC_ARG_FIELDS):
        raise ValueError(f"expected {len(IPC_ARG_FIELDS)} rebuild_cuda_tensor arguments, got {len(args)}")
    out: dict[str, Any] = {}
    for name, value in zip(IPC_ARG_FIELDS, args, strict=True):
        if name == "tensor_cls":
            value = "parameter" if value is torch.nn.Parameter else "tensor"
        elif name == "storage_cls":
            value = "untyped" if value is torch.UntypedStorage else "typed"
        elif name == "dtype":
            value = str(value).removeprefix("torch.")
        elif name in ("size", "stride"):
            value = [int(v) for v in value]
        elif isinstance(value, bytes):
            value = {"b64": base64.b64encode(value).decode("ascii")}
        out[name] = value
    return out


def ipc_args_from_wire(wire: dict[str, Any]) -> tuple[Any, ...]:
    """Inverse of :func:`ipc_args_to_wire`: the tuple ``rebuild_cuda_tensor(*args)`` takes (no CUDA call)."""
    import base64

    import torch

    values: list[Any] = []
    for name in IPC_ARG_FIELDS:
        value = wire[name]
        if name == "tensor_cls":
            value = torch.nn.Parameter if value == "parameter" else torch.Tensor
        elif name == "storage_cls":
            value = torch.UntypedStorage if value == "untyped" else torch.storage.TypedStorage
        elif name == "dtype":
            value = getattr(torch, value)
        elif name == "size":
            value = torch.Size(value)
        elif name == "stride":
            value = tuple(value)
        elif isinstance(value, dict) and "b64" in value:
            value = base64.b64decode(value["b64"])
        values.append(value)
    return tuple(values)


class _Collector:
    """Stands in for the model while a vLLM backend receives: keeps what arrives, loads nothing."""

    def __init__(self) -> None:
        self.tensors: dict[str, Any] = {}

    def load_weights(self, weights: Any) -> set[str]:
        for name, tensor in weights:
            self.tensors[name] = tensor
        return set()


def receive_verified(engine: Any, receive: Any, update_info: Any) -> dict[str, int]:
    """Run a vLLM backend's own ``receive_weights`` with the model replaced by a :class:`_Collector`, check the
    bucket against the sender's checksums, then load it into the real model (the layerwise reload in progress).

    ``receive`` is the backend's bound ``receive_weights``; returns name -> numel of what was loaded."""
    from qrl_megatron.bridge.checksum import compare_checksums

    collector, model = _Collector(), engine.model
    engine.model = collector
    try:
        receive(update_info)
    finally:
        engine.model = model
    if engine.verify_checksums and update_info.checksums:
        compare_checksums(update_info.checksums, collector.tensors)
    try:
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check
    except ImportError:  # pragma: no cover - older vLLM
        model.load_weights(iter(collector.tensors.items()))
    else:
        with disable_mtp_completeness_check():  # as vLLM's backends load
            model.load_weights(iter(collector.tensors.items()))
    return {name: t.numel() for name, t in collector.tensors.items()}


def finish_reload(engine: Any, finalize: Any) -> None:
    """End a weight update: ``finalize()`` (the backend's own, or vLLM's layerwise finalize) with the expected
    reload warnings filtered, then the tied lm_head refresh."""
    from qrl_megatron.rollout.worker_extension import refresh_tied_lm_head

    tied = bool(getattr(engine.model_config.hf_config, "tie_word_embeddings", False))
    quiet = ExpectedReloadWarnings(expected_unsent_modules(tied))
    logger = logging.getLogger(RELOAD_LOGGER)
    logger.addFilter(quiet)
    try:
        finalize()
    finally:
        logger.removeFilter(quiet)
    refresh_tied_lm_head(engine.model)


def _device_engine_classes() -> dict[str, type]:
    """``qrl_cuda_ipc`` and ``qrl_nccl``: vLLM's CUDA-IPC and NCCL engines with checksums (importable on CPU)."""
    from vllm.distributed.weight_transfer.ipc_engine import (
        IPCWeightTransferEngine,
        IPCWeightTransferInitInfo,
        IPCWeightTransferUpdateInfo,
    )
    from vllm.distributed.weight_transfer.nccl_engine import (
        NCCLWeightTransferEngine,
        NCCLWeightTransferInitInfo,
        NCCLWeightTransferUpdateInfo,
    )

    @dataclass
    class CudaIpcInitInfo(IPCWeightTransferInitInfo):
        verify_checksums: bool = True

    @dataclass
    class CudaIpcUpdateInfo(IPCWeightTransferUpdateInfo):
        handles: list[dict[str, dict[str, Any]]] | None = None
        """per tensor: GPU UUID -> :func:`ipc_args_to_wire` (decoded into vLLM's ``ipc_handles``)"""
        checksums: dict[str, str] = field(default_factory=dict)

        def __post_init__(self) -> None:
            if self.handles is not None:
                if self.ipc_handles is not None:
                    raise ValueError("Cannot specify both `handles` and `ipc_handles`")
                self.ipc_handles = [{uuid: ipc_args_from_wire(args) for uuid, args in h.items()} for h in self.handles]
                self.handles = None
            super().__post_init__()

    @dataclass(kw_only=True)
    class NcclInitInfo(NCCLWeightTransferInitInfo):
        verify_checksums: bool = True

    @dataclass
    class NcclUpdateInfo(NCCLWeightTransferUpdateInfo):
        checksums: dict[str, str] = field(default_factory=dict)

    class CudaIpcWeightTransferEngine(IPCWeightTransferEngine):
        init_info_cls = CudaIpcInitInfo  # type: ignore[assignment]
        update_info_cls = CudaIpcUpdateInfo  # type: ignore[assignment]
        supports_draft_weight_update = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.verify_checksums = True

        def init_transfer_engine(self, init_info: Any) -> None:
            self.verify_checksums = bool(init_info.verify_checksums)
            super().init_transfer_engine(init_info)

        def receive_weights(self, update_info: Any) -> None:
            receive_verified(self, super().receive_weights, update_info)

        def finish_weight_update(self) -> None:
            finish_reload(self, super().finish_weight_update)

    class NcclWeightTransferEngine(NCCLWeightTransferEngine):
        init_info_cls = NcclInitInfo  # type: ignore[assignment]
        update_info_cls = NcclUpdateInfo  # type: ignore[assignment]
        supports_draft_weight_update = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.verify_checksums = True

        def init_transfer_engine(self, init_info: Any) -> None:
            if init_info.packed:
                # packed chunks are views of reused staging buffers: a bucket could not be held whole to verify
                raise ValueError("qrl_nccl receives unpacked (one broadcast per tensor); got packed=True")
            self.verify_checksums = bool(init_info.verify_checksums)
            super().init_transfer_engine(init_info)

        def receive_weights(self, update_info: Any) -> None:
            receive_verified(self, super().receive_weights, update_info)

        def finish_weight_update(self) -> None:
            finish_reload(self, super().finish_weight_update)

    return {
        "CudaIpcInitInfo": CudaIpcInitInfo,
        "CudaIpcUpdateInfo": CudaIpcUpdateInfo,
        "NcclInitInfo": NcclInitInfo,
        "NcclUpdateInfo": NcclUpdateInfo,
        "CudaIpcWeightTransferEngine": CudaIpcWeightTransferEngine,
        "NcclWeightTransferEngine": NcclWeightTransferEngine,
    }


def _engine_classes() -> dict[str, type]:
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

            finish_reload(self, lambda: finalize_layerwise_reload(self.model, self.model_config))

        def shutdown(self) -> None:
            self.received = {}

    @dataclass
    class TcpInitInfo(WeightTransferInitInfo):
        host: str = ""
        """the trainer's listening address"""
        port: int = 0
        timeout_s: float = 120.0
        """connect / receive timeout (``sync.tcp_timeout_s``)"""
        verify_checksums: bool = True

        def __post_init__(self) -> None:
            if not self.host or not self.port:
                raise ValueError(
                    "qrl_tcp: the init info names no trainer host:port -- the trainer uses another transport than "
                    "this server's qrl_tcp backend; set sync.transport=tcp"
                )

    @dataclass
    class TcpUpdateInfo(WeightTransferUpdateInfo):
        seq: int = 0
        """the bucket's number on the stream since init (its header must carry the same)"""
        names: list[str] = field(default_factory=list)
        dtype_names: list[str] = field(default_factory=list)
        shapes: list[list[int]] = field(default_factory=list)
        checksums: dict[str, str] = field(default_factory=dict)

        def __post_init__(self) -> None:
            if not len(self.names) == len(self.dtype_names) == len(self.shapes):
                raise ValueError(
                    f"qrl_tcp update: {len(self.names)} names, {len(self.dtype_names)} dtypes and "
                    f"{len(self.shapes)} shapes must be the same number"
                )

    class TcpWeightTransferEngine(SharedMemoryWeightTransferEngine):
        init_info_cls = TcpInitInfo  # type: ignore[assignment]
        update_info_cls = TcpUpdateInfo  # type: ignore[assignment]

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.stream: Any = None

        def init_transfer_engine(self, init_info: Any) -> None:
            from qrl_megatron.bridge import tcp

            self.shutdown()
            self.verify_checksums = bool(init_info.verify_checksums)
            rank, world = _worker_rank()
            self.stream = tcp.connect(init_info.host, int(init_info.port), float(init_info.timeout_s))
            tcp.send_hello(self.stream, rank, world)

        def receive_bucket(self, update_info: Any) -> dict[str, Any]:
            """Bucket ``update_info.seq`` read whole from the stream, then verified against its checksums: a
            weight bucket (``receive_weights``) or QeRL's adapter / norms (:func:`receive_bucket`)."""
            from qrl_megatron.bridge import tcp
            from qrl_megatron.bridge.checksum import compare_checksums

            if self.stream is None:
                raise tcp.TcpStreamError(
                    "qrl_tcp: no stream from the trainer (init_weight_transfer_engine first, or again after a break)"
                )
            try:
                tensors = tcp.recv_bucket(
                    self.stream, update_info.seq, update_info.names, update_info.dtype_names, update_info.shapes
                )
            except BaseException:
                self.shutdown()  # out of step with the trainer: it re-inits at its next start
                raise
            # the whole bucket has been read, so a refused one leaves the stream in step for the next
            if self.verify_checksums and update_info.checksums:
                compare_checksums(update_info.checksums, tensors)
            return tensors

        def receive_weights(self, update_info: Any) -> None:
            tensors = self.receive_bucket(update_info)
            self.model.load_weights(iter(tensors.items()))  # type: ignore[operator]
            for name, t in tensors.items():
                self.received[name] = t.numel()

        def shutdown(self) -> None:
            super().shutdown()
            if self.stream is not None:
                self.stream.close()
                self.stream = None

    return {
        "SharedMemoryWeightTransferEngine": SharedMemoryWeightTransferEngine,
        "TcpInitInfo": TcpInitInfo,
        "TcpUpdateInfo": TcpUpdateInfo,
        "TcpWeightTransferEngine": TcpWeightTransferEngine,
    }


def receive_bucket(worker: Any, info: Mapping[str, Any]) -> dict[str, Any]:
    """The verified bucket of a worker-extension update (QeRL's ``qrl_load_adapter`` / ``qrl_set_norms``), from
    wherever the trainer's transport put it: a ``/dev/shm`` file (``path``; every transport but tcp) or this
    worker's ``qrl_tcp`` stream (``stream``: the bucket's sequence number and metadata, as ``update_weights``
    gets them). Read whole before anything is checked, so a refused update leaves the stream in step.
    ``WeightVerificationError`` naming every altered tensor."""
    from qrl_megatron.bridge.transport import read_bucket

    if "stream" not in info:
        return read_bucket(str(info["path"]), info["checksums"])
    engine = getattr(worker, "weight_transfer_engine", None)
    if not callable(getattr(engine, "receive_bucket", None)):
        raise RuntimeError(
            f"qrl_tcp: the update streams over TCP but this engine's weight-transfer backend is "
            f'{type(engine).__name__}; start it with --weight-transfer-config \'{{"backend": "qrl_tcp"}}\''
        )
    assert engine is not None
    return dict(engine.receive_bucket(engine.parse_update_info(dict(info["stream"]))))


def _worker_rank() -> tuple[int, int]:
    """This worker's rank and the engine's worker count (vLLM's world group: TP x PP)."""
    try:
        from vllm.distributed.parallel_state import get_world_group

        group = get_world_group()
        return int(group.rank_in_group), int(group.world_size)
    except (ImportError, AssertionError):  # no vLLM world (a unit test drives the engine directly)
        return 0, 1


def __getattr__(name: str) -> Any:
    # vLLM's factory imports this module and looks the class up by name; build it lazily so importing
    # qrl_megatron never needs vLLM.
    if name in ("SharedMemoryWeightTransferEngine", "TcpWeightTransferEngine", "TcpInitInfo", "TcpUpdateInfo"):
        host_classes = _engine_classes()
        globals().update(host_classes)
        return host_classes[name]
    if name in ("CudaIpcWeightTransferEngine", "NcclWeightTransferEngine") or name.endswith(("InitInfo", "UpdateInfo")):
        classes = _device_engine_classes()
        if name in classes:
            globals().update(classes)
            return classes[name]
    raise AttributeError(name)

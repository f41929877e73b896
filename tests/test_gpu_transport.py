"""The GPU weight transports (sync.transport): selection, config errors, vLLM init/update infos, device checksums.

Everything but the last test runs on CPU without a CUDA call: the classes import, the infos they build parse as
vLLM's own dataclasses (subclassed with checksums), the device checksum is exact and fires on a corrupted tensor,
and the engine-side receive verifies a whole bucket before any of it reaches the model. The gpu-marked test refits
a tiny engine through CUDA IPC.
"""

from __future__ import annotations

import pytest
import torch

from qrl_megatron.bridge.checksum import (
    WORD_CHECKSUM_PREFIX,
    WeightVerificationError,
    checksums,
    compare_checksums,
    crc32_checksum,
    word_checksum,
)
from qrl_megatron.bridge.config import SyncConfig
from qrl_megatron.bridge.transport import (
    CudaIpcTransport,
    NcclTransport,
    SharedMemoryTransport,
    ipc_update_info,
    make_transport,
    nccl_init_info,
    nccl_update_info,
    resolve_transport,
)
from qrl_megatron.config_fields import ConfigError

# ------------------------------------------------------------------------------------------------ selection


@pytest.mark.unit
@pytest.mark.parametrize(
    ("engine", "tp", "url", "cuda", "expected"),
    [
        ("colocated", 1, "", False, "shm"),
        ("server", 1, "", False, "shm"),
        ("server", 1, "http://10.0.0.5:8000", False, "tcp"),  # another host without CUDA: over TCP
        ("colocated", 1, "", True, "cuda_ipc"),
        ("colocated", 2, "", True, "shm"),  # the other TP workers' GPUs hold no IPC handle of rank 0
        ("server", 1, "", True, "cuda_ipc"),  # a server started here shares the learner's GPU
        ("server", 2, "http://10.0.0.5:8000", True, "nccl"),
    ],
)
def test_auto_picks_the_transport(engine: str, tp: int, url: str, cuda: bool, expected: str) -> None:
    assert resolve_transport("auto", engine, engine_tp=tp, server_url=url, cuda=cuda) == expected


@pytest.mark.unit
def test_auto_on_this_cpu_machine_is_shm() -> None:
    assert not torch.cuda.is_available()
    assert resolve_transport(SyncConfig().transport, "colocated") == "shm"
    assert resolve_transport("auto", "server", server_url="http://127.0.0.1:8000") == "shm"
    assert resolve_transport("auto", "server", server_url="http://gpu-node:8000") == "tcp"


@pytest.mark.unit
@pytest.mark.parametrize("name", ["cuda_ipc", "nccl"])
def test_a_gpu_transport_without_cuda_is_one_line_naming_the_key(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"^sync\.transport={name} needs CUDA \(torch\.cuda\.is_available\(\)") as e:
        resolve_transport(name, "server", server_url="http://h:1", cuda=False)
    assert "\n" not in str(e.value)


@pytest.mark.unit
def test_gpu_transports_the_engine_cannot_use_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"sync\.transport=nccl needs the engine on other GPUs, but a colocated"):
        resolve_transport("nccl", "colocated", cuda=True)
    with pytest.raises(ConfigError, match=r"but a server started here \(rollout\.server_url empty\) shares"):
        resolve_transport("nccl", "server", cuda=True)
    with pytest.raises(ConfigError, match=r"sync\.transport=cuda_ipc needs the engine on the learner's GPU"):
        resolve_transport("cuda_ipc", "server", server_url="http://10.1.2.3:8000", cuda=True)
    with pytest.raises(ConfigError, match=r"rollout\.tp=2"):
        resolve_transport("cuda_ipc", "colocated", engine_tp=2, cuda=True)
    assert resolve_transport("cuda_ipc", "server", server_url="http://127.0.0.1:8000", cuda=True) == "cuda_ipc"
    assert resolve_transport("shm", "server", server_url="http://h:1", cuda=True) == "shm"


@pytest.mark.unit
def test_sync_transport_is_validated() -> None:
    SyncConfig(transport="nccl").validate()  # CUDA is checked at start, not in the config (qrl-plan runs anywhere)
    with pytest.raises(ConfigError, match=r"sync\.transport"):
        SyncConfig(transport="rdma").validate()


@pytest.mark.unit
def test_make_transport_builds_each_class_without_cuda() -> None:
    channel = object()
    assert type(make_transport("shm", channel)) is SharedMemoryTransport  # type: ignore[arg-type]
    assert type(make_transport("cuda_ipc", channel)) is CudaIpcTransport  # type: ignore[arg-type]
    nccl = make_transport("nccl", channel, engine_world_size=2, server_url="http://localhost:8000")  # type: ignore[arg-type]
    assert isinstance(nccl, NcclTransport) and nccl.world_size == 3 and nccl.address == "127.0.0.1"
    with pytest.raises(ValueError, match="resolve sync.transport first"):
        make_transport("auto", channel)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ vLLM init / update infos


def _bucket() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.down_proj.weight": torch.randn(8, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight_scale": torch.rand(8, 1, generator=g).to(torch.float8_e4m3fn),
        "model.layers.0.mlp.down_proj.weight_packed": torch.randint(0, 255, (8, 7), dtype=torch.uint8, generator=g),
    }


def _fake_ipc_args(t: torch.Tensor) -> tuple:
    # what torch's reduce_tensor returns for a CUDA tensor (rebuild_cuda_tensor's arguments), with made-up handles
    return (
        torch.Tensor, t.shape, t.stride(), 0, torch.storage.TypedStorage, t.dtype, 0, b"\x00\x01handle\xff",
        t.numel() * t.element_size(), 0, False, b"refcount", 64, b"event", True,
    )  # fmt: skip


@pytest.mark.unit
def test_cuda_ipc_update_info_parses_as_vllms_with_the_original_handles() -> None:
    pytest.importorskip("vllm")
    from qrl_megatron.rollout.weight_transfer import CudaIpcInitInfo, CudaIpcUpdateInfo, ipc_args_to_wire

    bucket = _bucket()
    args = [_fake_ipc_args(t) for t in bucket.values()]
    info = ipc_update_info(bucket, checksums(bucket), [{"GPU-uuid": ipc_args_to_wire(a)} for a in args])
    import json

    parsed = CudaIpcUpdateInfo(**json.loads(json.dumps(info)))  # plain values: travels over HTTP too
    assert parsed.names == list(bucket)
    assert parsed.dtype_names == ["bfloat16", "float8_e4m3fn", "uint8"]
    assert parsed.shapes == [[8, 16], [8, 1], [8, 7]]
    assert parsed.ipc_handles == [{"GPU-uuid": a} for a in args]  # what vLLM's receive hands rebuild_cuda_tensor
    assert parsed.checksums == checksums(bucket)
    assert CudaIpcInitInfo(packed=False, verify_checksums=True).verify_checksums
    with pytest.raises(ValueError, match="same size"):
        CudaIpcUpdateInfo(**{**info, "handles": info["handles"][:1]})


@pytest.mark.unit
def test_nccl_infos_parse_as_vllms() -> None:
    pytest.importorskip("vllm")
    from qrl_megatron.rollout.weight_transfer import NcclInitInfo, NcclUpdateInfo

    init = NcclInitInfo(**nccl_init_info("10.0.0.1", 29555, 3))
    assert (init.master_address, init.master_port, init.rank_offset, init.world_size) == ("10.0.0.1", 29555, 1, 3)
    assert init.packed is False and init.verify_checksums is True
    bucket = _bucket()
    update = NcclUpdateInfo(**nccl_update_info(bucket, checksums(bucket)))
    assert update.names == list(bucket) and update.shapes == [list(t.shape) for t in bucket.values()]
    assert [getattr(torch, d) for d in update.dtype_names] == [t.dtype for t in bucket.values()]


@pytest.mark.unit
def test_our_backends_are_registered_with_vllm() -> None:
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    from qrl_megatron.rollout.weight_transfer import BACKENDS, register

    register()
    loaded = {name: WeightTransferEngineFactory._registry[BACKENDS[name]]() for name in ("cuda_ipc", "nccl")}
    assert issubclass(loaded["cuda_ipc"], IPCWeightTransferEngine)
    assert issubclass(loaded["nccl"], NCCLWeightTransferEngine)


# -------------------------------------------------------------------------------------------- device checksums


@pytest.mark.unit
def test_word_checksum_is_exact_and_fires_on_corruption(monkeypatch: pytest.MonkeyPatch) -> None:
    import qrl_megatron.bridge.checksum as checksum

    t = torch.randn(3, 1001).to(torch.bfloat16)  # 6006 bytes: words, a partial row and 2 tail bytes
    ref = word_checksum(t)
    assert ref.startswith(WORD_CHECKSUM_PREFIX) and word_checksum(t.clone()) == ref
    monkeypatch.setattr(checksum, "_ROW_WORDS", 64)  # many rows and slabs: same rows, the same value
    monkeypatch.setattr(checksum, "_SLAB_ROWS", 3)
    small_rows = word_checksum(t)
    assert word_checksum(t.clone()) == small_rows
    flipped = t.clone()
    flipped.view(torch.int16)[2, 1000] ^= 1  # one bit of the last (tail) element
    swapped = t.clone().reshape(-1)
    swapped[[10, 11]] = swapped[[11, 10]]
    assert not torch.equal(swapped, t.reshape(-1))
    for bad in (flipped, swapped.reshape(t.shape), t.reshape(1001, 3)):
        assert word_checksum(bad) != small_rows


@pytest.mark.unit
def test_the_receiver_computes_the_senders_kind() -> None:
    bucket = _bucket()
    sent = {name: word_checksum(t) for name, t in bucket.items()}  # what a GPU sender's manifest holds
    compare_checksums(sent, bucket)  # a CPU receiver (the shm transport) computes the same kind
    assert checksums(bucket) == {name: crc32_checksum(t) for name, t in bucket.items()}  # host tensors: CRC-32
    corrupted = dict(bucket)
    packed = bucket["model.layers.0.mlp.down_proj.weight_packed"].clone()
    packed[3, 5] ^= 0x10
    corrupted["model.layers.0.mlp.down_proj.weight_packed"] = packed
    with pytest.raises(WeightVerificationError, match=r"weight_packed: checksum wsum:"):
        compare_checksums(sent, corrupted)


# ------------------------------------------------------------------------------- engine-side verified receive


class _Model:
    def __init__(self) -> None:
        self.loaded: list[str] = []

    def load_weights(self, weights) -> set[str]:  # noqa: ANN001 - vLLM's signature
        names = [n for n, _ in weights]
        self.loaded += names
        return set(names)


class _Engine:
    def __init__(self) -> None:
        self.model = _Model()
        self.verify_checksums = True


@pytest.mark.unit
def test_a_corrupted_bucket_never_reaches_the_model() -> None:
    pytest.importorskip("vllm")
    from qrl_megatron.rollout.weight_transfer import NcclUpdateInfo, receive_verified

    bucket = _bucket()
    info = NcclUpdateInfo(**nccl_update_info(bucket, {n: word_checksum(t) for n, t in bucket.items()}))

    def receive(arrived: dict[str, torch.Tensor]):  # noqa: ANN202 - what vLLM's unpacked receive does
        def run(update_info) -> None:  # noqa: ANN001
            for name in update_info.names:
                engine.model.load_weights([(name, arrived[name])])

        return run

    engine = _Engine()
    real = engine.model
    assert receive_verified(engine, receive(bucket), info) == {n: t.numel() for n, t in bucket.items()}
    assert engine.model is real and real.loaded == list(bucket)

    engine = _Engine()
    bad = dict(bucket)
    bad["model.layers.0.mlp.down_proj.weight"] = bucket["model.layers.0.mlp.down_proj.weight"] * 2
    with pytest.raises(WeightVerificationError, match=r"down_proj\.weight: checksum"):
        receive_verified(engine, receive(bad), info)
    assert engine.model.loaded == []  # nothing of the bucket was loaded, not even its intact tensors


# ----------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ipc_refit_of_a_tiny_engine(tiny_model_dir) -> None:  # noqa: ANN001 - conftest fixture
    pytest.importorskip("vllm")
    from qrl_megatron.config import RolloutConfig
    from qrl_megatron.models.base import load_hf_weights
    from qrl_megatron.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(tiny_model_dir), RolloutConfig(kv_cache_mib=64), 0, 64, transport="cuda_ipc")
    try:
        assert isinstance(engine.transport, CudaIpcTransport)
        g = torch.Generator().manual_seed(0)
        weights = {
            k: (v + 0.05 * torch.randn(v.shape, generator=g)).to(torch.bfloat16).cuda()
            for k, v in load_hf_weights(tiny_model_dir).items()
            if k != "lm_head.weight"
        }
        sums = checksums(weights)
        assert all(s.startswith(WORD_CHECKSUM_PREFIX) for s in sums.values())  # device tensors: no host copy
        engine.start_weight_update()
        engine.update_weights(weights, sums)
        engine.finish_weight_update()
        held = engine.parameter_checksums()
        embed = weights["model.embed_tokens.weight"].double().sum().item()
        assert abs(held["model.embed_tokens.weight"] - embed) < 1e-3 * max(1.0, abs(embed))
        name = "model.layers.0.mlp.down_proj.weight"
        corrupted = {name: weights[name] + 1}
        engine.start_weight_update()
        with pytest.raises(WeightVerificationError, match=name):
            engine.update_weights(corrupted, {name: sums[name]})
    finally:
        engine.close()

"""sync.transport=tcp: the wire format, checksums and timeouts over real loopback sockets, and the trainer's
TcpTransport driving the engine-side ``qrl_tcp`` backend in this process (the channel stands in for HTTP).

Corruption is injected from the test: a proxy between the two ends flips one byte of the stream in transit.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from qrl_megatron.bridge import tcp
from qrl_megatron.bridge.checksum import WeightVerificationError, checksums, compare_checksums
from qrl_megatron.bridge.transport import TcpOptions, TcpTransport, make_transport, resolve_transport
from qrl_megatron.config_fields import ConfigError

pytestmark = pytest.mark.unit


def _bucket(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(16, generator=g),  # float32 after 3 odd-sized ones
        "model.layers.0.mlp.down_proj.weight_packed": torch.randint(0, 255, (8, 7), dtype=torch.uint8, generator=g),
        "model.layers.0.mlp.down_proj.weight_scale": torch.rand(8, 1, generator=g).to(torch.float8_e4m3fn),
        "model.norm.weight": torch.randn(8, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }


def _meta(tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[list[int]]]:
    m = tcp.wire_metadata(tensors)
    return m["names"], m["dtype_names"], m["shapes"]


@contextmanager
def _pair(timeout_s: float = 5.0) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(sender, receiver): a real TCP connection on loopback, the receiver connected to the sender's listener."""
    listener = tcp.listen("127.0.0.1", 0)
    port = listener.getsockname()[1]
    receiver = tcp.connect("127.0.0.1", port, timeout_s)
    sender, _ = listener.accept()
    sender.settimeout(timeout_s)
    listener.close()
    try:
        yield sender, receiver
    finally:
        sender.close()
        receiver.close()


@contextmanager
def _flipping_proxy(target_port: int, flip_at: int) -> Iterator[int]:
    """A loopback proxy to ``target_port`` that flips the low bit of byte ``flip_at`` of what the target sends."""
    listener = tcp.listen("127.0.0.1", 0)
    stop = threading.Event()

    def pump(src: socket.socket, dst: socket.socket, flip: int | None) -> None:
        seen = 0
        try:
            while not stop.is_set():
                data = bytearray(src.recv(1 << 16))
                if not data:
                    break
                if flip is not None and seen <= flip < seen + len(data):
                    data[flip - seen] ^= 0x01
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()

    def serve() -> None:
        client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", target_port))
        threading.Thread(target=pump, args=(upstream, client, flip_at), daemon=True).start()
        threading.Thread(target=pump, args=(client, upstream, None), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()


# --------------------------------------------------------------------------------------------------- wire format


def test_a_bucket_arrives_bit_exact_with_every_dtype_and_shape() -> None:
    bucket = _bucket()
    with _pair() as (sender, receiver):
        for seq in range(3):  # several buckets back to back on one stream
            sent = {k: v + seq if v.dtype.is_floating_point and v.dtype.itemsize > 1 else v for k, v in bucket.items()}
            size = tcp.send_bucket(sender, seq, sent)
            assert size == sum(t.numel() * t.element_size() for t in sent.values())
            got = tcp.recv_bucket(receiver, seq, *_meta(sent))
            assert list(got) == list(sent)
            for name, t in sent.items():
                assert got[name].dtype == t.dtype and got[name].shape == t.shape
                assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
            compare_checksums(checksums(sent), got)


def test_a_byte_flipped_in_transit_is_named_by_the_checksum_and_the_stream_stays_in_step() -> None:
    bucket = _bucket()
    victim = "model.layers.0.mlp.down_proj.weight_packed"
    names = list(bucket)
    offset = 24 + sum(bucket[n].numel() * bucket[n].element_size() for n in names[: names.index(victim)]) + 5
    listener = tcp.listen("127.0.0.1", 0)
    with _flipping_proxy(listener.getsockname()[1], flip_at=offset) as proxy_port:
        receiver = tcp.connect("127.0.0.1", proxy_port, 5.0)
        sender, _ = listener.accept()
        try:
            tcp.send_bucket(sender, 0, bucket)
            got = tcp.recv_bucket(receiver, 0, *_meta(bucket))
            with pytest.raises(
                WeightVerificationError, match=rf"^weight sync corrupted in transit: {victim}: checksum"
            ):
                compare_checksums(checksums(bucket), got)
            tcp.send_bucket(sender, 1, bucket)  # the next bucket passes untouched
            compare_checksums(checksums(bucket), tcp.recv_bucket(receiver, 1, *_meta(bucket)))
        finally:
            sender.close()
            receiver.close()
            listener.close()


def test_a_stream_out_of_step_is_refused() -> None:
    bucket = _bucket()
    with _pair() as (sender, receiver):
        tcp.send_bucket(sender, 4, bucket)
        with pytest.raises(tcp.TcpStreamError, match=r"out of step: got bucket 4 of \d+ bytes, expected bucket 3"):
            tcp.recv_bucket(receiver, 3, *_meta(bucket))
    with _pair() as (sender, receiver):
        sender.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(16))
        with pytest.raises(tcp.TcpStreamError, match="not a weight bucket"):
            tcp.recv_bucket(receiver, 0, *_meta(bucket))


def test_a_silent_or_closed_peer_is_an_error_naming_host_and_port() -> None:
    bucket = _bucket()
    with _pair(timeout_s=0.3) as (sender, receiver):
        sender.sendall(tcp._HEADER.pack(tcp.MAGIC, tcp.VERSION, 0, tcp.payload_size(bucket)) + b"\x00" * 10)
        start = time.monotonic()
        with pytest.raises(tcp.TcpStreamError, match=r"no bytes from 127\.0\.0\.1:\d+ for 0\.3 s \(10 of \d+ bytes"):
            tcp.recv_bucket(receiver, 0, *_meta(bucket))
        assert time.monotonic() - start < 3
    with _pair() as (sender, receiver):
        sender.sendall(tcp._HEADER.pack(tcp.MAGIC, tcp.VERSION, 0, tcp.payload_size(bucket)))
        sender.close()
        with pytest.raises(tcp.TcpStreamError, match=r"closed the stream after 0 of"):
            tcp.recv_bucket(receiver, 0, *_meta(bucket))
    port = tcp.listen("127.0.0.1", 0)
    closed = port.getsockname()[1]
    port.close()
    with pytest.raises(tcp.TcpStreamError, match=rf"cannot connect to the trainer at 127\.0\.0\.1:{closed}"):
        tcp.connect("127.0.0.1", closed, 1.0)


# ------------------------------------------------------------------------------- transport + engine in-process


class _Model:
    def __init__(self) -> None:
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, weights: Any) -> set[str]:
        for name, t in weights:
            self.loaded[name] = t.clone()
        return set()


class _Channel:
    """The HTTP routes of a `vllm serve` with the qrl_tcp backend, called on the engine class directly;
    ``redirect`` sends the workers to another port (the test's proxy)."""

    def __init__(self, engine: Any, redirect: int | None = None) -> None:
        self.engine, self.redirect = engine, redirect

    def call(self, name: str, info: dict[str, Any] | None = None) -> Any:
        e = self.engine
        if name == "init_weight_transfer_engine":
            info = dict(info or {})
            if self.redirect is not None:
                info["port"] = self.redirect
            e.init_transfer_engine(e.parse_init_info(info))
        elif name == "start_weight_update":
            e.received = {}
        elif name == "update_weights":
            e.receive_weights(e.parse_update_info(dict(info or {})))
        return None

    def rpc(self, method: str, *args: Any) -> list[Any]:
        return []

    def reset_prefix_cache(self) -> None:
        pass


def _engine() -> Any:
    pytest.importorskip("vllm")
    from qrl_megatron.rollout.weight_transfer import TcpWeightTransferEngine

    engine = TcpWeightTransferEngine.__new__(TcpWeightTransferEngine)  # vLLM's constructor needs a VllmConfig
    engine.model, engine.verify_checksums, engine.received, engine.stream = _Model(), True, {}, None
    return engine


def test_the_transport_refits_the_engine_and_refuses_a_corrupted_bucket_by_name() -> None:
    bucket = _bucket()
    engine = _engine()
    transport = make_transport("tcp", _Channel(engine), tcp=TcpOptions(timeout_s=5.0))
    assert isinstance(transport, TcpTransport) and transport.options.address == "127.0.0.1"
    transport.init()
    transport.start()
    transport.update(bucket, checksums(bucket))
    transport.finish()
    assert all(torch.equal(engine.model.loaded[k], v) for k, v in bucket.items())
    assert transport.sent_bytes == tcp.payload_size(bucket)
    engine.model.loaded.clear()
    damaged = dict(bucket)
    damaged["model.norm.weight"] = bucket["model.norm.weight"].clone()
    damaged["model.norm.weight"].view(torch.uint8)[3] ^= 0x40  # altered after the checksum was taken
    with pytest.raises(WeightVerificationError, match=r"model\.norm\.weight: checksum"):
        transport.update(damaged, checksums(bucket))
    assert engine.model.loaded == {}  # nothing of the refused bucket, not even its intact tensors
    transport.update(bucket, checksums(bucket))  # the stream is still in step
    assert set(engine.model.loaded) == set(bucket)
    transport.close()


def test_a_byte_flipped_between_trainer_and_worker_is_refused_and_nothing_loaded() -> None:
    bucket = _bucket()
    engine = _engine()
    names = list(bucket)
    victim = "model.layers.0.self_attn.q_proj.bias"
    flip = 24 + sum(bucket[n].numel() * bucket[n].element_size() for n in names[: names.index(victim)])
    transport = TcpTransport(_Channel(engine), 1, TcpOptions("127.0.0.1", tcp_free_port(), 5.0))
    with _flipping_proxy(transport.options.port, flip_at=flip + 2) as proxy_port:
        transport.channel = _Channel(engine, redirect=proxy_port)
        transport.init()
        transport.start()
        with pytest.raises(WeightVerificationError, match=re.escape(victim) + ": checksum"):
            transport.update(bucket, checksums(bucket))
        assert engine.model.loaded == {}
        transport.close()


def tcp_free_port() -> int:
    from qrl_megatron.utils.net import free_port

    return free_port("127.0.0.1")


def test_no_worker_connecting_is_a_timeout_naming_the_endpoint_and_the_key() -> None:
    class Silent(_Channel):
        def call(self, name: str, info: dict[str, Any] | None = None) -> Any:
            time.sleep(2.0)  # a server that never has its workers connect

    transport = TcpTransport(Silent(None), 2, TcpOptions("127.0.0.1", 0, 0.5))
    start = time.monotonic()
    with pytest.raises(tcp.TcpStreamError, match=r"0 of 2 engine workers connected to the trainer at 127\.0\.0\.1:\d+ "
                       r"within 0\.5 s \(sync\.tcp_timeout_s\)"):  # fmt: skip
        transport.init()
    assert time.monotonic() - start < 1.9


def test_a_worker_that_dies_mid_bucket_is_reported_and_the_next_start_reconnects() -> None:
    bucket = _bucket()
    engine = _engine()
    transport = make_transport("tcp", _Channel(engine), tcp=TcpOptions(timeout_s=2.0))
    transport.init()
    engine.stream.close()  # the worker's end goes away (a killed server)
    engine.stream = None
    with pytest.raises((tcp.TcpStreamError, ConnectionError)):
        transport.update(bucket, checksums(bucket))
    assert transport.streams == []  # out of step: dropped
    transport.start()  # re-inits: the worker connects again
    transport.update(bucket, checksums(bucket))
    assert set(engine.model.loaded) == set(bucket)
    transport.close()


# ----------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("requested", "engine", "urls", "cuda", "expected"),
    [
        ("auto", "colocated", "", False, "shm"),
        ("auto", "server", "", False, "shm"),  # started here on loopback
        ("auto", "server", "http://127.0.0.1:8000", False, "shm"),
        ("auto", "server", "http://10.0.0.5:8000", False, "tcp"),  # another host: the network
        ("auto", "server", ["http://127.0.0.1:8000", "http://node2:8000"], False, "tcp"),
        ("auto", "server", "http://10.0.0.5:8000", True, "nccl"),  # GPU: as before
        ("tcp", "server", "", False, "tcp"),
        ("tcp", "server", "http://10.0.0.5:8000", True, "tcp"),
        ("tcp", "colocated", "", False, "tcp"),
    ],
)
def test_auto_and_tcp_resolution(requested: str, engine: str, urls: Any, cuda: bool, expected: str) -> None:
    assert resolve_transport(requested, engine, server_url=urls, cuda=cuda) == expected


def test_shm_to_another_host_is_one_line_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^sync\.transport=shm hands buckets over as /dev/shm files on this host, "
                       r"but the server at http://10\.0\.0\.5:8000 is on another host; use sync\.transport=tcp") as e:  # fmt: skip
        resolve_transport("shm", "server", server_url="http://10.0.0.5:8000", cuda=False)
    assert "\n" not in str(e.value)


def test_sync_tcp_keys_are_validated() -> None:
    from qrl_megatron.bridge.config import SyncConfig

    SyncConfig(transport="tcp", tcp_port=29600).validate()
    assert SyncConfig(tcp_address="10.1.1.1", tcp_port=5, tcp_timeout_s=3).tcp_options() == TcpOptions("10.1.1.1", 5, 3)
    with pytest.raises(ConfigError, match=r"sync\.tcp_port"):
        SyncConfig(tcp_port=70000).validate()
    with pytest.raises(ConfigError, match=r"sync\.tcp_timeout_s"):
        SyncConfig(tcp_timeout_s=0).validate()


def test_qrl_tcp_is_registered_with_vllm() -> None:
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from qrl_megatron.rollout.weight_transfer import BACKENDS, register

    register()
    assert BACKENDS["tcp"] == "qrl_tcp"
    cls = WeightTransferEngineFactory._registry["qrl_tcp"]()
    assert cls.__name__ == "TcpWeightTransferEngine"


def test_a_backend_mismatch_either_way_names_the_fix() -> None:
    pytest.importorskip("vllm")
    from qrl_megatron.rollout.engine import EngineDied
    from qrl_megatron.rollout.weight_transfer import SharedMemoryWeightTransferEngine, TcpInitInfo

    shm_server = SharedMemoryWeightTransferEngine.__new__(SharedMemoryWeightTransferEngine)
    transport = make_transport("tcp", _Channel(shm_server), tcp=TcpOptions(timeout_s=2.0))
    with pytest.raises(RuntimeError, match=r"not started with the qrl_tcp backend; start it with --weight-transfer"):
        transport.init()
    with pytest.raises(ValueError, match=r"names no trainer host:port .* set sync\.transport=tcp"):
        TcpInitInfo(verify_checksums=True)  # what the shm transport sends a qrl_tcp server
    assert issubclass(tcp.TcpStreamError, EngineDied)  # a broken stream: the trainer reconnects and re-syncs

"""The wire format of ``sync.transport=tcp``: one bucket of checkpoint-format tensors as bytes on a TCP stream.

Both ends use these functions: the trainer (:class:`qrl_megatron.bridge.transport.TcpTransport`) and the engine's
workers (the ``qrl_tcp`` backend, :mod:`qrl_megatron.rollout.weight_transfer`).

Who listens: the trainer. It opens one listening socket per engine, announces ``host:port`` in
``init_weight_transfer_engine``, and every worker of the engine (all of its TP x PP ranks, on whatever host they
run) connects to it and says which rank it is (:func:`send_hello`). The other way round (each worker listening)
would need the trainer to learn one port per worker, which vLLM's ``/init_weight_transfer_engine`` route cannot
return, and to reach hosts it does not know (a TP group across nodes); a trainer address is one value the server
side can be told, and it is what vLLM's NCCL rendezvous asks for too (``master_address``), so both network
transports need the same reachability: the servers' hosts to the trainer's ``sync.tcp_port``.

A bucket is a 24-byte header (magic ``QRLB``, format version, the bucket's sequence number, its payload size) and
then each tensor's raw bytes in the order of the update's metadata (names, dtypes, shapes, checksums: they travel
in the ``update_weights`` call, the control channel). The receiver checks the header against that metadata, reads
the whole payload, and only then cuts it into tensors, which the backend verifies against the checksums before
loading: a bucket whose bytes were altered is reported by tensor name and the stream stays in step for the next
one. Every socket carries a timeout (``sync.tcp_timeout_s``): a silent peer is an error naming ``host:port``,
never a hang.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from qrl_megatron.rollout.engine import EngineDied

MAGIC = b"QRLB"
HELLO_MAGIC = b"QRLH"
VERSION = 1
_HEADER = struct.Struct("!4sIQQ")  # magic, version, bucket sequence number, payload bytes
_HELLO = struct.Struct("!4sIII")  # magic, version, worker rank, worker world size
_CHUNK = 4 << 20  # bytes per send/recv call: a timeout applies per call, so a large bucket never needs a longer one


class TcpStreamError(ConnectionError, EngineDied):
    """The TCP weight stream broke: a peer closed it, went silent past the timeout, or sent an unexpected frame.

    An :class:`~qrl_megatron.rollout.engine.EngineDied` too: the trainer handles it as a lost engine (reconnect --
    a new stream -- re-sync, retry the step) rather than as a bug."""


def peer_name(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "<disconnected>"
    return f"{host}:{port}"


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes without a copy (a host tensor already contiguous), row-major."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().data


def payload_size(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def send_all(sock: socket.socket, data: bytes | memoryview, what: str) -> None:
    view = memoryview(data).cast("B")
    try:
        for start in range(0, len(view), _CHUNK):
            sock.sendall(view[start : start + _CHUNK])
    except TimeoutError:
        raise TcpStreamError(
            f"qrl_tcp: {peer_name(sock)} took nothing for {sock.gettimeout():g} s while sending {what} "
            f"(sync.tcp_timeout_s; is the engine stuck?)"
        ) from None
    except OSError as e:
        raise TcpStreamError(f"qrl_tcp: sending {what} to {peer_name(sock)} failed: {e}") from e


def recv_exact(sock: socket.socket, n: int, what: str, into: memoryview | None = None) -> memoryview:
    """Exactly ``n`` bytes (into ``into`` when given), or TcpStreamError naming the peer and what was short."""
    buf = into if into is not None else memoryview(bytearray(n))
    got = 0
    try:
        while got < n:
            k = sock.recv_into(buf[got : min(n, got + _CHUNK)])
            if k == 0:
                raise TcpStreamError(f"qrl_tcp: {peer_name(sock)} closed the stream after {got} of {n} bytes of {what}")
            got += k
    except TimeoutError:
        raise TcpStreamError(
            f"qrl_tcp: no bytes from {peer_name(sock)} for {sock.gettimeout():g} s ({got} of {n} bytes of {what}; "
            f"sync.tcp_timeout_s)"
        ) from None
    except TcpStreamError:
        raise
    except OSError as e:
        raise TcpStreamError(f"qrl_tcp: receiving {what} from {peer_name(sock)} failed: {e}") from e
    return buf


def send_bucket(sock: socket.socket, seq: int, tensors: Mapping[str, torch.Tensor]) -> int:
    """Header + every tensor's bytes (metadata order); the payload size."""
    size = payload_size(tensors)
    what = f"bucket {seq}"
    send_all(sock, _HEADER.pack(MAGIC, VERSION, seq, size), what)
    for t in tensors.values():
        if t.numel():
            send_all(sock, tensor_bytes(t), what)
    return size


def bucket_layout(
    dtype_names: Sequence[str], shapes: Sequence[Sequence[int]]
) -> list[tuple[torch.dtype, list[int], int]]:
    """(dtype, shape, bytes) of each tensor of an update's metadata."""
    layout = []
    for name, shape in zip(dtype_names, shapes, strict=True):
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"qrl_tcp: unknown dtype {name!r} in the update's metadata")
        numel = 1
        for d in shape:
            numel *= int(d)
        layout.append((dtype, [int(d) for d in shape], numel * torch.empty((), dtype=dtype).element_size()))
    return layout


def recv_bucket(
    sock: socket.socket, seq: int, names: Sequence[str], dtype_names: Sequence[str], shapes: Sequence[Sequence[int]]
) -> dict[str, torch.Tensor]:
    """The tensors of bucket ``seq`` as the metadata describes them (not checked: the caller verifies them)."""
    layout = bucket_layout(dtype_names, shapes)
    expected = sum(n for _, _, n in layout)
    magic, version, got_seq, size = _HEADER.unpack(recv_exact(sock, _HEADER.size, f"the header of bucket {seq}"))
    if magic != MAGIC or version != VERSION:
        raise TcpStreamError(f"qrl_tcp: {peer_name(sock)} sent {bytes(magic)!r} v{version}, not a weight bucket")
    if got_seq != seq or size != expected:
        raise TcpStreamError(
            f"qrl_tcp: stream from {peer_name(sock)} out of step: got bucket {got_seq} of {size} bytes, expected "
            f"bucket {seq} of {expected} bytes"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, (dtype, shape, n) in zip(names, layout, strict=True):
        t = torch.empty(shape, dtype=dtype)  # each tensor its own allocation: aligned for its dtype, no copy
        if n:
            recv_exact(sock, n, f"{name} of bucket {seq}", t.reshape(-1).view(torch.uint8).numpy().data)
        tensors[name] = t
    return tensors


def send_hello(sock: socket.socket, rank: int, world_size: int) -> None:
    send_all(sock, _HELLO.pack(HELLO_MAGIC, VERSION, rank, world_size), "the worker hello")


def recv_hello(sock: socket.socket) -> tuple[int, int]:
    """(rank, world size) a connecting worker announced."""
    magic, version, rank, world = _HELLO.unpack(recv_exact(sock, _HELLO.size, "the worker hello"))
    if magic != HELLO_MAGIC or version != VERSION:
        raise TcpStreamError(f"qrl_tcp: {peer_name(sock)} is not a qrl_tcp worker (got {bytes(magic)!r} v{version})")
    return rank, world


def connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """A worker's connection to the trainer at ``host:port`` (TCP_NODELAY, ``timeout_s`` on every call)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except TimeoutError:
        raise TcpStreamError(
            f"qrl_tcp: connecting to the trainer at {host}:{port} timed out after {timeout_s:g} s "
            f"(sync.tcp_timeout_s; is sync.tcp_port reachable from this host?)"
        ) from None
    except OSError as e:
        raise TcpStreamError(f"qrl_tcp: cannot connect to the trainer at {host}:{port}: {e}") from e
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout_s)
    return sock


def listen(host: str, port: int) -> socket.socket:
    """The trainer's listening socket (``port`` 0: any free one)."""
    try:
        return socket.create_server((host, port), backlog=64)
    except OSError as e:
        raise TcpStreamError(f"qrl_tcp: cannot listen on {host}:{port} (sync.tcp_port): {e}") from e


def wire_metadata(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "names": list(tensors),
        "dtype_names": [str(t.dtype).removeprefix("torch.") for t in tensors.values()],
        "shapes": [list(t.shape) for t in tensors.values()],
    }

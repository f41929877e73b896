"""One weight stream from the learner to N engines: :class:`FanOutTransport`, a transport over N transports.

The bridge gathers, quantizes and checksums each bucket once and hands it to one transport; with data-parallel
rollout (``rollout.engines=N``, :mod:`qrl_megatron.rollout.pool`) that transport is this one, which delivers the
bucket to every engine concurrently, and each engine verifies the checksums itself before loading. What is done
once per bucket depends on the members:

* all :class:`~qrl_megatron.bridge.transport.SharedMemoryTransport` (``shm``): the safetensors file is written once
  and its path announced to every engine (one write, N reads on the engines' side);
* any other transport (``tcp``, ``cuda_ipc``, ``nccl``): each member's ``update`` with the same tensors -- the
  bucket's bytes go down each engine's own connection, which is the network copy a fan-out cannot avoid (for
  ``tcp`` the bucket is copied to host memory once, for all of them).

A member whose engine died (:class:`~qrl_megatron.rollout.engine.EngineDied`) is reported to ``on_death`` after the
other members' calls have finished (never while one still runs); that callback decides whether the sync goes on
without it (it calls :meth:`FanOutTransport.drop`) or the error stands (it raises). Every other error -- a failed
checksum on any engine above all -- is raised as it is. Per member the bytes it was handed and the seconds its
calls took are counted (:attr:`FanOutTransport.sent_bytes`, :attr:`FanOutTransport.seconds`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import torch

from qrl_megatron.bridge.transport import (
    SharedMemoryTransport,
    TcpTransport,
    raise_verification_error,
    write_bucket,
)
from qrl_megatron.rollout.engine import EngineDied

__all__ = ["FanOutTransport", "concurrently"]


def concurrently(
    executor: ThreadPoolExecutor, jobs: Mapping[int, Callable[[], Any]]
) -> tuple[dict[int, Any], list[tuple[int, EngineDied]]]:
    """Run every job at once; their results by key and the jobs whose engine died (EngineDied), in key order.

    Every job has finished before this returns or raises, so no call to an engine is still running when the
    caller reacts; an error other than EngineDied (a failed checksum, a bug) is raised, the first one by key."""
    futures = {key: executor.submit(job) for key, job in jobs.items()}
    results: dict[int, Any] = {}
    deaths: list[tuple[int, EngineDied]] = []
    failure: BaseException | None = None
    for key, future in futures.items():
        try:
            results[key] = future.result()
        except EngineDied as err:
            deaths.append((key, err))
        except BaseException as err:  # noqa: BLE001 - raised once every job is done
            failure = failure or err
    if failure is not None:
        raise failure
    return results, deaths


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class FanOutTransport:
    """The ``init`` / ``start`` / ``update`` / ``finish`` / ``load_weights`` of one transport, over ``members``.

    ``on_death(i, error)``: member i's engine died during a call (it raises to stop the sync, or calls
    :meth:`drop`); members dropped are skipped from then on.
    """

    def __init__(self, members: Sequence[Any], on_death: Callable[[int, EngineDied], None]) -> None:
        if not members:
            raise ValueError("FanOutTransport needs at least one member transport")
        self.members = list(members)
        self.on_death = on_death
        self.active = list(range(len(self.members)))
        self.sent_bytes = [0] * len(self.members)
        self.seconds = [0.0] * len(self.members)
        self._pool = ThreadPoolExecutor(max_workers=len(self.members), thread_name_prefix="qrl-fanout")

    def drop(self, index: int) -> None:
        """Member ``index`` is gone: no call reaches it any more."""
        if index in self.active:
            self.active.remove(index)

    def each(self, call: Callable[[int, Any], Any]) -> list[Any]:
        """``call(i, member)`` on every active member at once; their results in member order (a dropped member's
        is None). Deaths go to ``on_death`` once every call has finished (see :func:`concurrently`)."""

        def timed(i: int) -> Any:
            start = time.perf_counter()
            try:
                return call(i, self.members[i])
            finally:
                self.seconds[i] += time.perf_counter() - start

        results, deaths = concurrently(self._pool, {i: partial(timed, i) for i in self.active})
        for i, err in deaths:
            self.on_death(i, err)
        return [results.get(i) for i in range(len(self.members))]

    # -- the transport interface -----------------------------------------------------------------------------------

    def init(self, verify_checksums: bool = True) -> None:
        self.each(lambda i, m: m.init(verify_checksums))

    def start(self) -> None:
        self.each(lambda i, m: m.start())

    def update(self, tensors: Mapping[str, torch.Tensor], sums: Mapping[str, str]) -> None:
        """One bucket to every active member (written once when they all hand buckets over as ``/dev/shm`` files)."""
        size = _nbytes(tensors)

        def counted(i: int, send: Callable[[], None]) -> None:
            send()
            self.sent_bytes[i] += size

        if all(type(m) is SharedMemoryTransport for m in self.members):
            with write_bucket(tensors) as path:
                info = {"path": path, "checksums": dict(sums)}
                self.each(lambda i, m: counted(i, lambda: _announce(m, info)))
        else:
            tensors = self._host_once(tensors)
            self.each(lambda i, m: counted(i, lambda: m.update(tensors, sums)))

    def _host_once(self, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        if any(isinstance(m, TcpTransport) for m in self.members):
            # TCP sends host bytes: one device-to-host copy for every engine (each member's copy is then a no-op)
            return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        return tensors

    def finish(self) -> None:
        self.each(lambda i, m: m.finish())

    def load_weights(self, named_tensors: Mapping[str, torch.Tensor]) -> None:
        from qrl_megatron.bridge.checksum import checksums

        self.start()
        self.update(named_tensors, checksums(named_tensors))
        self.finish()

    def call_worker(self, method: str, *args: Any) -> list[Any]:
        """The worker method on every active member; the first active member's results (they hold the same weights)."""
        results = self.each(lambda i, m: m.call_worker(method, *args))
        return next((r for i, r in enumerate(results) if i in self.active), [])

    def update_adapter(
        self, tensors: Mapping[str, torch.Tensor], sums: Mapping[str, str], adapter_info: Mapping[str, Any]
    ) -> list[Any]:
        # QeRL adapter buckets are small (the LoRA factors): each member writes its own file, or sends it down its
        # own TCP stream (every engine gets the adapter)
        tensors = self._host_once(tensors)
        results = self.each(lambda i, m: m.update_adapter(tensors, sums, adapter_info))
        return next((r for i, r in enumerate(results) if i in self.active), [])

    def update_norms(self, tensors: Mapping[str, torch.Tensor], sums: Mapping[str, str]) -> list[Any]:
        tensors = self._host_once(tensors)
        results = self.each(lambda i, m: m.update_norms(tensors, sums))
        return next((r for i, r in enumerate(results) if i in self.active), [])

    def close(self) -> None:
        """Stop the delivery threads (the member transports belong to their engines, which close them)."""
        self._pool.shutdown(wait=False)


def _announce(member: SharedMemoryTransport, info: Mapping[str, Any]) -> None:
    """Member's ``update`` of a bucket already written: its path and checksums to its engine."""
    try:
        member.channel.call("update_weights", info)
    except Exception as e:
        raise_verification_error(e)  # the worker's checksum report is in the error text
        raise

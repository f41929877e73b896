"""Run a function on N gloo worker processes from a test.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes (spawn start method) with the env vars
torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free local port), calls
``fn(rank, world_size, *args)`` in each, and returns the per-rank return values (rank order). ``fn`` must be a
module-level function of an importable module (not a test file's local), so the spawned child can unpickle it.

A worker exception is re-raised in the test as ``WorkerError`` with the worker's traceback; the other workers are
then killed (they would hang in a collective). Workers are always reaped, also on timeout or interrupt. Return
values travel as plain pickles (tensors by value, no shared-memory handles to outlive their process).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

from qrl_megatron.utils.net import free_port

__all__ = ["WorkerError", "each_layout", "free_port", "run_distributed"]


class WorkerError(RuntimeError):
    """A distributed worker failed; the message carries its traceback."""


def each_layout(rank: int, world_size: int, fn: Callable[..., Any], layouts: list[tuple], *args: Any) -> dict:
    """``fn(rank, world_size, *layout, *args)`` for each layout, in one process group: pass it to
    ``run_distributed`` with several layouts of the same world size (``init_distributed`` rebuilds megatron's
    parallel state for each), since launching the ranks costs more than the work. Returns layout -> fn's value."""
    return {layout: fn(rank, world_size, *layout, *args) for layout in layouts}


def _worker(
    fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, env: dict, results: Any
) -> None:
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    try:
        value = fn(rank, world_size, *args)
        payload = ("ok", rank, pickle.dumps(value))
    except BaseException:  # everything goes back to the test
        payload = ("error", rank, traceback.format_exc())
    finally:
        try:
            from qrl_megatron.platform import destroy_distributed

            destroy_distributed()
        except Exception:  # best effort clean-up
            pass
    results.put(payload)
    results.close()
    results.join_thread()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo worker processes; return their results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    child_env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, args, child_env, results),
            name=f"dist-worker-{rank}",
            daemon=False,  # workers may start helper processes (dist checkpointing); reaped in finally
        )
        for rank in range(world_size)
    ]
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.start()
        while len(outputs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"distributed run of {fn.__name__} timed out after {timeout:.0f}s (ranks done: {sorted(outputs)})"
                )
            try:
                status, rank, payload = results.get(timeout=min(1.0, remaining))
            except queue.Empty:
                dead = [
                    p.name
                    for r, p in enumerate(procs)
                    if r not in outputs and not p.is_alive() and p.exitcode not in (None, 0)
                ]
                if dead:
                    time.sleep(0.5)  # a result may still be in the pipe
                    if results.empty():
                        codes = {p.name: p.exitcode for p in procs}
                        raise WorkerError(f"worker(s) {dead} died without a result (exit codes {codes})") from None
                continue
            if status == "error":
                raise WorkerError(f"rank {rank} of {world_size} failed in {fn.__name__}:\n{payload}")
            outputs[rank] = pickle.loads(payload)
        return [outputs[r] for r in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=10 if len(outputs) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
        results.cancel_join_thread()

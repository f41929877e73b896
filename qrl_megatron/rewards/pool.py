"""A pool of reward worker processes with a hard per-call deadline.

A verifier can hang on one pathological completion (sympy simplifying `9^{9^{9^9}}`, a catastrophic regex); a
step must not. Each worker is a plain `python -m qrl_megatron.rewards.worker` child that imports the reward
function once and answers one JSON line per request over its pipes; a call that passes its deadline scores 0 and
its worker is killed and replaced. Subprocesses rather than multiprocessing: no fork of a process that holds
torch/vLLM threads, and no re-import of the trainer's `__main__` in every child.

The protocol is one JSON object per line each way: request `[completion, ground_truth]`, reply `{"value": x}` or
`{"error": "..."}`; the first line a worker writes is `{"ready": true}` (or an error when the import fails).
"""

from __future__ import annotations

import importlib
import json
import os
import select
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from qrl_megatron.config_fields import ConfigError

__all__ = ["PoolResult", "RewardError", "RewardPool", "resolve_function"]

START_TIMEOUT_S = 60.0  # a worker's import (math-verify pulls sympy and antlr4: about a second, more on a busy host)


class RewardError(ConfigError):
    """The reward function is missing, failed to import, raised, or returned something that is not a number (a
    ConfigError: `reward.fn` names a function that cannot serve, and the commands print it as one line)."""


def resolve_function(path: str) -> Callable[[str, str], float]:
    """`package.module:function` -> the function; a one-line RewardError naming what is wrong otherwise."""
    module_name, _, name = path.partition(":")
    if not module_name or not name:
        raise RewardError(f"reward function {path!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise RewardError(
            f"reward function {path!r}: cannot import {module_name!r} ({type(err).__name__}: {err}); "
            "make it importable (pip install -e, or run from the folder that holds it)"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"reward function {path!r}: {module_name!r} has no callable {name!r}")
    return fn  # type: ignore[no-any-return]


@dataclass
class PoolResult:
    values: list[float]
    timeouts: int = 0
    timed_out: list[int] = field(default_factory=list)  # indices of the calls that passed the deadline
    seconds: float = 0.0


class _Worker:
    def __init__(self, fn: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qrl_megatron.rewards.worker", fn],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # the worker's own messages reach the trainer's stderr
            text=True,
            env=env,
        )
        self.stdin: IO[str] = self.proc.stdin  # type: ignore[assignment]
        self.stdout: IO[str] = self.proc.stdout  # type: ignore[assignment]
        self.ready = False
        self.started = 0.0
        self.task: tuple[int, float] | None = None  # (index, deadline)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.stdin, self.stdout):
            pipe.close()


class RewardPool:
    """`workers` processes running `fn` (`package.module:function`) with a `timeout_s` deadline per call."""

    def __init__(self, fn: str, workers: int = 2, timeout_s: float = 5.0) -> None:
        resolve_function(fn)  # fail here, with one line, rather than in every child
        self.fn, self.size, self.timeout_s = fn, workers, timeout_s
        self.workers: list[_Worker] = []

    def _read(self, worker: _Worker) -> dict[str, Any]:
        line = worker.stdout.readline()
        if not line:
            raise RewardError(f"reward worker for {self.fn!r} exited (code {worker.proc.poll()}); see its stderr above")
        return json.loads(line)  # type: ignore[no-any-return]

    def _spawn(self) -> _Worker:
        worker = _Worker(self.fn)
        worker.started = time.monotonic()
        return worker

    def map(self, pairs: Sequence[tuple[str, str]]) -> PoolResult:
        """The reward of every (completion, ground_truth) pair, in order; a call past its deadline scores 0.

        A worker that passes its deadline is killed and a replacement starts in the background: the calls left
        go to the other workers meanwhile, and to it once it has imported the function.
        """
        start = time.perf_counter()
        while len(self.workers) < self.size:
            self.workers.append(self._spawn())
        values = [0.0] * len(pairs)
        result = PoolResult(values=values)
        pending = deque(range(len(pairs)))
        while pending or any(w.task for w in self.workers):
            for worker in self.workers:
                if worker.ready and worker.task is None and pending:
                    index = pending.popleft()
                    worker.stdin.write(json.dumps(list(pairs[index])) + "\n")
                    worker.stdin.flush()
                    worker.task = (index, time.monotonic() + self.timeout_s)
            watched = [w for w in self.workers if w.task or not w.ready]
            deadlines = [w.task[1] if w.task else w.started + START_TIMEOUT_S for w in watched]
            wait = max(min(deadlines) - time.monotonic(), 0.0)
            readable = set(select.select([w.stdout for w in watched], [], [], wait)[0])
            for i, worker in enumerate(self.workers):
                if worker.stdout in readable:
                    reply = self._read(worker)
                    if "error" in reply:
                        raise RewardError(reply["error"])
                    if worker.task is None:  # the first line of a new worker
                        worker.ready = True
                    else:
                        values[worker.task[0]] = reply["value"]
                        worker.task = None
                elif worker.task and time.monotonic() >= worker.task[1]:
                    worker.kill()  # stuck inside the call: only a new process gets the slot back
                    self.workers[i] = self._spawn()
                    result.timeouts += 1
                    result.timed_out.append(worker.task[0])
                elif not worker.ready and time.monotonic() >= worker.started + START_TIMEOUT_S:
                    raise RewardError(f"reward worker for {self.fn!r} did not start within {START_TIMEOUT_S:.0f} s")
        result.seconds = time.perf_counter() - start
        return result

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        self.workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

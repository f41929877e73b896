"""Data-parallel rollout: :class:`EnginePool`, one :class:`~qrl_megatron.rollout.engine.RolloutEngine` over N.

``rollout.engines=N`` starts N colocated engines, or N servers (rollout/engines.py), and the trainer sees one
engine:

* **rollouts, evaluations, probes** -- the prompts (or probe sequences) are split into contiguous shards, one per
  live engine (:func:`contiguous_shards`), run at once (a thread per engine: each call waits on an engine-core
  process or an HTTP server), and merged back in prompt order (:func:`merge_shards`). Every engine has the same
  seed and each shard passes its first prompt's index in the whole batch (``generate(..., first_index=)``), so prompt
  i is sampled with :func:`~qrl_megatron.rollout.engine.sampling_seed` of its global index: a seeded run samples the
  same batch whatever N is.
* **weights** -- one stream from the learner: the bridge gathers and quantizes each bucket once and hands it to a
  :class:`~qrl_megatron.bridge.fanout.FanOutTransport` over the engines' own transports, which delivers it to every
  engine (each verifies the checksums before loading).
* **an engine that dies** (``rollout.on_engine_failure``): it is named -- ``rollout engine i of N (colocated)`` or
  ``rollout server HOST:PORT (engine i of N)`` -- with the step it died in. ``stop``: the call raises
  :class:`~qrl_megatron.rollout.engine.EngineDied` with that name once the other engines' calls are done, and the
  trainer handles it as the death of its one engine: restart (the whole pool) and re-sync up to
  ``trainer.engine_restarts`` times, then the run ends with that line. ``continue``: the engine is dropped (a line
  says so), its shard is re-split over the engines left and the call completes; the weight sync goes on without
  it; with no engine left the call raises EngineDied (then restarts as above, or the end).
* **metrics** -- :meth:`EnginePool.step_metrics`: per engine, ``engine<i>/rollout_tokens_per_s``,
  ``engine<i>/sync_seconds`` and ``engine<i>/sync_bytes`` of the current step, and ``engines_alive``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from qrl_megatron.bridge.fanout import FanOutTransport, concurrently
from qrl_megatron.config_fields import ConfigError
from qrl_megatron.rollout.engine import Completion, EngineDied, TransportWeights

__all__ = ["EnginePool", "contiguous_shards", "merge_shards"]

FAILURE_POLICIES = ("stop", "continue")


def contiguous_shards(count: int, parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``parts`` contiguous shards of ``count`` items in order, their sizes differing by at most
    one (the first ``count % parts`` are the larger); with more parts than items the last shards are empty."""
    if parts < 1:
        raise ValueError(f"contiguous_shards: parts={parts} must be >= 1")
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for p in range(parts):
        stop = start + base + (p < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def merge_shards(shards: Sequence[tuple[int, list[Completion]]]) -> list[Completion]:
    """The completions of every shard, in prompt order: ``(first prompt index of the shard, its completions)``, each
    numbered from 0 within its shard; the result's ``prompt_index`` counts over the whole batch."""
    merged: list[Completion] = []
    for first, completions in sorted(shards, key=lambda s: s[0]):
        merged.extend(dataclasses.replace(c, prompt_index=first + c.prompt_index) for c in completions)
    return merged


class EnginePool(TransportWeights):
    """N rollout engines behind the one-engine interface (module docstring); ``names[i]`` names engine i in the
    failure reports; ``on_failure``: ``rollout.on_engine_failure``."""

    def __init__(self, engines: Sequence[Any], names: Sequence[str], on_failure: str = "stop") -> None:
        if not engines or len(names) != len(engines):
            raise ValueError(f"EnginePool: {len(engines)} engines and {len(names)} names (one name per engine)")
        if on_failure not in FAILURE_POLICIES:
            raise ValueError(f"rollout.on_engine_failure={on_failure!r} is not one of {', '.join(FAILURE_POLICIES)}")
        self.engines, self.names, self.on_failure = list(engines), list(names), on_failure
        self.alive = list(range(len(self.engines)))
        self.step = 0
        self.tokenizer = self.engines[0].tokenizer
        self.adapter = getattr(self.engines[0], "adapter", None)  # QeRL: every engine serves the same adapter
        self.transport = FanOutTransport([e.transport for e in self.engines], self._died)
        self._threads = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="qrl-pool")
        self._tokens = [0] * len(self.engines)
        self._generate_seconds = [0.0] * len(self.engines)

    # -- failures ------------------------------------------------------------------------------------------------

    def _died(self, index: int, error: EngineDied) -> None:
        """Engine ``index`` died: raise (``stop``, or none left), or drop it and say so (``continue``)."""
        detail = str(error).strip().splitlines()  # one line: a server's error has its log's tail after the first
        report = f"{self.names[index]} died at step {self.step}: {detail[0] if detail else type(error).__name__}"
        if index in self.alive:
            self.alive.remove(index)
        self.transport.drop(index)
        if self.on_failure == "stop":
            raise EngineDied(f"{report} (rollout.on_engine_failure=stop)") from error
        if not self.alive:
            raise EngineDied(f"{report}; no rollout engine left (rollout.on_engine_failure=continue)") from error
        print(
            f"{report}; continuing on {len(self.alive)} of {len(self.engines)} engines, its prompts re-split to "
            "them (rollout.on_engine_failure=continue)",
            flush=True,
        )

    def _each(self, call: Callable[[Any], Any]) -> list[Any]:
        """``call(engine)`` on every live engine at once; their results in engine order (deaths per the policy)."""
        results, deaths = concurrently(self._threads, {i: partial(call, self.engines[i]) for i in self.alive})
        for i, err in deaths:
            self._died(i, err)
        return [results[i] for i in sorted(results)]

    def _split(self, count: int, call: Callable[[Any, int, int], list[Any]]) -> list[tuple[int, list[Any]]]:
        """``call(engine, start, stop)`` over contiguous shards of ``range(count)``, one per live engine, at once;
        the shard of an engine that dies is re-split over the others (``continue``). ``(start, results)`` pairs."""
        pending, done = [(0, count)], []
        while pending:
            if not self.alive:
                raise EngineDied(f"no rollout engine left at step {self.step}")
            work: dict[int, list[tuple[int, int]]] = {i: [] for i in self.alive}
            for start, stop in pending:
                for i, (a, b) in zip(self.alive, contiguous_shards(stop - start, len(self.alive)), strict=True):
                    if b > a:
                        work[i].append((start + a, start + b))

            def run(i: int, ranges: list[tuple[int, int]]) -> list[tuple[int, list[Any]]]:
                # one engine's ranges one after the other: an engine takes one call at a time
                return [(a, call(self.engines[i], a, b)) for a, b in ranges]

            jobs = {i: partial(run, i, r) for i, r in work.items() if r}
            results, deaths = concurrently(self._threads, jobs)
            for out in results.values():
                done.extend(out)
            pending = [rng for i, _ in deaths for rng in work[i]]
            for i, err in deaths:
                self._died(i, err)  # raises under `stop`
        return done

    # -- rollout -------------------------------------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        """The training step now running: named in failure reports; :meth:`step_metrics` counts from here."""
        self.step = step
        self._tokens = [0] * len(self.engines)
        self._generate_seconds = [0.0] * len(self.engines)
        self.transport.sent_bytes = [0] * len(self.engines)
        self.transport.seconds = [0.0] * len(self.engines)

    def generate(
        self, prompts: list[str], n: int, temperature: float, max_new_tokens: int, step: int, first_index: int = 0
    ) -> list[Completion]:
        """The prompts in contiguous shards over the live engines; prompt i seeded by ``first_index + i``."""

        def shard(engine: Any, a: int, b: int) -> list[Completion]:
            i = self.engines.index(engine)
            start = time.perf_counter()
            out = engine.generate(prompts[a:b], n, temperature, max_new_tokens, step, first_index + a)
            self._generate_seconds[i] += time.perf_counter() - start
            self._tokens[i] += sum(len(c.token_ids) for c in out)
            return out

        return merge_shards(self._split(len(prompts), shard))

    def greedy(self, prompts: list[str], max_new_tokens: int) -> list[Completion]:
        return self.generate(prompts, n=1, temperature=0.0, max_new_tokens=max_new_tokens, step=0)

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """The sequences split over the live engines (a probe checks each engine on its share)."""
        parts = self._split(len(sequences), lambda engine, a, b: engine.prompt_logprobs(sequences[a:b]))
        return [row for _, rows in sorted(parts, key=lambda p: p[0]) for row in rows]

    def step_metrics(self) -> dict[str, float]:
        metrics = {"engines_alive": float(len(self.alive))}
        for i in range(len(self.engines)):
            seconds = self._generate_seconds[i]
            metrics[f"engine{i}/rollout_tokens_per_s"] = self._tokens[i] / seconds if seconds else 0.0
            metrics[f"engine{i}/sync_seconds"] = self.transport.seconds[i]
            metrics[f"engine{i}/sync_bytes"] = float(self.transport.sent_bytes[i])
        return metrics

    # -- memory, noise, checks -------------------------------------------------------------------------------------

    def release_memory(self) -> None:
        self._each(lambda e: e.release_memory())

    def reacquire_memory(self, tags: Sequence[str] | None = None) -> None:
        self._each(lambda e: e.reacquire_memory(tags))

    def parameter_checksums(self) -> dict[str, float]:
        """The first live engine's (all hold the same weights; :meth:`checksums_per_engine` for each)."""
        return self.checksums_per_engine()[0]

    def checksums_per_engine(self) -> list[dict[str, float]]:
        return self._each(lambda e: e.parameter_checksums())

    def add_norm_noise(self, sigma: float, seed: int) -> dict[str, float]:
        """QeRL AQN: the same noise (same seed) on every engine: they stay one policy."""
        return self._each(lambda e: e.add_norm_noise(sigma, seed))[0]

    def close(self) -> None:
        """Close every engine (dead ones too: a server's process group is stopped), then the threads."""
        errors = []
        for engine in self.engines:
            try:
                engine.close()
            except Exception as err:  # noqa: BLE001 -- a dead engine may fail to close; close the others
                errors.append(f"{type(err).__name__}: {err}")
        self.transport.close()
        self._threads.shutdown(wait=False)
        if errors:
            raise RuntimeError("closing the rollout engines failed: " + "; ".join(errors))


def member_configs(rollout: Any) -> list[Any]:
    """The ``rollout.*`` config of each of the ``rollout.engines`` engines (one engine each): servers listed in
    ``rollout.server_urls`` get one URL each, in order; without URLs every engine is started here."""
    urls = list(rollout.server_urls)
    if rollout.engine == "server" and urls:
        if len(urls) != rollout.engines:
            raise ConfigError(
                f"rollout.server_urls lists {len(urls)} servers but rollout.engines={rollout.engines}; set "
                f"rollout.engines={len(urls)} (one engine per server)"
            )
        return [dataclasses.replace(rollout, engines=1, server_urls=[], server_url=url) for url in urls]
    return [dataclasses.replace(rollout, engines=1) for _ in range(rollout.engines)]


def engine_name(engine: Any, index: int, count: int) -> str:
    """How a failure report names engine ``index`` of ``count``: a server by host:port, a colocated one by index."""
    url = getattr(engine, "url", "")
    if url:
        from urllib.parse import urlparse

        where = urlparse(url)
        return f"rollout server {where.hostname}:{where.port} (engine {index} of {count})"
    return f"rollout engine {index} of {count} (colocated)"


def start_pool(rollout: Any, start: Callable[[Any], Any]) -> EnginePool:
    """``rollout.engines`` engines, ``start(member_config)`` each -- servers at once (each is a process of its own;
    its start is mostly waiting), colocated ones one after the other -- as one :class:`EnginePool`. If one fails to
    start, those started are closed and the error stands."""
    configs = member_configs(rollout)
    engines: list[Any] = []
    try:
        if rollout.engine == "server":
            with ThreadPoolExecutor(max_workers=len(configs)) as threads:
                futures = [threads.submit(start, c) for c in configs]
                errors: list[BaseException] = []
                for future in futures:  # every start finishes (or fails) before an error is raised
                    try:
                        engines.append(future.result())
                    except BaseException as err:  # noqa: BLE001 - raised below, after the other starts
                        errors.append(err)
                if errors:
                    raise errors[0]
        else:
            engines = [start(c) for c in configs]
    except BaseException:
        for engine in engines:
            try:
                engine.close()
            except Exception as err:  # noqa: BLE001 -- the start error is the one to report
                print(f"closing a rollout engine after a failed start: {type(err).__name__}: {err}", flush=True)
        raise
    names = [engine_name(e, i, len(engines)) for i, e in enumerate(engines)]
    return EnginePool(engines, names, rollout.on_engine_failure)

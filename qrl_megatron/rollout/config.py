"""Config of the vLLM rollout engine (`rollout.*`) and of QeRL adaptive quantization noise in it (`algo.aqn.*`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qrl_megatron.config_fields import ConfigError, check_choice, check_positive, check_range, doc
from te_ext.formats import ROLLOUT_FORMATS

__all__ = ["AQNConfig", "RolloutConfig"]


@dataclass
class RolloutConfig:
    quant: str = doc(
        "bf16", "number format of the engine's linear weights: bf16, nvfp4 (W4A16), fp8 (W8A8 per channel), int8 (W8A8)"
    )
    engine: str = doc("colocated", "colocated: vLLM in the trainer's process tree; server: a `vllm serve` over HTTP")
    server_url: str = doc("", "engine=server: URL of a running `vllm serve` (empty: start one on loopback)")
    server_urls: list[str] = doc(
        text="engine=server: URLs of running `vllm serve` rollout servers, one engine each (rollout.engines = their "
        "number); one URL is the same as server_url",
        factory=list,
    )
    server_list: str = doc(
        "",
        "engine=server: a file of server URLs, one per line, as slurm/rollout_servers.sbatch writes it (waited for; "
        "rollout.engines = their number)",
    )
    server_wait_s: float = doc(
        600.0, "servers at URLs: deadline for the server_list file to appear and for every server's GET /health"
    )
    tp: int = doc(1, "tensor-parallel size of the vLLM engine (it reshards the full tensors the bridge sends)")
    engines: int = doc(
        1,
        "data-parallel rollout: N engines (colocated, or servers: one per listed URL, or N started on loopback), "
        "each prompt batch split across them and every one refitted each step (rollout/pool.py)",
    )
    on_engine_failure: str = doc(
        "stop",
        "an engine that dies: stop (restarted per trainer.engine_restarts, then the run ends naming it) or "
        "continue (dropped, its prompts re-split to the others; the run stops with none left)",
    )
    prompts_per_step: int = doc(32, "prompts per RL step")
    samples_per_prompt: int = doc(8, "completions per prompt (the GRPO group size)")
    max_new_tokens: int = doc(8, "longest completion in tokens")
    temperature: float = doc(1.0, "sampling temperature (rollout logprobs are of this processed distribution)")
    top_p: float = doc(1.0, "nucleus sampling mass")
    kv_cache_mib: int = doc(
        256,
        "KV-cache memory of the engine in MiB (on CPU: host RAM); 0: vLLM sizes it from gpu_memory_utilization (GPU)",
    )
    gpu_memory_utilization: float = doc(
        0.9,
        "GPU: fraction of the GPU's memory the engine may take, checked free at its start (colocated with the "
        "learner: leave the learner its share); CPU: unused (the KV cache is kv_cache_mib)",
    )
    enforce_eager: bool = doc(True, "skip graph compilation in vLLM (faster start on CPU; CUDA graphs on GPU when off)")
    sleep_level: int = doc(
        0,
        "colocated engine on GPU, vLLM sleep mode during the learner phase: 0 off, 1 weights to host + KV cache "
        "dropped, 2 both dropped (the next sync rewrites every weight)",
    )
    call_timeout_s: float = doc(
        1800.0, "an engine call (a rollout, an evaluation) running longer is a hung engine: restarted (0 = no limit)"
    )

    def validate(self, prefix: str = "rollout") -> None:
        check_choice(f"{prefix}.quant", self.quant, ROLLOUT_FORMATS)
        check_choice(f"{prefix}.engine", self.engine, ("colocated", "server"))
        check_positive(f"{prefix}.tp", self.tp)
        check_positive(f"{prefix}.engines", self.engines)
        check_choice(f"{prefix}.on_engine_failure", self.on_engine_failure, ("stop", "continue"))
        if self.engines > 1 and self.server_url:
            raise ConfigError(
                f"{prefix}.engines={self.engines} with one {prefix}.server_url: one engine per server; list "
                f"{self.engines} in {prefix}.server_urls, or leave {prefix}.server_url empty to start them on loopback"
            )
        if self.server_url and not self.server_url.startswith(("http://", "https://")):
            raise ConfigError(f"{prefix}.server_url must start with http:// or https://, got {self.server_url!r}")
        self._check_server_urls(prefix)
        if self.sleep_level and (self.server_url or self.server_urls or self.server_list):
            raise ConfigError(
                f"{prefix}.sleep_level={self.sleep_level} with {prefix}.server_url: an engine this run does not start "
                f"has no sleep mode enabled by it; set {prefix}.sleep_level=0 or leave {prefix}.server_url empty"
            )
        check_positive(f"{prefix}.prompts_per_step", self.prompts_per_step)
        check_positive(f"{prefix}.samples_per_prompt", self.samples_per_prompt)
        check_positive(f"{prefix}.max_new_tokens", self.max_new_tokens)
        check_positive(f"{prefix}.temperature", self.temperature)
        check_range(f"{prefix}.top_p", self.top_p, 1e-6, 1.0)
        check_positive(f"{prefix}.kv_cache_mib", self.kv_cache_mib, allow_zero=True)
        check_range(f"{prefix}.gpu_memory_utilization", self.gpu_memory_utilization, 0.01, 1.0)
        check_choice(f"{prefix}.sleep_level", self.sleep_level, (0, 1, 2))
        check_positive(f"{prefix}.call_timeout_s", self.call_timeout_s, allow_zero=True)

    def _check_server_urls(self, prefix: str) -> None:
        given = [k for k in ("server_url", "server_urls", "server_list") if getattr(self, k)]
        if len(given) > 1:
            raise ConfigError(
                f"{prefix}.{given[0]} and {prefix}.{given[1]} both name the servers; set only one of them"
            )
        for i, url in enumerate(self.server_urls):
            if not str(url).startswith(("http://", "https://")):
                raise ConfigError(f"{prefix}.server_urls[{i}] must start with http:// or https://, got {url!r}")
        if len(self.server_urls) > 1 and self.engines != len(self.server_urls):
            raise ConfigError(
                f"{prefix}.server_urls lists {len(self.server_urls)} servers but {prefix}.engines={self.engines}; "
                f"set {prefix}.engines={len(self.server_urls)} (one engine per server)"
            )
        check_positive(f"{prefix}.server_wait_s", self.server_wait_s)

    def check_device(self, cuda: bool, prefix: str = "rollout") -> None:
        """The settings that need a GPU, against this machine (``cuda``: CUDA is available); at the run's start."""
        if cuda:
            if self.engine == "colocated" and self.engines > 1:
                raise ConfigError(
                    f"{prefix}.engines={self.engines} colocated engines would all sit on the learner's GPU (there is "
                    f"no per-engine GPU assignment); use {prefix}.engine=server with one server per GPU or host "
                    f"({prefix}.server_urls), or {prefix}.engines=1"
                )
            return
        if self.sleep_level:
            raise ConfigError(
                f"{prefix}.sleep_level={self.sleep_level} needs CUDA (vLLM has no sleep mode on CPU); set "
                f"{prefix}.sleep_level=0"
            )
        if self.kv_cache_mib == 0:
            raise ConfigError(
                f"{prefix}.kv_cache_mib=0 sizes the KV cache from {prefix}.gpu_memory_utilization, which needs CUDA "
                f"(on CPU it would reserve that fraction of host RAM); set {prefix}.kv_cache_mib to a size in MiB"
            )

    def engine_memory_args(self) -> dict[str, Any]:
        """The vLLM engine arguments of the memory settings (``LLM(**...)``; ``vllm serve`` gets them as flags)."""
        return {
            # vLLM 0.32: an explicit KV-cache size wins over the fraction (on CPU the fraction is then not checked)
            "kv_cache_memory_bytes": self.kv_cache_mib * 2**20 if self.kv_cache_mib else None,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enforce_eager": self.enforce_eager,
            "enable_sleep_mode": self.sleep_level > 0,
        }


@dataclass
class AQNConfig:
    enabled: bool = doc(False, "QeRL adaptive quantization noise on the rollout engine's decoder-layer RMSNorm weights")
    sigma_start: float = doc(1e-2, "noise std of the first noisy stage (QeRL paper: 1e-2)")
    sigma_end: float = doc(5e-4, "noise std of the last stage, geometric in between (QeRL paper: 5e-4, scripts: 1e-4)")
    stages: int = doc(10, "K equal stages over trainer.max_steps; stage 0 has no noise (QeRL: 10)")

    def validate(self, prefix: str = "algo.aqn") -> None:
        check_positive(f"{prefix}.sigma_start", self.sigma_start)
        check_positive(f"{prefix}.sigma_end", self.sigma_end)
        if self.stages < 2:
            raise ConfigError(f"{prefix}.stages={self.stages} must be >= 2 (stage 0 has no noise)")

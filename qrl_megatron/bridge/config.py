"""Config of the learner -> engine weight sync (`sync.*`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from qrl_megatron.config_fields import ConfigError, check_choice, check_positive, doc

__all__ = ["SyncConfig"]


@dataclass
class SyncConfig:
    method: str = doc("bridge", "bridge: plan -> gather/quantize -> bucketed stream -> verify; full: bf16 v0 reload")
    bucket_mib: float = doc(64.0, "largest bucket streamed at once in MiB (bounds the extra memory of a sync)")
    exclude: list[str] = doc(
        text="regexes on HF names of linears kept in bf16 (embeddings, lm_head, norms and biases always are)",
        factory=list,
    )
    verify_checksums: bool = doc(
        True, "engine checks a checksum of every received tensor before loading it (CRC-32; on GPU a device word sum)"
    )
    transport: str = doc(
        "auto",
        "how buckets reach the engine: shm (/dev/shm files), cuda_ipc (same GPU), nccl (server on other GPUs/hosts); "
        "auto: shm on CPU, cuda_ipc for an engine on the learner's GPU, nccl for a remote server",
    )
    probe_every: int = doc(
        10, "logprob probe (engine vs the learner's forward on the engine's weights) every N syncs (0: off)"
    )
    probe_tolerance: float = doc(
        0.0,
        "largest allowed mean probe |logprob gap| in nats (0: the format's, 0.05 for bf16, 0.1 for nvfp4/fp8/int8)",
    )
    probe_sequences: int = doc(4, "held-out prompt+answer sequences the probe scores")

    def validate(self, prefix: str = "sync") -> None:
        check_choice(f"{prefix}.method", self.method, ("bridge", "full"))
        check_choice(f"{prefix}.transport", self.transport, ("auto", "shm", "cuda_ipc", "nccl"))
        check_positive(f"{prefix}.bucket_mib", self.bucket_mib)
        for i, pattern in enumerate(self.exclude):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(
                    f"{prefix}.exclude[{i}] = {pattern!r} is not a valid regular expression: {e}"
                ) from None
        check_positive(f"{prefix}.probe_every", self.probe_every, allow_zero=True)
        check_positive(f"{prefix}.probe_tolerance", self.probe_tolerance, allow_zero=True)
        check_positive(f"{prefix}.probe_sequences", self.probe_sequences)

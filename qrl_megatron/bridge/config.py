"""Config of the learner -> engine weight sync (`sync.*`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qrl_megatron.config_fields import ConfigError, check_choice, check_positive, check_range, doc

if TYPE_CHECKING:
    from qrl_megatron.bridge.transport import TcpOptions

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
        "how buckets reach the engine: shm (/dev/shm files), cuda_ipc (same GPU), nccl (server on other GPUs/hosts), "
        "tcp (a server on any host, CPU or GPU); auto: shm on CPU (tcp for a server on another host), cuda_ipc for an "
        "engine on the learner's GPU, nccl for a server at a URL",
    )
    tcp_address: str = doc(
        "", "transport=tcp: the trainer's address as the servers reach it (empty: the interface routed to the server)"
    )
    tcp_port: int = doc(0, "transport=tcp: the port the trainer listens on for the engine's workers (0: any free one)")
    tcp_timeout_s: float = doc(
        120.0, "transport=tcp: connect/accept/send/receive timeout of every socket; a peer silent longer is an error"
    )
    probe_every: int = doc(
        10, "logprob probe (engine vs the learner's forward on the engine's weights) every N syncs (0: off)"
    )
    probe_tolerance: float = doc(
        0.0,
        "largest allowed mean probe |logprob gap| in nats (0: the format's, 0.05 for bf16, 0.1 for nvfp4/fp8/int8)",
    )
    probe_sequences: int = doc(4, "held-out prompt+answer sequences the probe scores")

    def tcp_options(self) -> TcpOptions:
        """The ``sync.tcp_*`` settings as the TCP transport takes them."""
        from qrl_megatron.bridge.transport import TcpOptions

        return TcpOptions(self.tcp_address, self.tcp_port, self.tcp_timeout_s)

    def validate(self, prefix: str = "sync") -> None:
        check_choice(f"{prefix}.method", self.method, ("bridge", "full"))
        check_choice(f"{prefix}.transport", self.transport, ("auto", "shm", "cuda_ipc", "nccl", "tcp"))
        check_range(f"{prefix}.tcp_port", self.tcp_port, 0, 65535)
        check_positive(f"{prefix}.tcp_timeout_s", self.tcp_timeout_s)
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

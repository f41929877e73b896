"""A rollout server that trains over the network: one real `vllm serve` on loopback with the ``qrl_tcp`` backend.

The test starts the server (as slurm/rollout_servers.sbatch would, with the project's plugins and
``--weight-transfer-config '{"backend": "qrl_tcp"}'``), checks that a bucket corrupted after its checksum was taken
is refused by tensor name and never loaded, then lists the server in a file (``rollout.server_list``, the format
the sbatch script writes) and runs `qrl-train` against it: ``sync.transport=auto`` resolves to tcp for listed
servers on CPU, every step's weights stream over TCP, and the bridge's checks (checksums, the logprob probe after
every sync) pass.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from e2e_utils import push_weights, qrl_train, read_metrics

pytestmark = pytest.mark.e2e

PROBES = [[3, 4, 12, 5, 6, 15, 5, 8, 1], [9, 10, 12, 11, 15, 3, 4]]


def test_a_listed_rollout_server_is_refitted_over_tcp_and_refuses_a_corrupted_bucket(
    tiny_model_dir: Path, run_cache_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from qrl_megatron.bridge.checksum import WeightVerificationError
    from qrl_megatron.bridge.transport import TcpTransport
    from qrl_megatron.config import RolloutConfig
    from qrl_megatron.rollout.server_engine import VLLMServerEngine

    max_len = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    start = time.perf_counter()
    server = VLLMServerEngine(str(tiny_model_dir), RolloutConfig(kv_cache_mib=64), 0, max_len, transport="tcp")
    print(f"\nvllm serve (qrl_tcp) ready in {time.perf_counter() - start:.1f} s at {server.url}")
    try:
        assert server.weight_backend == "qrl_tcp" and isinstance(server.transport, TcpTransport)
        assert len(server.transport.streams) == 1  # its one worker connected back to us
        weights = load_file(str(tiny_model_dir / "model.safetensors"))
        before = server.prompt_logprobs(PROBES)
        victim = "model.layers.1.mlp.down_proj.weight"
        with pytest.raises(WeightVerificationError, match=victim.replace(".", r"\.") + ": checksum") as refused:
            push_weights(server, weights, corrupt=victim)
        print(f"refused: {refused.value}")
        push_weights(server, weights)  # the stream is still in step: the next update goes through
        after = server.prompt_logprobs(PROBES)
        gap = max(abs(a - b) for ra, rb in zip(after, before, strict=True) for a, b in zip(ra, rb, strict=True))
        assert gap < 1e-3, "the served model must never have held the damaged tensor"

        listing = tmp_path / "rollout_servers.txt"
        listing.write_text(server.url + "\n")  # what slurm/rollout_servers.sbatch writes once its servers are up
        run_dir = tmp_path / "run"
        start = time.perf_counter()
        result = qrl_train(
            run_dir,
            run_cache_dir,
            "rollout.engine=server",
            f"rollout.server_list={listing}",
            "trainer.max_steps=2",
            "sync.probe_every=1",
        )
        print(f"qrl-train, 2 steps against the listed server over TCP: {time.perf_counter() - start:.1f} s")
        assert f"rollout servers from {listing}: {server.url}" in result.stdout
        metrics = read_metrics(run_dir)
        assert [m["step"] for m in metrics] == [1, 2]
        for m in metrics:
            assert m["sync_bytes"] == metrics[0]["sync_bytes"] > 0
            assert m["probe_gap_mean"] < 0.05, m  # the engine holds what the learner sent
        print(
            "sync over TCP per step: "
            + ", ".join(f"{m['sync_bytes'] / 2**20:.2f} MiB in {m['sync_seconds']:.3f} s" for m in metrics)
            + f"; probe gap mean {max(m['probe_gap_mean'] for m in metrics):.4f}"
        )
    finally:
        server.close()

"""The `qrl-train` command line of the end-to-end tests, shared so that their runs share one warm-start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The tiny recipe made quick: a small task, a short warm-start (trained once per run.cache_dir) and small steps.
QUICK = ("run.progress=false", "task.num_train=600", "warmstart.steps=40", "rollout.prompts_per_step=8")
# The reference run (tests/conftest.py `reference_run`): test_e2e checks its outputs; test_faults interrupts the
# same command in every way it can and compares the results with it, bit for bit.
REFERENCE = ("trainer.max_steps=4", "trainer.save_every=2")


def qrl_train_command(run_dir: Path, cache_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "qrl_megatron.cli", "configs/tiny_cpu.yaml",
        f"run.dir={run_dir}", f"run.cache_dir={cache_dir}", *QUICK, *overrides,
    ]  # fmt: skip


def qrl_train(
    run_dir: Path, cache_dir: Path, *overrides: str, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    command = qrl_train_command(run_dir, cache_dir, *overrides)
    env = os.environ.copy() if env is None else env
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"qrl-train failed ({result.returncode}):\n{result.stderr[-6000:]}"
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def push_weights(server, weights: dict, corrupt: str = "") -> None:  # noqa: ANN001
    """Refit ``server`` (a VLLMServerEngine) with ``weights`` in two buckets with per-tensor checksums; ``corrupt``
    names a tensor to alter after its checksum is taken (one bit of one byte, as if flipped in transit)."""
    import torch

    from qrl_megatron.bridge.checksum import checksums

    names = sorted(weights)
    server.start_weight_update()
    for bucket in (names[: len(names) // 2], names[len(names) // 2 :]):
        tensors = {k: weights[k] for k in bucket}
        sums = checksums(tensors)
        if corrupt in tensors:
            damaged = tensors[corrupt].clone()
            damaged.view(torch.uint8).view(-1)[7] ^= 0x01
            tensors[corrupt] = damaged
        server.update_weights(tensors, sums)
    server.finish_weight_update()

"""Faults the trainer survives, each injected from the test: a non-finite step, a kill -9, a preemption signal."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _fault_workers import nan_step_worker
from dist_utils import run_distributed
from safetensors.torch import load_file

from qrl_megatron.learner.resume import EXIT_PREEMPTED, CheckpointStore


@pytest.mark.dist
def test_a_non_finite_loss_on_one_rank_skips_the_step_everywhere_and_leaves_weights_and_adam_untouched(
    tiny_model_dir,
):
    results = run_distributed(nan_step_worker, 2, 2, str(tiny_model_dir), timeout=240)
    for r in results:
        assert r["first_skipped"] == 0.0
        assert r["skipped"] == 1.0 and math.isnan(r["skipped_grad_norm"])
        assert r["weights_untouched"] and r["moments_untouched"]
        assert r["recovered_skipped"] == 0.0 and r["recovered_moved"] and r["recovered_finite"]


# ---------------------------------------------------------------------------------------------------------------
# kill -9 and preemption of a real `qrl-train` run, resumed with the same command

REPO = Path(__file__).resolve().parents[1]
# wall-clock fields differ between any two runs; everything else must be bit-identical after a resume
WALL_CLOCK = ("time", "seconds", "per_s", "gbps")


def _command(run_dir: Path, cache_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "qrl_megatron.cli", "configs/tiny_cpu.yaml",
        f"run.dir={run_dir}", f"run.cache_dir={cache_dir}", "run.progress=false", "task.num_train=600",
        "warmstart.steps=40", "rollout.prompts_per_step=8", "trainer.max_steps=4", "trainer.save_every=2",
        "trainer.checkpoint=false",
    ]  # fmt: skip


def _wait_for(predicate, process: subprocess.Popen, what: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"the run ended before {what}: {process.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _deterministic_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not any(w in k for w in WALL_CLOCK)} for row in rows]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for path in sorted((run_dir / "final").glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


@pytest.mark.e2e
def test_kill_9_and_preemption_resume_bit_identically(tmp_path):
    """Uninterrupted run vs a run SIGKILLed after its step-2 checkpoint, resumed, preempted (SIGUSR1) during the
    resumed run, resumed again: the same metrics (but wall-clock ones) and the same final weights, bit for bit."""
    cache = tmp_path / "cache"
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    env = os.environ.copy()
    subprocess.run(_command(reference, cache), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            _command(interrupted, cache), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip

    first = start()
    _wait_for(lambda: (interrupted / "checkpoints" / "step_00000002" / "MANIFEST.json").is_file(), first, "step 2")
    os.killpg(first.pid, signal.SIGKILL)  # the trainer and its vLLM engine processes, with no chance to clean up
    first.wait(timeout=60)

    second = start()  # the same command: continues from step 2; preempted during step 3
    assert second.stdout is not None
    for line in second.stdout:  # the preemption handler is installed before the resume is announced
        if "resuming from" in line:
            break
    else:
        pytest.fail(f"the second run never resumed (exit {second.wait()})")
    second.send_signal(signal.SIGUSR1)
    output = second.communicate(timeout=400)[0]
    assert second.returncode == EXIT_PREEMPTED, output[-4000:]
    assert (interrupted / "checkpoints" / "step_00000003").is_dir(), "the preemption checkpoint is missing"

    third = subprocess.run(_command(interrupted, cache), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-4000:]
    assert "resuming from" in third.stdout and "step_00000003" in third.stdout
    assert CheckpointStore(interrupted / "checkpoints").steps() == [3, 4]  # keep_checkpoints=2

    assert [r["step"] for r in _deterministic_rows(interrupted)] == [1, 2, 3, 4]
    assert _deterministic_rows(interrupted) == _deterministic_rows(reference)
    ref_weights, weights = _final_weights(reference), _final_weights(interrupted)
    assert ref_weights.keys() == weights.keys() and ref_weights
    assert all(torch.equal(ref_weights[k], weights[k]) for k in ref_weights)

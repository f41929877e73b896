"""Faults the trainer survives, each injected from the test: a non-finite step, a kill -9, a preemption signal."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from _fault_workers import nan_step_worker
from dist_utils import run_distributed
from e2e_utils import REFERENCE, REPO, qrl_train_command

from qrl_megatron.learner.resume import EXIT_PREEMPTED, CheckpointStore
from qrl_megatron.models.base import load_hf_weights


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

# wall-clock fields differ between any two runs; everything else must be bit-identical after a resume
WALL_CLOCK = ("time", "seconds", "per_s", "gbps")


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
    """The exported policy in ``run.dir/final/``, read by the loader the trainer uses (index, every shard)."""
    return dict(load_hf_weights(run_dir / "final"))


def _engine_core(trainer_pid: int) -> psutil.Process | None:
    """The colocated vLLM engine-core process under the trainer (vLLM titles it ``VLLM::EngineCore``)."""
    for child in psutil.Process(trainer_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child
    return None


@pytest.mark.e2e
def test_engine_kill_kill_9_and_preemption_leave_the_run_bit_identical(tmp_path, reference_run, run_cache_dir):
    """The uninterrupted reference run vs the same command whose engine core is SIGKILLed during step 2 (restarted,
    re-synced, step retried), whose trainer is SIGKILLed after the step-2 checkpoint, resumed, preempted by SIGUSR1
    (checkpoint, exit 75) and resumed again: the same metrics (but wall-clock ones) and final weights, bit for bit."""
    reference, interrupted = reference_run, tmp_path / "interrupted"
    command = qrl_train_command(interrupted, run_cache_dir, *REFERENCE)
    env = os.environ.copy()
    logs: list[Path] = []

    def start() -> subprocess.Popen:
        logs.append(tmp_path / f"attempt{len(logs)}.log")
        with logs[-1].open("w") as log:  # a file, not a pipe: a full pipe would block the trainer
            return subprocess.Popen(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def logged_steps() -> int:
        path = interrupted / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.is_file() else 0

    first = start()
    _wait_for(lambda: logged_steps() >= 1, first, "step 1")
    engine = _engine_core(first.pid)
    assert engine is not None, "no engine-core process found under the trainer"
    # The next engine call finds the engine dead: step 2's rollout, or -- when the trainer got through that rollout
    # while this test was polling (CI saw it: a loaded 2-core machine) -- step 2's sync or step 3's rollout. Each is
    # restarted, re-synced and retried, so the run stays bit-identical whichever it is.
    engine.kill()
    died = re.compile(r"step [23]: the colocated vLLM engine core died")
    _wait_for(lambda: died.search(logs[0].read_text()) is not None, first, "the engine's death report")
    _wait_for(lambda: (interrupted / "checkpoints" / "step_00000002" / "MANIFEST.json").is_file(), first, "step 2")
    os.killpg(first.pid, signal.SIGKILL)  # the trainer and its engine, with no chance to clean up
    first.wait(timeout=60)

    second = start()  # the same command: continues from step 2; preempted during step 3
    _wait_for(lambda: "resuming from" in logs[1].read_text(), second, "the resume")
    second.send_signal(signal.SIGUSR1)  # the handler is installed before the resume is announced
    assert second.wait(timeout=400) == EXIT_PREEMPTED, logs[1].read_text()[-4000:]
    assert (interrupted / "checkpoints" / "step_00000003").is_dir(), "the preemption checkpoint is missing"

    third = start()
    assert third.wait(timeout=600) == 0, logs[2].read_text()[-4000:]
    assert "resuming from" in logs[2].read_text() and "step_00000003" in logs[2].read_text()
    assert CheckpointStore(interrupted / "checkpoints").steps() == [3, 4]  # keep_checkpoints=2

    assert [r["step"] for r in _deterministic_rows(interrupted)] == [1, 2, 3, 4]
    assert _deterministic_rows(interrupted) == _deterministic_rows(reference)
    ref_weights, weights = _final_weights(reference), _final_weights(interrupted)
    assert ref_weights.keys() == weights.keys() and ref_weights
    assert all(torch.equal(ref_weights[k], weights[k]) for k in ref_weights)


@pytest.mark.e2e
def test_engine_death_before_the_weight_sync_restarts_the_engine(tmp_path, run_cache_dir):
    """The engine core dies after step 2's rollout (killed from the reward stage): the sync finds it dead, raises
    EngineDied instead of waiting forever on the RPC, and the run goes on with a new engine."""
    run = tmp_path / "run"
    command = qrl_train_command(
        run, run_cache_dir, "trainer.max_steps=3", "reward.fn=fault_rewards:kill_engine_in_step_2",
        "algo.dynamic_sampling=false", "trainer.checkpoint=false",
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "QRL_FAULT_RUN_DIR": str(run)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2: the colocated vLLM engine core died" in result.stdout, result.stdout[-3000:]
    assert "during the weight sync; restarting the engine" in result.stdout
    assert (run / "engine_killed").is_file()
    assert [r["step"] for r in _deterministic_rows(run)] == [1, 2, 3]


@pytest.mark.e2e
def test_consecutive_non_finite_steps_stop_the_run_with_one_line(tmp_path, run_cache_dir):
    command = qrl_train_command(
        tmp_path / "run", run_cache_dir, "trainer.max_steps=4", "reward.fn=fault_rewards:huge_reward",
        "trainer.max_skipped_steps=2", "trainer.save_every=0", "algo.dynamic_sampling=false",
        "trainer.checkpoint=false",
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "qrl-train: stopped: 2 steps in a row had a non-finite loss or gradient" in result.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]  # step 1 skipped and logged; step 2 was the second in a row
    assert rows[0]["updates_skipped"] >= 1 and rows[0]["skipped_in_a_row"] == 1

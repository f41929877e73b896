"""`qrl-launch local`: the tiny recipe for 2 steps through nemo-run's LocalExecutor (torchrun), for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_utils import QUICK, REPO, read_metrics

pytestmark = pytest.mark.e2e

# 2 small steps: what every launcher test trains (tests/test_slurm.py too)
TWO_STEPS = (*QUICK, "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "trainer.max_steps=2")


def qrl_launch() -> str:
    """The installed console script next to this interpreter (pyproject [project.scripts])."""
    script = Path(sys.executable).parent / "qrl-launch"
    assert script.exists(), f"{script} is missing: run `bash scripts/setup_env.sh` (it installs the entry points)"
    return str(script)


def check_two_step_run(run_dir: Path) -> None:
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout_tokens_per_s"] > 0 and r["sync_bytes"] > 0 for r in rows)
    assert {"before", "after"} <= json.loads((run_dir / "eval.json").read_text()).keys()
    assert (run_dir / "final" / "config.json").is_file()


def test_qrl_launch_local_trains_through_nemo_run(tmp_path: Path, run_cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    home = tmp_path / "nemorun"
    env = {**os.environ, "NEMORUN_HOME": str(home)}
    command = [
        qrl_launch(), "local", "configs/tiny_cpu.yaml", f"run.dir={run_dir}", f"run.cache_dir={run_cache_dir}",
        *TWO_STEPS, "--name", "qrl-local-test",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "SUCCEEDED" in output and "learner/0" in output  # nemo-run's job state and its torchrun-prefixed log
    check_two_step_run(run_dir)
    assert any((home / "experiments" / "qrl-local-test").rglob("*")), "nemo-run recorded no experiment"

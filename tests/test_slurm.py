"""The project's Slurm jobs on a real one-node Slurm cluster (tests/slurm_cluster.py, started once per session):
slurm/learner.sbatch submitted with `sbatch --wait`, and `qrl-launch slurm` (nemo-run's SlurmExecutor over a
LocalTunnel) submitting to the same cluster. Both train the tiny model for 2 steps on CPU. The node has no GPUs:
jobs ask for none (`--gpus-per-node=0` / `--no-gpus`) and run one learner rank."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_utils import REPO
from slurm_cluster import PARTITION, SlurmCluster
from test_qrl_launch import TWO_STEPS, check_two_step_run, qrl_launch

from qrl_megatron.utils.net import free_port

pytestmark = pytest.mark.slurm

CONFIG = "configs/tiny_cpu.yaml"


def job_log(tmp_path: Path, pattern: str) -> str:
    logs = sorted(tmp_path.glob(pattern))
    return "\n".join(p.read_text(errors="replace") for p in logs) if logs else f"(no {pattern} in {tmp_path})"


def wait_for_jobs(cluster: SlurmCluster, timeout: float) -> None:
    """Until the cluster has no pending or running job (sbatch without --wait returned at once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not cluster.run("squeue", "-h", "-o", "%i").stdout.strip():
            return
        time.sleep(2)
    raise AssertionError(f"jobs still queued after {timeout:.0f} s:\n{cluster.run('squeue').stdout}")


def test_sbatch_learner_trains_on_slurm(slurm_cluster: SlurmCluster, tmp_path: Path, run_cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    env = {
        **slurm_cluster.env,
        "QRL_PYTHON": sys.executable,
        "QRL_GPUS_PER_NODE": "1",  # one CPU rank: the node has no GPUs to count
        "QRL_MASTER_PORT": str(free_port()),
    }
    command = [
        "sbatch", "--wait", "--gpus-per-node=0", f"--partition={PARTITION}", "--time=00:10:00",
        f"--chdir={REPO}", f"--output={tmp_path}/learner-%j.out",
        "slurm/learner.sbatch", CONFIG, f"run.dir={run_dir}", f"run.cache_dir={run_cache_dir}", *TWO_STEPS,
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    log = job_log(tmp_path, "learner-*.out")
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{log[-6000:]}\n{slurm_cluster.logs()}"
    assert re.search(r"Submitted batch job \d+", proc.stdout)
    assert "on 1 node(s) x 1 GPU(s) = 1 ranks" in log and "torchrun exited with code 0" in log
    check_two_step_run(run_dir)


def test_qrl_launch_slurm_submits_through_nemo_run(
    slurm_cluster: SlurmCluster, tmp_path: Path, run_cache_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    jobs = tmp_path / "jobs"
    env = {**slurm_cluster.env, "NEMORUN_HOME": str(tmp_path / "nemorun-home")}
    command = [
        qrl_launch(), "slurm", CONFIG, f"run.dir={run_dir}", f"run.cache_dir={run_cache_dir}", *TWO_STEPS,
        "--nodes", "1", "--gpus-per-node", "1", "--no-gpus", "--partition", PARTITION, "--time", "00:10:00",
        "--job-dir", str(jobs), "--workdir", str(REPO), "--stall-minutes", "0", "--name", "qrl-slurm-test",
        "--setup", f"export PATH={Path(sys.executable).parent}:$PATH",  # torchrun, as a cluster's module load would
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    script = next(jobs.rglob("*_sbatch.sh"))  # what nemo-run submitted
    assert "#SBATCH --gpus-per-node" not in script.read_text()
    wait_for_jobs(slurm_cluster, timeout=480)
    shown = slurm_cluster.run("scontrol", "show", "job", "-o").stdout
    logs = "\n".join(p.read_text(errors="replace") for p in jobs.rglob("*.out"))
    assert "JobState=COMPLETED" in shown and "ExitCode=0:0" in shown, f"{shown}\n{logs[-6000:]}"
    check_two_step_run(run_dir)

"""The project's Slurm jobs on a real one-node Slurm cluster (tests/slurm_cluster.py, started for the module):
the rollout-server job (slurm/rollout_servers.sbatch: `vllm serve` with the qrl_tcp weight-transfer backend) and
slurm/learner.sbatch (`sbatch --wait`) reading its server list and refitting it over TCP; and `qrl-launch slurm`
(nemo-run's SlurmExecutor over a LocalTunnel; a colocated engine) submitting to the same cluster. Each trains the
tiny model for 2 steps on CPU. The node has no GPUs: jobs ask for none (`--gpus-per-node=0` / `--no-gpus`) and run
one learner rank.

When the session's cache already holds the tiny base and its warm-start (the e2e tests before these build them),
the nemo-run job is submitted first and runs while the sbatch jobs do (the cluster runs them at once); otherwise
they would build it into the same folder at the same time, so it is submitted after."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_utils import REPO, read_metrics
from slurm_cluster import PARTITION, SlurmCluster
from test_qrl_launch import TWO_STEPS, check_two_step_run, qrl_launch

from qrl_megatron.utils.net import free_port

pytestmark = pytest.mark.slurm

CONFIG = "configs/tiny_cpu.yaml"
# 2 steps without the probe and the dist checkpoint: what these tests check is the launch, not those
SLURM_RUN = (*TWO_STEPS, "sync.probe_every=0", "trainer.checkpoint=false")


def warm_start_cached(cache_dir: Path) -> bool:
    """Whether cache_dir holds the base model and warm-start of these runs, keyed as qrl_megatron.train keys them
    (a wrong answer only costs the overlap: the jobs then run one after the other)."""
    from qrl_megatron.config import load_config, to_dict
    from qrl_megatron.learner.warmstart import is_complete, warmstart_dir, warmstart_key
    from qrl_megatron.models.base import prepare_base_model

    cfg = load_config(str(REPO / CONFIG), [f"run.cache_dir={cache_dir}", *SLURM_RUN])
    base_dir = Path(prepare_base_model(cfg.model, cfg.run.cache_dir))  # builds the tiny base here if it is missing
    settings = to_dict(cfg)
    provenance = {"model": settings["model"], "task": settings["task"]}
    key = warmstart_key(cfg.warmstart, cfg.learner.precision, cfg.seed, base_dir, provenance)
    return is_complete(warmstart_dir(cache_dir, key))


@dataclass
class Submission:
    job_id: str
    run_dir: Path
    jobs: Path


def job_log(tmp_path: Path, pattern: str) -> str:
    logs = sorted(tmp_path.glob(pattern))
    return "\n".join(p.read_text(errors="replace") for p in logs) if logs else f"(no {pattern} in {tmp_path})"


def job_active(cluster: SlurmCluster, job_id: str) -> bool:
    shown = cluster.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
    return bool(re.search(r"JobState=(PENDING|RUNNING|CONFIGURING)\b", shown))


def wait_for_job(cluster: SlurmCluster, job_id: str, timeout: float) -> str:
    """The job's final `scontrol show job` line once it has left PENDING/RUNNING (the cluster keeps finished jobs'
    records for MinJobAge=600 s)."""
    deadline = time.monotonic() + timeout
    shown = ""
    while time.monotonic() < deadline:
        shown = cluster.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        if not re.search(r"JobState=(PENDING|RUNNING|CONFIGURING|COMPLETING)\b", shown):
            return shown
        time.sleep(2)
    raise AssertionError(f"job {job_id} not done after {timeout:.0f} s:\n{shown}")


@pytest.fixture(scope="module")
def nemo_run_job(
    slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory, run_cache_dir: Path
) -> Callable[[], Submission]:
    """Submits `qrl-launch slurm ...` once (detached, as the command does) when first called."""
    done: list[Submission] = []

    def submit() -> Submission:
        if done:
            return done[0]
        base = tmp_path_factory.mktemp("nemo-run-slurm")
        run_dir, jobs = base / "run", base / "jobs"
        env = {**slurm_cluster.env, "NEMORUN_HOME": str(base / "nemorun-home")}
        command = [
            qrl_launch(), "slurm", CONFIG, f"run.dir={run_dir}", f"run.cache_dir={run_cache_dir}", *SLURM_RUN,
            "--nodes", "1", "--gpus-per-node", "1", "--no-gpus", "--partition", PARTITION, "--time", "00:10:00",
            "--job-dir", str(jobs), "--workdir", str(REPO), "--stall-minutes", "0", "--name", "qrl-slurm-test",
            "--setup", f"export PATH={Path(sys.executable).parent}:$PATH",  # torchrun, as a module load would
        ]  # fmt: skip
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        # the job nemo-run submitted: its record (nemo-run keeps the Slurm job id next to the job folder)
        queued = slurm_cluster.run("squeue", "-h", "-n", "qrl-learner", "-o", "%i", "--sort=-i").stdout.split()
        assert queued, f"no qrl-learner job queued after qrl-launch slurm:\n{proc.stdout[-3000:]}"
        done.append(Submission(job_id=queued[0], run_dir=run_dir, jobs=jobs))
        return done[0]

    return submit


def test_sbatch_learner_and_rollout_server_jobs_train_over_tcp(
    slurm_cluster: SlurmCluster, nemo_run_job: Callable[[], Submission], tmp_path: Path, run_cache_dir: Path
) -> None:
    """Two jobs that find each other: the server job lists its URL in run.dir/rollout_servers.txt once /health
    answers; the learner job waits for that file (rollout.server_list), streams every step's weights over TCP
    (sync.transport=tcp) and trains 2 steps; then the server job is cancelled."""
    # builds the tiny base here (both jobs' job_info would build it at once); with a warm cache the nemo-run job
    # runs alongside (module docstring)
    if warm_start_cached(run_cache_dir):
        nemo_run_job()
    run_dir = tmp_path / "run"
    servers = run_dir / "rollout_servers.txt"  # the server job's default QRL_SERVERS_FILE
    overrides = [f"run.dir={run_dir}", f"run.cache_dir={run_cache_dir}", *SLURM_RUN, "sync.transport=tcp"]
    learner_only = ["rollout.engine=server", f"rollout.server_list={servers}", "rollout.server_wait_s=240"]
    common = ["--gpus-per-node=0", f"--partition={PARTITION}", "--time=00:10:00", f"--chdir={REPO}"]
    env = {**slurm_cluster.env, "QRL_PYTHON": sys.executable, "QRL_GPUS_PER_NODE": "1"}
    serve_env = {**env, "QRL_VLLM_TP": "1", "QRL_VLLM_PORT": str(free_port()), "QRL_HEALTH_POLL_S": "1"}
    submitted = subprocess.run(
        ["sbatch", "--parsable", *common, f"--output={tmp_path}/servers-%j.out",
         str(REPO / "slurm" / "rollout_servers.sbatch"), CONFIG, *overrides],
        cwd=REPO, env=serve_env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    server_job = submitted.stdout.strip().split(";")[0]
    try:
        learner = subprocess.Popen(
            ["sbatch", "--wait", *common, "--job-name=qrl-learner-tcp", f"--output={tmp_path}/learner-%j.out",
             str(REPO / "slurm" / "learner.sbatch"), CONFIG, *overrides, *learner_only],
            cwd=REPO, env={**env, "QRL_MASTER_PORT": str(free_port())}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 600
        while learner.poll() is None and time.monotonic() < deadline:
            time.sleep(2)
            if not job_active(slurm_cluster, server_job):  # the servers failed: the learner would wait in vain
                slurm_cluster.run("scancel", "--name", "qrl-learner-tcp", check=False)
                break
        try:
            out, err = learner.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            slurm_cluster.run("scancel", "--name", "qrl-learner-tcp", check=False)
            out, err = learner.communicate(timeout=60)
        proc = subprocess.CompletedProcess(learner.args, learner.returncode, out, err)
        learner_log, server_log = job_log(tmp_path, "learner-*.out"), job_log(tmp_path, "servers-*.out")
        detail = f"{proc.stdout}{proc.stderr}\n--- learner\n{learner_log[-5000:]}\n--- servers\n{server_log[-3000:]}"
        assert proc.returncode == 0, detail
        assert "on 1 node(s) x 1 GPU(s) = 1 ranks" in learner_log and "torchrun exited with code 0" in learner_log, (
            detail
        )
        assert "ready: 1 server(s) listed in" in server_log, detail
        # served with the TCP backend, refitted at the start and after each step
        assert "qrl_tcp" in server_log and server_log.count('"POST /update_weights HTTP/1.1" 200') >= 3, detail
        assert f"rollout servers from {servers}: http://localhost:{serve_env['QRL_VLLM_PORT']}" in learner_log, detail
        check_two_step_run(run_dir)
        rows = read_metrics(run_dir)
        assert rows[0]["sync_bytes"] == rows[1]["sync_bytes"] > 0
    finally:
        slurm_cluster.run("scancel", server_job, check=False)
    shown = wait_for_job(slurm_cluster, server_job, timeout=60)
    assert "JobState=CANCELLED" in shown, shown
    assert not servers.exists()  # the server job removes its list when it ends


def test_qrl_launch_slurm_submits_through_nemo_run(
    slurm_cluster: SlurmCluster, nemo_run_job: Callable[[], Submission]
) -> None:
    job = nemo_run_job()
    script = next(job.jobs.rglob("*_sbatch.sh"))  # what nemo-run submitted
    assert "#SBATCH --gpus-per-node" not in script.read_text()
    shown = wait_for_job(slurm_cluster, job.job_id, timeout=480)
    logs = "\n".join(p.read_text(errors="replace") for p in job.jobs.rglob("*.out"))
    assert "JobState=COMPLETED" in shown and "ExitCode=0:0" in shown, f"{shown}\n{logs[-6000:]}"
    check_two_step_run(job.run_dir)

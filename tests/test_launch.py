"""Launchers: the sbatch scripts (rendered, syntax-checked, and run against a fake Slurm), job_info, the nemo-run
local/Slurm builders and the `qrl-launch` dispatcher. No Slurm, GPU or network needed (the real runs:
tests/test_qrl_launch.py, tests/test_slurm.py)."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import job_info
from launch.common import FAILFAST_ENV, REPO_ROOT, load_checked_config, require_nemo_run
from launch.sbatch import render_sbatch, sbatch_options, template_text, watchdog_function
from qrl_megatron.utils.net import free_port

pytestmark = pytest.mark.unit

CONFIG = str(REPO_ROOT / "configs" / "tiny_cpu.yaml")


def bash_syntax_ok(text: str, tmp_path: Path, name: str = "script.sh") -> None:
    path = tmp_path / name
    path.write_text(text)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# --------------------------------------------------------------------------------------------------------------
# rendering


@pytest.mark.parametrize("name", ["learner", "rollout_servers"])
def test_plain_scripts_are_valid_bash_with_defaults(name: str, tmp_path: Path) -> None:
    text = template_text(name)
    bash_syntax_ok(text, tmp_path)
    options = sbatch_options(text)
    assert options["nodes"] == "1" and options["ntasks-per-node"] == "1" and "gpus-per-node" in options
    assert render_sbatch(name) == text  # nothing given: the script unchanged


def test_render_learner(tmp_path: Path) -> None:
    text = render_sbatch(
        "learner",
        config=CONFIG,
        overrides=["learner.tp=4", "learner.dp=2", "run.dir=runs/my run"],
        env={"QRL_STALL_MINUTES": 45, "NCCL_IB_HCA": "mlx5"},
        nodes=2,
        gpus_per_node=4,
        account="acct",
        partition="batch",
        time="01:00:00",
        exclusive=True,
    )
    bash_syntax_ok(text, tmp_path)
    options = sbatch_options(text)
    assert options["nodes"] == "2" and options["gpus-per-node"] == "4" and options["ntasks-per-node"] == "1"
    assert options["account"] == "acct" and options["partition"] == "batch" and options["time"] == "01:00:00"
    assert "exclusive" in options and options["exclusive"] is None
    assert text.count("#SBATCH --nodes=") == 1
    assert f"set -- {shlex.quote(CONFIG)} learner.tp=4 learner.dp=2 'run.dir=runs/my run'; fi" in text
    assert "export QRL_STALL_MINUTES=45" in text and "export NCCL_IB_HCA=mlx5" in text
    # the rendered env comes before the script's defaults, so it wins
    assert text.index("export QRL_STALL_MINUTES=45") < text.index(': "${QRL_STALL_MINUTES:=30}"')
    # fail-fast pieces
    assert "srun --kill-on-bad-exit=1" in text and "--max-restarts=0" in text
    assert '--nnodes="$NNODES" --nproc-per-node="$GPUS"' in text
    assert "scontrol show hostnames" in text and '--rdzv-endpoint="${HEAD}:${QRL_MASTER_PORT}"' in text
    assert 'TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"' in text
    assert 'qrl_watchdog "$QRL_RUN_DIR/metrics.jsonl" "$QRL_STALL_MINUTES"' in text
    for key, value in FAILFAST_ENV.items():  # the nemo-run launchers use the same defaults
        assert f"{key}=" in text and (value in text)


def test_render_learner_checks_the_layout() -> None:
    with pytest.raises(ValueError, match=r"learner\.tp \* learner\.pp \* learner\.dp = 1 \* 1 \* 1 = 1"):
        render_sbatch("learner", config=CONFIG, nodes=2, gpus_per_node=4)
    with pytest.raises(ValueError, match="gpus_per_node"):  # the script's default header: 1 node x 8 GPUs
        render_sbatch("learner", config=CONFIG, overrides=["learner.tp=2"])
    render_sbatch("learner", config=CONFIG, overrides=["learner.tp=2", "learner.dp=4"])  # 1 x 8 = 2 * 4
    render_sbatch("learner", config=CONFIG, validate=False, nodes=3, gpus_per_node=3)


def test_render_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="rollout_servers"):
        render_sbatch("nope")
    with pytest.raises(ValueError, match="whitespace"):
        render_sbatch("learner", job_name="two words")
    with pytest.raises(ValueError, match="not an sbatch option"):
        render_sbatch("learner", **{"Bad_Name": 1})
    with pytest.raises(ValueError, match="overrides need a config"):
        render_sbatch("rollout_servers", overrides=["a=1"])
    text = render_sbatch("learner", gpus_per_node=False)  # False removes an option
    assert "gpus-per-node" not in sbatch_options(text)


def test_render_rollout_servers(tmp_path: Path) -> None:
    text = render_sbatch("rollout_servers", config=CONFIG, overrides=["seed=3"], nodes=3, gpus_per_node=2)
    bash_syntax_ok(text, tmp_path)
    options = sbatch_options(text)
    assert options["nodes"] == "3" and options["gpus-per-node"] == "2"
    assert "srun --kill-on-bad-exit=1" in text and '"${SERVE[@]}" "${QRL_SERVE_ARGS[@]}"' in text
    assert "/health" in text and "QRL_READY_TIMEOUT_S" in text and 'mv "$SERVERS_FILE.tmp.$$" "$SERVERS_FILE"' in text


def test_sbatch_cli_writes_a_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.sbatch import main

    out = tmp_path / "job.sbatch"
    args = ["learner", CONFIG, "learner.dp=2", "--nodes", "1", "--gpus-per-node", "2", "-A", "a", "-o", str(out)]
    assert main([*args, "--sbatch", "qos=high", "--sbatch", "exclusive"]) == 0
    options = sbatch_options(out.read_text())
    assert options["qos"] == "high" and options["account"] == "a" and "exclusive" in options
    assert os.access(out, os.X_OK)
    assert main(["learner", CONFIG, "--nodes", "2", "--gpus-per-node", "2"]) == 2
    assert "learner.tp" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# the scripts, run against a fake Slurm (srun runs its command locally; scontrol lists fake hosts)

FAKE_SRUN = """#!/bin/bash
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
exec "$@"
"""

FAKE_PYTHON = """#!/bin/bash
echo "$*" >>"$FAKE_LOG"
if [[ $2 == launch.job_info ]]; then
  printf 'QRL_RUN_DIR=%q\\nQRL_WORLD_SIZE=4\\nQRL_MODEL_DIR=/models/m\\nQRL_SERVE_ARGS=(/models/m --dtype bfloat16)\\n' "$FAKE_RUN_DIR"
  exit 0
fi
case $FAKE_MODE in
  ok) echo '{"step": 1}' >"$FAKE_RUN_DIR/metrics.jsonl"; exit 0 ;;
  fail) exit 3 ;;
  stall) echo '{"step": 1}' >"$FAKE_RUN_DIR/metrics.jsonl"; exec sleep 60 ;;
  badconfig) exit 2 ;;
esac
"""


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "srun", FAKE_SRUN)
    write_exe(bin_dir / "scontrol", '#!/bin/bash\nprintf "%s\\n" ${FAKE_HOSTS:-node-a node-b}\n')
    write_exe(bin_dir / "scancel", '#!/bin/bash\necho "scancel $*" >>"$FAKE_LOG"\n')
    python = write_exe(bin_dir / "fakepython", FAKE_PYTHON)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "QRL_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_GPUS_PER_NODE="h100:2",
        SLURM_JOB_ID="4242",
        QRL_PYTHON=str(python),
        FAKE_LOG=str(tmp_path / "calls.log"),
        FAKE_RUN_DIR=str(run_dir),
    )
    return env


def run_script(name: str, env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    script = REPO_ROOT / "slurm" / f"{name}.sbatch"
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_learner_script_runs_torchrun_on_every_node(fake_slurm: dict[str, str], tmp_path: Path) -> None:
    proc = run_script("learner", {**fake_slurm, "FAKE_MODE": "ok"}, "configs/x.yaml", "learner.tp=4", "run.dir=a b")
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[0] == "-m launch.job_info prepare --nodes 2 --gpus-per-node 2 configs/x.yaml learner.tp=4 run.dir=a b"
    torchrun = calls[1]
    assert torchrun.startswith("-m torch.distributed.run --nnodes=2 --nproc-per-node=2 ")
    assert "--rdzv-endpoint=node-a:29500" in torchrun and "--rdzv-id=qrl-4242" in torchrun
    assert "--max-restarts=0" in torchrun
    assert torchrun.endswith("--module qrl_megatron.cli configs/x.yaml learner.tp=4 run.dir=a b")
    assert "torchrun exited with code 0" in proc.stdout


def test_learner_script_passes_failures_on(fake_slurm: dict[str, str]) -> None:
    proc = run_script("learner", {**fake_slurm, "FAKE_MODE": "fail"}, "configs/x.yaml")
    assert proc.returncode == 3 and "torchrun exited with code 3" in proc.stdout
    proc = run_script("learner", fake_slurm)
    assert proc.returncode == 2 and "usage:" in proc.stderr
    env = {k: v for k, v in fake_slurm.items() if k != "SLURM_GPUS_PER_NODE"}
    proc = run_script("learner", env, "configs/x.yaml")
    assert proc.returncode == 2 and "--gpus-per-node" in proc.stderr


def test_learner_script_stops_at_a_bad_config(fake_slurm: dict[str, str], tmp_path: Path) -> None:
    fake = Path(fake_slurm["QRL_PYTHON"])
    fake.write_text(fake.read_text().replace("exit 0\nfi", "exit 2\nfi", 1))  # job_info fails
    proc = run_script("learner", {**fake_slurm, "FAKE_MODE": "ok"}, "configs/x.yaml")
    assert proc.returncode == 2 and "config check failed" in proc.stderr
    assert len((tmp_path / "calls.log").read_text().splitlines()) == 1  # torchrun never started


def test_learner_watchdog_ends_a_stalled_run(fake_slurm: dict[str, str], tmp_path: Path) -> None:
    env = {
        **fake_slurm,
        "FAKE_MODE": "stall",
        "QRL_STALL_MINUTES": "2",
        "QRL_WATCHDOG_MINUTE_S": "1",
        "QRL_WATCHDOG_POLL_S": "0.5",
    }
    start = time.monotonic()
    proc = run_script("learner", env, "configs/x.yaml", timeout=30)
    assert time.monotonic() - start < 20  # the fake run would sleep 60 s
    assert proc.returncode == 143, proc.stderr  # srun (here: the sleeping fake torchrun) got SIGTERM
    assert "[qrl-watchdog]" in proc.stderr and "metrics.jsonl not updated" in proc.stderr
    assert "stalled" in (tmp_path / "run" / "watchdog.log").read_text()


WATCHDOG_DRIVER = """
set -u
{function}
export QRL_WATCHDOG_MINUTE_S=1 QRL_WATCHDOG_POLL_S=0.3
file=$1
case $2 in
  old) touch -d '-2 hours' "$file" ;;
  fresh) echo x >"$file" ;;
esac
sleep 3 & target=$!
( qrl_watchdog "$file" "$3" "$4" "$target" ) & wd=$!
wait "$target"; echo "target=$?"
wait "$wd"; echo "watchdog=$?"
"""


@pytest.mark.parametrize(
    ("file", "stall", "startup", "fires"),
    [
        ("absent", 1, 100, None),  # not written yet: the startup limit applies
        ("old", 1, 100, None),  # an earlier run's file is not a stall of this one
        ("absent", 100, 1, "not written"),
        ("fresh", 1, 100, "not updated"),
    ],
)
def test_watchdog_function(file: str, stall: int, startup: int, fires: str | None, tmp_path: Path) -> None:
    """Limits in seconds here (QRL_WATCHDOG_MINUTE_S=1); the target would run 3 s."""
    driver = tmp_path / "driver.sh"
    driver.write_text(WATCHDOG_DRIVER.format(function=watchdog_function()))
    metrics = tmp_path / "metrics.jsonl"
    proc = subprocess.run(
        ["bash", str(driver), str(metrics), file, str(stall), str(startup)], capture_output=True, text=True, timeout=30
    )
    if fires is None:
        assert "target=0" in proc.stdout and "watchdog=0" in proc.stdout, proc.stdout + proc.stderr
        assert "[qrl-watchdog]" not in proc.stderr
    else:
        assert "target=143" in proc.stdout and "watchdog=1" in proc.stdout, proc.stdout + proc.stderr
        assert f"metrics.jsonl {fires}" in proc.stderr and "job ? stalled" in proc.stderr
        assert (tmp_path / "watchdog.log").read_text().count("[qrl-watchdog]") == 1


FAKE_SERVER = f"""#!{sys.executable}
import http.server, os, sys, threading, time
mode, port = os.environ["FAKE_MODE"], int(sys.argv[sys.argv.index("--port") + 1])
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if mode == "die":
    sys.exit(4)
if mode == "hang":
    time.sleep(60)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), H)
threading.Timer(float(os.environ.get("FAKE_SERVE_S", "3")), server.shutdown).start()
server.serve_forever()
"""


@pytest.fixture
def fake_rollout(fake_slurm: dict[str, str], tmp_path: Path) -> dict[str, str]:
    vllm = write_exe(tmp_path / "bin" / "fakevllm", FAKE_SERVER)
    return {
        **fake_slurm,
        "SLURM_NNODES": "1",
        "FAKE_HOSTS": "localhost",
        "QRL_VLLM": str(vllm),
        "QRL_VLLM_PORT": str(free_port()),
        "QRL_HEALTH_POLL_S": "0.2",
    }


def test_rollout_script_announces_healthy_servers(fake_rollout: dict[str, str], tmp_path: Path) -> None:
    servers = tmp_path / "run" / "rollout_servers.txt"
    proc = subprocess.Popen(
        ["bash", str(REPO_ROOT / "slurm" / "rollout_servers.sbatch"), "configs/x.yaml", "seed=1"],
        env={**fake_rollout, "FAKE_MODE": "ok"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    listed = ""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None and not listed:
        listed = servers.read_text() if servers.exists() else ""
        time.sleep(0.1)
    out, err = proc.communicate(timeout=30)
    port = fake_rollout["QRL_VLLM_PORT"]
    assert listed == f"http://localhost:{port}\n", out + err
    assert proc.returncode == 0 and "ready: 1 server(s)" in out
    assert not servers.exists()  # removed when the servers are gone
    serve = (tmp_path / "calls.log").read_text().splitlines()[-1]
    assert serve.startswith("serve /models/m --dtype bfloat16 --host 0.0.0.0 --port")
    assert "--tensor-parallel-size 2" in serve


@pytest.mark.parametrize(
    ("mode", "ready_timeout", "message"),
    [("die", 20, "exited (code 4) before all were ready"), ("hang", 1, "not healthy after 1 s: localhost")],
)
def test_rollout_script_fails_loudly(
    mode: str, ready_timeout: int, message: str, fake_rollout: dict[str, str], tmp_path: Path
) -> None:
    start = time.monotonic()
    env = {**fake_rollout, "FAKE_MODE": mode, "QRL_READY_TIMEOUT_S": str(ready_timeout)}
    proc = run_script("rollout_servers", env, "configs/x.yaml", timeout=30)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert time.monotonic() - start < 15
    assert not (tmp_path / "run" / "rollout_servers.txt").exists()


# --------------------------------------------------------------------------------------------------------------
# job_info and the layout check (no nemo-run needed)


def test_layout_check_names_the_keys() -> None:
    cfg = load_checked_config(CONFIG, ["learner.tp=2", "learner.pp=2"], nodes=1, gpus_per_node=4)
    assert cfg.learner.world_size == 4
    with pytest.raises(
        ValueError, match=r"nodes \* gpus_per_node = 2 \* 4 = 8.*learner\.tp \* learner\.pp \* learner\.dp"
    ):
        load_checked_config(CONFIG, ["learner.tp=2"], nodes=2, gpus_per_node=4)
    with pytest.raises(ValueError, match="learner.tpp"):  # config errors are ValueErrors too
        load_checked_config(CONFIG, ["learner.tpp=2"])


def test_job_info_prepare_prints_shell(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import qrl_megatron.models.base as base

    monkeypatch.setattr(base, "prepare_base_model", lambda model, cache_dir: tmp_path / "my model")
    run_dir = tmp_path / "runs" / "x"
    argv = ["prepare", "--nodes", "1", "--gpus-per-node", "2", CONFIG, "learner.dp=2", f"run.dir={run_dir}", "seed=7"]
    assert job_info.main(argv) == 0
    shell = capsys.readouterr().out
    script = shell + 'printf "%s\\n" "$QRL_RUN_DIR" "$QRL_WORLD_SIZE" "$QRL_MODEL_DIR" "${QRL_SERVE_ARGS[@]}"'
    lines = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    model = str(tmp_path / "my model")
    assert lines[:3] == [str(run_dir), "2", model]
    assert lines[3:] == job_info.vllm_serve_args(load_checked_config(CONFIG, ["seed=7"]), model)
    assert lines[3] == model and "--seed" in lines and lines[lines.index("--seed") + 1] == "7"
    assert "processed_logprobs" in lines and job_info.WORKER_EXTENSION in lines

    assert job_info.main(["prepare", "--nodes", "2", "--gpus-per-node", "2", CONFIG]) == 2
    assert "learner.tp" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# nemo-run


def test_missing_nemo_run_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nemo_run", None)  # `import nemo_run` raises ImportError
    with pytest.raises(ImportError, match="scripts/setup_env.sh"):
        require_nemo_run()


def test_slurm_layout_error_before_nemo_run(capsys: pytest.CaptureFixture[str]) -> None:
    from launch.slurm import build_slurm_experiment, main

    with pytest.raises(ValueError, match=r"learner\.tp \* learner\.pp \* learner\.dp"):
        build_slurm_experiment(CONFIG, ["learner.tp=2"], nodes=2, gpus_per_node=4)
    assert main([CONFIG, "learner.tp=2", "--nodes", "2", "--gpus-per-node", "4", "--dryrun"]) == 2
    assert "learner.tp" in capsys.readouterr().err


def test_local_experiment_uses_torchrun() -> None:
    require_nemo_run()  # part of the default set-up: a missing nemo-run fails here, naming the install command
    from launch.local import build_local_experiment

    task, executor = build_local_experiment(CONFIG, ["learner.tp=2", "learner.dp=2"], env_vars={"OMP_NUM_THREADS": "1"})
    assert executor.launcher == "torchrun" and executor.ntasks_per_node == 4 and executor.nodes == 1
    assert executor.env_vars["OMP_NUM_THREADS"] == "1"
    assert executor.env_vars["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert task.path == "qrl_megatron.cli" and task.m and task.entrypoint == "python"
    assert task.args == [CONFIG, "learner.tp=2", "learner.dp=2"]


@pytest.fixture
def nemorun_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    require_nemo_run()
    import nemo_run.config

    home = tmp_path / "nemorun-home"
    monkeypatch.setenv("NEMORUN_HOME", str(home))
    monkeypatch.setattr(nemo_run.config, "_NEMORUN_HOME", str(home))  # read once at import
    return home


def test_slurm_dryrun_renders_sbatch(nemorun_home: Path, tmp_path: Path) -> None:
    from launch.slurm import build_slurm_experiment, render_dryrun

    task, executor = build_slurm_experiment(
        CONFIG,
        ["learner.tp=4", "learner.dp=2", "run.dir=runs/slurm-test"],
        nodes=2,
        gpus_per_node=4,
        account="acct",
        partition="part",
        time="02:00:00",
        env_vars={"NCCL_DEBUG": "WARN"},
        job_dir=tmp_path / "jobs",
        workdir=REPO_ROOT,
        setup=["source .venv/bin/activate"],
    )
    script = render_dryrun(task, executor, "qrl-test", out_dir=tmp_path / "out")
    assert script.parent == tmp_path / "out" and script.name.endswith("_sbatch.sh")
    # rendered under job_dir/experiments, where its LocalTunnel would submit it from; nothing submitted
    assert next((tmp_path / "jobs" / "experiments" / "qrl-test").rglob("*_sbatch.sh"))
    assert not nemorun_home.exists()
    text = script.read_text()
    bash_syntax_ok(text, tmp_path)
    options = sbatch_options(text)
    assert options["nodes"] == "2" and options["gpus-per-node"] == "4" and options["ntasks-per-node"] == "1"
    assert options["account"] == "acct" and options["partition"] == "part" and options["time"] == "02:00:00"
    assert options["job-name"] == "qrl-learner"
    srun = next(line for line in text.splitlines() if line.startswith("srun --output"))
    assert "--kill-on-bad-exit=1" in srun and f"--chdir={REPO_ROOT}" in srun
    assert "torchrun" in srun and "--nnodes 2" in srun and "--nproc-per-node 4" in srun
    assert srun.endswith(f"-m qrl_megatron.cli {CONFIG} learner.tp=4 learner.dp=2 run.dir=runs/slurm-test")
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in text and "export NCCL_DEBUG=WARN" in text
    assert text.index("source .venv/bin/activate") < text.index("qrl_watchdog()") < text.index(srun)
    assert f"qrl_watchdog {REPO_ROOT}/runs/slurm-test/metrics.jsonl 30 60 ) &" in text


def test_slurm_experiment_options(nemorun_home: Path, tmp_path: Path) -> None:
    from launch.slurm import build_slurm_experiment

    _, executor = build_slurm_experiment(
        CONFIG, [], nodes=1, gpus_per_node=1, container_image="img:1", workdir=tmp_path, stall_minutes=0
    )
    assert executor.container_image == "img:1" and f"{tmp_path}:{tmp_path}" in executor.container_mounts
    assert executor.srun_args == [f"--container-workdir={tmp_path}"] and not executor.setup_lines
    assert executor.gpus_per_node == 1
    _, executor = build_slurm_experiment(CONFIG, ["learner.dp=2"], nodes=1, gpus_per_node=2, request_gpus=False)
    assert executor.gpus_per_node is None and executor.ntasks_per_node == 2  # CPU nodes: 2 ranks, no GPU request
    with pytest.raises(ValueError, match="/nemo_run"):  # nemo-run rewrites that string in the script
        build_slurm_experiment(CONFIG, [], nodes=1, gpus_per_node=1, job_dir=tmp_path / "nemo_run")


def test_vllm_serve_accepts_the_arguments() -> None:
    """The installed vLLM's own `serve` parser takes what the rollout script passes."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    model, *rest = job_info.vllm_serve_args(load_checked_config(CONFIG, ["seed=5"]), "/models/m")
    tail = ["--host", "0.0.0.0", "--port", "8000", "--tensor-parallel-size", "2"]
    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", model, *rest, *tail])
    assert ns.model == "/models/m" and ns.seed == 5 and ns.logprobs_mode == "processed_logprobs"
    assert ns.worker_extension_cls == job_info.WORKER_EXTENSION and ns.tensor_parallel_size == 2


def test_qrl_launch_dispatches(nemorun_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.cli import main

    assert main([]) == 2 and "qrl-launch {local,slurm}" in capsys.readouterr().out
    assert main(["nope"]) == 2 and "unknown subcommand 'nope'" in capsys.readouterr().err
    assert main(["local", CONFIG, "learner.dp=2", "--dryrun"]) == 0  # launch.local's own arguments
    assert "torchrun" in capsys.readouterr().out
    assert main(["slurm", CONFIG, "--nodes", "2", "--gpus-per-node", "1", "--dryrun"]) == 2  # launch.slurm's checks
    assert "learner.tp" in capsys.readouterr().err

"""nemo-run launcher for Slurm: the learner on NODES x GPUS ranks, submitted from a login node.

    python -m launch.slurm configs/x.yaml learner.tp=4 learner.pp=2 learner.dp=2 \\
        --nodes 2 --gpus-per-node 8 --account A --partition P [--time 04:00:00] [--container-image IMG] \\
        [--env NAME=VALUE ...] [--dryrun [--out DIR]]

nemo-run's `SlurmExecutor` with a `LocalTunnel` (run this on a machine with `sbatch`, or with --dryrun anywhere:
the sbatch script is rendered offline and copied to --out). The task is `python -m qrl_megatron.cli CONFIG ...`
under torchrun (one agent per node, GPUS ranks each, c10d rendezvous on the first node); srun carries
`--kill-on-bad-exit=1`, the fail-fast environment of launch.common is set, and the setup block starts the same
metrics watchdog as slurm/learner.sbatch. Paths are those of the submitting machine: run this from the repository
on a filesystem the nodes share (--workdir, default: the current directory).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from launch.common import FAILFAST_ENV, cli_args, load_checked_config, parse_env, require_nemo_run
from launch.sbatch import watchdog_function

CLI_MODULE = "qrl_megatron.cli"


def watchdog_setup_lines(metrics_file: str | Path, stall_minutes: int, startup_minutes: int) -> str:
    """Bash for the sbatch setup block: start `qrl_watchdog` in the background (it scancels the job when
    metrics_file stalls). Empty when stall_minutes is 0."""
    if stall_minutes <= 0:
        return ""
    call = f"qrl_watchdog {shlex.quote(str(metrics_file))} {int(stall_minutes)} {int(startup_minutes)}"
    return f"{watchdog_function()}( set +xv; {call} ) &\n"


def build_slurm_experiment(
    config_path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    nodes: int,
    gpus_per_node: int,
    account: str | None = None,
    partition: str | None = None,
    time: str = "04:00:00",
    container_image: str | None = None,
    container_mounts: Sequence[str] = (),
    env_vars: Mapping[str, str] | None = None,
    job_dir: str | Path | None = None,
    workdir: str | Path | None = None,
    stall_minutes: int = 30,
    startup_minutes: int = 60,
    setup: Sequence[str] = (),
    job_name_prefix: str = "qrl-",
    request_gpus: bool = True,
) -> tuple[Any, Any]:
    """(task, executor) for the learner on Slurm; nothing is submitted.

    setup: bash lines run first in the batch script (e.g. "source .venv/bin/activate", module loads); torchrun
    must be on PATH after them (or inside container_image).
    request_gpus=False: CPU nodes; no `--gpus-per-node` in the job, gpus_per_node is then the ranks per node.
    Raises ValueError when nodes * gpus_per_node != learner.tp*pp*dp (or the config is invalid), ImportError
    naming the install command when nemo-run is missing.
    """
    cfg = load_checked_config(config_path, overrides, nodes, gpus_per_node)
    run = require_nemo_run()
    work = Path(workdir).resolve() if workdir is not None else Path.cwd()
    config_abs = None if config_path is None else Path(config_path).resolve()
    task = run.Script(path=CLI_MODULE, args=cli_args(config_abs, overrides), m=True, entrypoint="python")

    # Jobs run in `work` (shared filesystem), not in nemo-run's per-job code folder, so relative run.dir and
    # run.cache_dir land where `qrl-train` would put them. Later srun options win over nemo-run's own.
    if container_image:
        srun_args = [f"--container-workdir={work}"]
        mounts = [*container_mounts, f"{work}:{work}"]
    else:
        srun_args = [f"--chdir={work}"]
        mounts = list(container_mounts)
    metrics = work / cfg.run.dir / "metrics.jsonl"
    jobs = Path(job_dir).resolve() if job_dir else work / "runs" / "slurm_jobs"
    if not container_image:
        # nemo-run 0.11.1 replaces every "/nemo_run" in a container-less sbatch script by the job folder
        for label, path in (("workdir", work), ("job_dir", jobs), ("config", config_abs), ("run.dir", metrics)):
            if path is not None and "/nemo_run" in str(path):
                raise ValueError(
                    f"{label} {path} contains '/nemo_run', which nemo-run 0.11.1 rewrites in the sbatch script; "
                    "use another folder name"
                )
    executor = run.SlurmExecutor(
        account=account,
        partition=partition,
        nodes=nodes,
        ntasks_per_node=gpus_per_node,
        gpus_per_node=gpus_per_node if request_gpus else None,
        time=time,
        container_image=container_image,
        container_mounts=mounts,
        env_vars={**FAILFAST_ENV, **(env_vars or {})},
        srun_args=srun_args,
        setup_lines="".join(f"{line}\n" for line in setup)
        + watchdog_setup_lines(metrics, stall_minutes, startup_minutes)
        or None,
        job_name_prefix=job_name_prefix,
        # A LocalTunnel submits the script from its job_dir, which nemo-run never copies to: it must be the
        # experiments folder the Experiment writes (experiment_base_dir), so both sit under `jobs`.
        tunnel=run.LocalTunnel(job_dir=str(jobs / "experiments")),
        packager=run.Packager(),
    )
    executor.launcher = "torchrun"  # nemo-run: one task per node, torchrun --nproc-per-node=gpus_per_node
    return task, executor


def experiment_base_dir(executor: Any) -> str:
    """`base_dir` of the nemo-run Experiment for this executor: the folder whose experiments/ its LocalTunnel
    submits from (nemo-run's own default, NEMORUN_HOME, would leave the tunnel without the sbatch script)."""
    return str(Path(executor.tunnel.job_dir).parent)


def render_dryrun(task: Any, executor: Any, title: str = "qrl-slurm", out_dir: str | Path | None = None) -> Path:
    """Render the sbatch script offline (nemo-run dryrun; nothing is submitted) and return its path, under
    JOB_DIR/experiments/<title>/... (build_slurm_experiment's job_dir), or copied into out_dir when given."""
    run = require_nemo_run()
    saved_stdin = sys.stdin
    # nemo-run runs `mkdir` through invoke, which mirrors stdin; a dry run needs none (and pytest forbids reading it)
    with open(os.devnull) as devnull:
        sys.stdin = devnull
        try:
            with run.Experiment(title, executor=executor, base_dir=experiment_base_dir(executor)) as exp:
                exp.add(task, name="learner")
                exp.dryrun(log=False, delete_exp_dir=False)
                exp_dir = Path(exp._exp_dir)
        finally:
            sys.stdin = saved_stdin
    scripts = sorted(exp_dir.glob("*_sbatch.sh"))
    if not scripts:
        raise RuntimeError(f"nemo-run dryrun wrote no *_sbatch.sh under {exp_dir}")
    script = scripts[0]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        script = Path(shutil.copy2(script, out / script.name))
    return script


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.slurm",
        description="Submit the qrl learner to Slurm through nemo-run (or render the sbatch script with --dryrun).",
    )
    p.add_argument("config", help="YAML recipe (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. learner.tp=4")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--account", "-A")
    p.add_argument("--partition", "-p")
    p.add_argument("--time", "-t", default="04:00:00", help="wall-clock limit (default 04:00:00)")
    p.add_argument("--container-image", help="run inside this container (pyxis/enroot)")
    p.add_argument("--container-mount", action="append", default=[], metavar="SRC:DST")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment variable")
    p.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help='bash line run first, e.g. "source .venv/bin/activate"',
    )
    p.add_argument(
        "--job-dir",
        help="nemo-run's folder for this job: sbatch script, logs, experiment record under JOB_DIR/experiments "
        "(default: runs/slurm_jobs; `NEMORUN_HOME=JOB_DIR nemo experiment status ...` reads it)",
    )
    p.add_argument("--workdir", help="directory the job runs in (default: current directory; shared filesystem)")
    p.add_argument("--stall-minutes", type=int, default=30, help="watchdog limit between metrics lines (0 = off)")
    p.add_argument("--startup-minutes", type=int, default=60, help="watchdog limit for the first metrics line")
    p.add_argument(
        "--no-gpus",
        action="store_true",
        help="CPU nodes: request no GPUs from Slurm; --gpus-per-node is then the ranks per node",
    )
    p.add_argument("--name", default="qrl-slurm", help="nemo-run experiment title")
    p.add_argument("--dryrun", action="store_true", help="render the sbatch script offline, submit nothing")
    p.add_argument("--out", help="with --dryrun: copy the rendered script into this folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(None if argv is None else list(argv))
    try:
        task, executor = build_slurm_experiment(
            args.config,
            args.overrides,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            account=args.account,
            partition=args.partition,
            time=args.time,
            container_image=args.container_image,
            container_mounts=args.container_mount,
            env_vars=parse_env(args.env),
            job_dir=args.job_dir,
            workdir=args.workdir,
            stall_minutes=args.stall_minutes,
            startup_minutes=args.startup_minutes,
            setup=args.setup,
            request_gpus=not args.no_gpus,
        )
    except (ValueError, ImportError) as err:
        print(f"launch.slurm: {err}", file=sys.stderr)
        return 2
    if args.dryrun:
        path = render_dryrun(task, executor, args.name, args.out)
        print(path.read_text(), end="")
        print(f"launch.slurm: sbatch script rendered to {path} (nothing submitted)", file=sys.stderr)
        return 0
    run = require_nemo_run()
    with run.Experiment(args.name, executor=executor, base_dir=experiment_base_dir(executor)) as exp:
        exp.add(task, name="learner")
        exp.run(detach=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

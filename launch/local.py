"""nemo-run launcher for one machine: `python -m qrl_megatron.cli CONFIG overrides...` under torchrun.

    python -m launch.local configs/tiny_cpu.yaml learner.tp=2 [--dryrun] [--env NAME=VALUE ...]

The executor is nemo-run's `LocalExecutor(launcher="torchrun")` with one process per learner rank
(learner.tp * learner.pp * learner.dp); the CLI sees RANK/WORLD_SIZE and trains in place instead of starting
its own processes. Plain `qrl-train CONFIG ...` does the same without nemo-run; this entry point is for people who
drive their runs with nemo-run experiments (logs and metadata under NEMORUN_HOME, default ~/.nemo_run).
Also `qrl-launch local ...`. nemo-run is in the default set-up (launch.common.NEMO_RUN_INSTALL).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from launch.common import FAILFAST_ENV, cli_args, load_checked_config, parse_env, require_nemo_run

CLI_MODULE = "qrl_megatron.cli"


def build_local_experiment(
    config_path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    env_vars: Mapping[str, str] | None = None,
) -> tuple[Any, Any]:
    """(task, executor): a `nemo_run.Script` running the qrl CLI, and a torchrun `LocalExecutor` with one process
    per learner rank. Nothing runs; the config is loaded and validated (ConfigError names a bad key)."""
    cfg = load_checked_config(config_path, overrides)
    run = require_nemo_run()
    task = run.Script(path=CLI_MODULE, args=cli_args(config_path, overrides), m=True, entrypoint="python")
    env = {**FAILFAST_ENV, **(env_vars or {})}
    executor = run.LocalExecutor(launcher="torchrun", ntasks_per_node=cfg.learner.world_size, env_vars=env)
    return task, executor


def _ensure_torchrun_on_path() -> None:
    """nemo-run starts `torchrun` from PATH; a venv's interpreter run by full path does not put it there."""
    bin_dir = Path(sys.executable).parent
    if shutil.which("torchrun") is None and (bin_dir / "torchrun").exists():
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.local",
        description="Run qrl-train on this machine through nemo-run (LocalExecutor, torchrun).",
        epilog="example: python -m launch.local configs/tiny_cpu.yaml learner.tp=2 trainer.max_steps=3 --dryrun",
    )
    p.add_argument("config", help="YAML recipe (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. learner.tp=2")
    p.add_argument("--dryrun", action="store_true", help="print the torchrun command nemo-run would start, run nothing")
    p.add_argument("--name", default="qrl-local", help="nemo-run experiment title (default: qrl-local)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment variable")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(None if argv is None else list(argv))
    try:
        task, executor = build_local_experiment(args.config, args.overrides, env_vars=parse_env(args.env))
    except (ValueError, ImportError) as err:
        print(f"launch.local: {err}", file=sys.stderr)
        return 2
    run = require_nemo_run()
    if not args.dryrun:
        from qrl_megatron.models.base import prepare_base_model

        # as `qrl-train` does before it starts its ranks: build/download the base model once, so ranks never race
        cfg = load_checked_config(args.config, args.overrides)
        prepare_base_model(cfg.model, cfg.run.cache_dir)
        _ensure_torchrun_on_path()
    with run.Experiment(args.name, executor=executor) as exp:
        exp.add(task, name="learner", tail_logs=True)
        if args.dryrun:
            exp.dryrun()
            return 0
        exp.run(sequential=True, tail_logs=True)
    # a local experiment waits for its job when the `with` block closes; the state is known only after that
    states = [str(getattr(job, "state", "UNKNOWN")) for job in exp.jobs]
    ok = all(s.endswith("SUCCEEDED") for s in states)
    if not ok:
        print(f"launch.local: learner job ended in state {', '.join(states)}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

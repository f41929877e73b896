"""`qrl-train CONFIG [key=value ...]`: merge, validate, start the learner processes, train.

With TP×PP×DP > 1 and no launcher around it, the command starts the processes itself through torchrun's
elastic launcher (one machine, loopback rendezvous), so `qrl-train configs/x.yaml learner.tp=2` works on a laptop.
Config errors are one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from qrl_megatron.config import ConfigError, describe, load_config, to_yaml
from qrl_megatron.train_config import RunConfig, TrainerConfig

EXIT_CONFIG_ERROR = 2
# The recipes shipped with the code (an editable install runs from the repository, so this is its configs/).
RECIPES_DIR = Path(__file__).resolve().parents[1] / "configs"


def recipes(folder: Path = RECIPES_DIR) -> list[tuple[Path, str, str]]:
    """(recipe, what it is, hardware) for every ``*.yaml`` in ``folder``: the first header comment line and the
    ``# Hardware:`` line of each recipe's header (empty when it has none)."""
    rows = []
    for path in sorted(folder.glob("*.yaml")):
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line.lstrip("# ").strip())
        hardware = next((h.removeprefix("Hardware:").strip() for h in header if h.startswith("Hardware:")), "")
        rows.append((path, header[0] if header else "", hardware))
    return rows


def _print_help_config() -> None:
    for key, default, text in describe():
        print(f"{key:38s} {default!r:24s} {text}")
    rows = recipes()
    if rows:
        print(f"\nrecipes ({RECIPES_DIR}): qrl-train configs/NAME.yaml [key=value ...]")
        for path, what, hardware in rows:
            print(f"  {path.name:30s} {what}" + (f" [{hardware}]" if hardware else ""))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrl-train",
        description="RL with verifiable rewards: quantized vLLM rollouts, Megatron-core learner.",
        epilog="example: qrl-train configs/tiny_cpu.yaml learner.tp=2 trainer.max_steps=3 run.dir=runs/tp2-check",
    )
    parser.add_argument("config", nargs="?", help="YAML recipe (configs/*.yaml); omitted: built-in defaults")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. rollout.temperature=0.8")
    parser.add_argument("--print-config", action="store_true", help="print the merged, validated config and exit")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default and doc")
    return parser


def _split_args(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    # `qrl-train learner.tp=2` (no recipe): the first positional is an override, not a file
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def _prepare_run_dir(run: RunConfig, trainer: TrainerConfig) -> None:
    """Never mix two runs' metrics in one folder and never delete one: continue it (a resumable checkpoint and
    ``trainer.resume`` not ``never``), or archive the old run, or refuse."""
    from qrl_megatron.learner.resume import CheckpointStore

    run_dir = Path(run.dir)
    if trainer.resume not in ("auto", "never") and not Path(trainer.resume).is_dir():
        raise ConfigError(
            f"trainer.resume={trainer.resume!r}: no such checkpoint folder; use 'auto', 'never' or a step_<N> path"
        )
    from qrl_megatron.rollout.servers import SERVER_JOB_ENTRIES

    earlier = [p for p in run_dir.iterdir() if p.name not in SERVER_JOB_ENTRIES] if run_dir.exists() else []
    if not earlier:
        return
    resuming_here = trainer.resume == "auto" and CheckpointStore(run_dir / "checkpoints").steps()
    if resuming_here or (
        trainer.resume != "never" and Path(trainer.resume).resolve().is_relative_to(run_dir.resolve())
    ):
        return  # the run continues in its own folder
    if run.on_existing == "error":
        raise ConfigError(
            f"run.dir={run.dir!r} already holds a run; choose another run.dir or set run.on_existing=archive"
        )
    archived = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    if len(earlier) == len(list(run_dir.iterdir())):
        run_dir.rename(archived)
    else:  # the rollout-server job's entries stay where its servers read them
        archived.mkdir()
        for entry in earlier:
            entry.rename(archived / entry.name)
    print(f"qrl-train: moved the earlier run in {run_dir} to {archived}", file=sys.stderr)


def _launch_workers(world_size: int, argv: list[str]) -> int:
    """Run this same command in tp*pp*dp processes via torchrun's launcher; rank 0's output is shown."""
    from torch.distributed.run import get_args_parser, run

    launcher_args = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc-per-node={world_size}",
            "--local-ranks-filter=0",
            "--module",
            "qrl_megatron.cli",
            *argv,
        ]
    )
    from qrl_megatron.learner.resume import EXIT_PREEMPTED

    try:
        run(launcher_args)
    except Exception as err:  # torchrun's ChildFailedError already printed the failing rank's traceback
        codes = {failure.exitcode for failure in getattr(err, "failures", {}).values()}
        if codes == {EXIT_PREEMPTED}:  # every rank stopped cleanly at a checkpoint: pass the requeue status on
            return EXIT_PREEMPTED
        print(f"qrl-train: a learner process failed: {type(err).__name__}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.help_config:
        _print_help_config()
        return 0
    path, overrides = _split_args(args)
    try:
        cfg = load_config(path, overrides)
    except ConfigError as err:
        print(f"qrl-train: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if "RANK" not in os.environ:
        # the memory plan, once, before any process starts or any weight is read (qrl_megatron/plan.py); on CPU it
        # checks the same per-GPU figures against gpu.memory_gb (host RAM is not checked)
        from qrl_megatron.plan import check_plan

        try:
            refusal = check_plan(path, overrides, cfg)
        except ConfigError as err:
            print(f"qrl-train: config error: {err}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        if refusal:
            print(f"qrl-train: {refusal}", file=sys.stderr)
            return EXIT_CONFIG_ERROR

    from qrl_megatron.models.base import prepare_base_model

    in_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if os.environ.get("RANK", "0") == "0":
        try:
            _prepare_run_dir(cfg.run, cfg.trainer)
        except ConfigError as err:
            print(f"qrl-train: config error: {err}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
    if not in_launcher:
        # once, before any rank starts, so ranks never race to build the tiny model, and a hub id missing from
        # the HF cache is one line here rather than a traceback per rank
        try:
            from qrl_megatron.rollout.servers import run_transport

            # sync.transport=cuda_ipc / nccl without CUDA, shm to another host: one line before any process starts
            run_transport(cfg.sync, cfg.rollout)
            prepare_base_model(cfg.model, cfg.run.cache_dir)
        except ConfigError as err:
            print(f"qrl-train: config error: {err}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
    if cfg.learner.world_size > 1 and not in_launcher:
        return _launch_workers(cfg.learner.world_size, argv)
    if in_launcher and int(os.environ["WORLD_SIZE"]) != cfg.learner.world_size:
        print(
            f"qrl-train: config error: launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but learner.tp*pp*dp = "
            f"{cfg.learner.world_size}; make them agree",
            file=sys.stderr,
        )
        return EXIT_CONFIG_ERROR

    from qrl_megatron.learner.resume import EXIT_PREEMPTED, Preempted, RunStopped
    from qrl_megatron.train import train

    try:
        train(cfg)
    except Preempted as stop:
        print(f"qrl-train: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except ConfigError as err:  # found once the data is read: a bad file, too many unusable rows, a plug-in reward
        print(f"qrl-train: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except RunStopped as err:
        print(f"qrl-train: stopped: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

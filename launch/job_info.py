"""What the sbatch scripts need to know about a config, as shell assignments they `eval`.

    python -m launch.job_info prepare [--nodes N --gpus-per-node G] CONFIG [key=value ...]

loads and validates the config (with --nodes/--gpus-per-node: also nodes * GPUs == learner.tp*pp*dp), builds or
locates the base model once (as `qrl-train` does before its ranks start), and prints

    QRL_RUN_DIR=/abs/run/dir
    QRL_WORLD_SIZE=8
    QRL_MODEL_DIR=/abs/model
    QRL_SERVE_ARGS=(/abs/model --tokenizer /abs/model --dtype bfloat16 ...)

Errors are one line on stderr and exit code 2. Nothing but the assignments goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from launch.common import load_checked_config

if TYPE_CHECKING:
    from qrl_megatron.config import QRLConfig

WORKER_EXTENSION = "qrl_megatron.rollout.worker_extension.QRLWorkerExtension"


def vllm_serve_args(cfg: QRLConfig, model_dir: str | Path) -> list[str]:
    """`vllm serve` arguments (model first) matching the in-process engine of qrl_megatron.rollout.vllm_engine:
    bf16 weights, the run's seed, logprobs of the processed (temperature-scaled) distribution, and the worker
    extension that receives weight updates. Host, port and tensor parallelism are added by the sbatch script."""
    model = str(model_dir)
    args = [
        model,
        "--tokenizer",
        model,
        "--dtype",
        "bfloat16",
        "--seed",
        str(cfg.seed),
        "--logprobs-mode",
        "processed_logprobs",
        "--worker-extension-cls",
        WORKER_EXTENSION,
        "--enable-prefix-caching",
    ]
    if cfg.rollout.enforce_eager:
        args.append("--enforce-eager")
    return args


def shell_assignments(values: dict[str, str | list[str]]) -> str:
    """Bash assignments, every value quoted; lists become arrays."""
    lines = []
    for key, value in values.items():
        if isinstance(value, list):
            lines.append(f"{key}=({' '.join(shlex.quote(v) for v in value)})")
        else:
            lines.append(f"{key}={shlex.quote(value)}")
    return "\n".join(lines) + "\n"


def prepare(config: str, overrides: Sequence[str], nodes: int | None, gpus_per_node: int | None) -> str:
    cfg = load_checked_config(config, overrides, nodes, gpus_per_node)
    from qrl_megatron.models.base import prepare_base_model

    model_dir = Path(prepare_base_model(cfg.model, cfg.run.cache_dir)).resolve()
    return shell_assignments(
        {
            "QRL_RUN_DIR": str(Path(cfg.run.dir).resolve()),
            "QRL_WORLD_SIZE": str(cfg.learner.world_size),
            "QRL_MODEL_DIR": str(model_dir),
            "QRL_SERVE_ARGS": vllm_serve_args(cfg, model_dir),
        }
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.job_info", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["prepare"], help="prepare: validate, build/locate the model, print assignments")
    p.add_argument("--nodes", type=int, default=None, help="with --gpus-per-node: check the learner layout")
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("config", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = p.parse_intermixed_args(None if argv is None else list(argv))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # library chatter must not reach the `eval`
            text = prepare(args.config, args.overrides, args.nodes, args.gpus_per_node)
    except ValueError as err:
        print(f"qrl job_info: config error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

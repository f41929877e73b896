"""What the sbatch scripts need to know about a config, as shell assignments they `eval`.

    python -m launch.job_info prepare [--nodes N --gpus-per-node G] CONFIG [key=value ...]

loads and validates the config (with --nodes/--gpus-per-node: also nodes * GPUs == learner.tp*pp*dp), builds or
locates the base model once (as `qrl-train` does before its ranks start), and prints

    QRL_RUN_DIR=/abs/run/dir
    QRL_WORLD_SIZE=8
    QRL_MODEL_DIR=/abs/model
    QRL_SERVE_ARGS=(/abs/model-in-rollout-format --tokenizer ... --weight-transfer-config '{"backend": "qrl_tcp"}' ...)

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


def server_weight_backend(cfg: QRLConfig) -> str:
    """The weight-transfer backend the rollout servers take weights through: ``sync.transport`` resolved as the
    learner resolves it for servers read from a list (``qrl_tcp`` on CPU, ``qrl_nccl`` on GPU under ``auto``)."""
    import dataclasses

    from qrl_megatron.rollout.servers import run_transport
    from qrl_megatron.rollout.weight_transfer import BACKENDS

    listed = dataclasses.replace(cfg.rollout, engine="server", server_url="", server_urls=[], server_list="listed")
    return BACKENDS[run_transport(cfg.sync, listed)]


def vllm_serve_args(cfg: QRLConfig, model_dir: str | Path) -> list[str]:
    """`vllm serve` arguments (model first) matching the in-process engine of qrl_megatron.rollout.vllm_engine
    (rollout/server_engine.engine_flags: bf16 compute, logprobs of the processed distribution, the worker
    extension, the memory settings), the run's seed and the weight-transfer backend the learner will use
    (:func:`server_weight_backend`). Host, port and tensor parallelism are added by the sbatch script."""
    from qrl_megatron.rollout.server_engine import engine_flags

    model = str(model_dir)
    return [
        model,
        "--tokenizer",
        model,
        "--seed",
        str(cfg.seed),
        *engine_flags(cfg.rollout, server_weight_backend(cfg)),
    ]


def serve_model_dir(cfg: QRLConfig, base_dir: Path) -> Path:
    """The folder the servers load: the base in ``rollout.quant`` (exported once, with the bf16 exclusions of the
    learner's sync plan, as qrl_megatron.rollout.engines.rollout_model_dir does for an engine the learner starts);
    the learner's first sync then replaces its weights with the policy's own."""
    if cfg.rollout.quant == "bf16":
        return base_dir
    from qrl_megatron.bridge.base import rollout_target
    from qrl_megatron.bridge.plan import build_plan
    from qrl_megatron.models.registry import load_spec
    from qrl_megatron.rollout.engines import rollout_model_dir

    learner = cfg.learner
    plan = build_plan(
        load_spec(base_dir),
        learner.tp,
        learner.pp,
        learner.dp,
        rollout_target(cfg.sync, cfg.rollout.quant, cfg.rollout.tp),
    )
    # under a folder of its own: the learner exports into run.dir/rollout_model_<quant> when it starts an engine
    return rollout_model_dir(cfg.rollout, Path(cfg.run.dir).resolve() / "rollout_servers", base_dir, plan)


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
            "QRL_SERVE_ARGS": vllm_serve_args(cfg, serve_model_dir(cfg, model_dir)),
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

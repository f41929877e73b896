"""What the sbatch scripts need to know about a config, as shell assignments they `eval`.

    python -m launch.job_info prepare [--nodes N --gpus-per-node G] [--wait-s S] CONFIG [key=value ...]

loads and validates the config (with --nodes/--gpus-per-node: also nodes * GPUs == learner.tp*pp*dp), builds or
locates the base model once (as `qrl-train` does before its ranks start) -- in QeRL mode (learner.lora.rank > 0)
also waits up to --wait-s for the learner's warm-start, the base the servers serve, and writes their start-up
adapter -- and prints

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
import time
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


def vllm_serve_args(cfg: QRLConfig, model_dir: str | Path, adapter_dir: str | Path | None = None) -> list[str]:
    """`vllm serve` arguments (model first) matching the in-process engine of qrl_megatron.rollout.vllm_engine
    (rollout/server_engine.engine_flags: bf16 compute, logprobs of the processed distribution, the worker
    extension, the memory settings), the run's seed and the weight-transfer backend the learner will use
    (:func:`server_weight_backend`); in QeRL mode (``adapter_dir``: :func:`initial_adapter_dir`) the LoRA slot
    and start-up adapter of a server the learner starts itself (server_engine.lora_flags). Host, port and tensor
    parallelism are added by the sbatch script."""
    from qrl_megatron.rollout.engine import LoRAServing
    from qrl_megatron.rollout.server_engine import engine_flags, lora_flags

    model = str(model_dir)
    args = [
        model,
        "--tokenizer",
        model,
        "--seed",
        str(cfg.seed),
        *engine_flags(cfg.rollout, server_weight_backend(cfg)),
    ]
    if adapter_dir is not None:
        args += lora_flags(LoRAServing(cfg.learner.lora.adapter(), str(adapter_dir)))
    return args


def serve_policy_dir(cfg: QRLConfig, base_dir: Path, wait_s: float = 0.0) -> Path:
    """QeRL mode: the policy whose export is the learner's frozen base -- the warm-started one, which the learner
    job trains into ``run.cache_dir`` (keyed as it keys it); waited for up to ``wait_s`` (the servers serve that
    base for the whole run: only the adapter streams). Without a warm-start: the base model."""
    from qrl_megatron.config import to_dict
    from qrl_megatron.learner.warmstart import is_complete, warmstart_dir, warmstart_key

    if not (cfg.warmstart.enabled and cfg.warmstart.steps > 0):
        return base_dir
    settings = to_dict(cfg)
    provenance = {"model": settings["model"], "task": settings["task"]}
    out = warmstart_dir(
        cfg.run.cache_dir, warmstart_key(cfg.warmstart, cfg.learner.precision, cfg.seed, base_dir, provenance)
    )
    deadline = time.monotonic() + wait_s
    if not is_complete(out):
        print(f"qrl job_info: waiting for the learner's warm-start {out} (QeRL: it is the served base)", flush=True)
    while not is_complete(out):
        if time.monotonic() > deadline:
            raise ValueError(
                f"QeRL mode serves the learner's warm-started policy, and {out} is not complete after {wait_s:g} s; "
                f"start the learner job with the same config (it trains it into run.cache_dir) or raise "
                f"QRL_READY_TIMEOUT_S"
            )
        time.sleep(2.0)
    return out.resolve()


def initial_adapter_dir(cfg: QRLConfig, policy_dir: Path) -> Path:
    """QeRL mode: the servers' start-up adapter, B = 0 (the base itself, as the learner's initial adapter is),
    under run.dir/rollout_servers; the learner's step-0 sync swaps its own in."""
    import torch

    from qrl_megatron.lora.adapter import adapter_shapes
    from qrl_megatron.lora.export import write_peft_adapter
    from qrl_megatron.models.registry import load_spec

    adapter, spec = cfg.learner.lora.adapter(), load_spec(policy_dir)
    zeros = {
        n: torch.zeros(shape, dtype=torch.bfloat16)
        for n, shape in adapter_shapes(spec, adapter.rank, adapter.targets).items()
    }
    out = Path(cfg.run.dir).resolve() / "rollout_servers" / "adapter_initial"
    return Path(write_peft_adapter(zeros, out, adapter, policy_dir, spec))


def serve_model_dir(cfg: QRLConfig, base_dir: Path) -> Path:
    """The folder the servers load: the base in ``rollout.quant`` (exported once, with the bf16 exclusions of the
    learner's sync plan, as qrl_megatron.rollout.engines.rollout_model_dir does for an engine the learner starts);
    the learner's first sync then replaces its weights with the policy's own. QeRL mode (``base_dir``: the
    :func:`serve_policy_dir`): exported as the learner exports its frozen base (no plan: every linear but
    ``lm_head``), which is never streamed."""
    if cfg.rollout.quant == "bf16":
        return base_dir
    from qrl_megatron.rollout.engines import rollout_model_dir

    servers_dir = Path(cfg.run.dir).resolve() / "rollout_servers"
    if cfg.learner.lora.enabled:
        return rollout_model_dir(cfg.rollout, servers_dir, base_dir, None)
    from qrl_megatron.bridge.base import rollout_target
    from qrl_megatron.bridge.plan import build_plan
    from qrl_megatron.models.registry import load_spec

    learner = cfg.learner
    plan = build_plan(
        load_spec(base_dir),
        learner.tp,
        learner.pp,
        learner.dp,
        rollout_target(cfg.sync, cfg.rollout.quant, cfg.rollout.tp),
    )
    # under a folder of its own: the learner exports into run.dir/rollout_model_<quant> when it starts an engine
    return rollout_model_dir(cfg.rollout, servers_dir, base_dir, plan)


def shell_assignments(values: dict[str, str | list[str]]) -> str:
    """Bash assignments, every value quoted; lists become arrays."""
    lines = []
    for key, value in values.items():
        if isinstance(value, list):
            lines.append(f"{key}=({' '.join(shlex.quote(v) for v in value)})")
        else:
            lines.append(f"{key}={shlex.quote(value)}")
    return "\n".join(lines) + "\n"


def prepare(
    config: str, overrides: Sequence[str], nodes: int | None, gpus_per_node: int | None, wait_s: float = 0.0
) -> str:
    """``wait_s``: QeRL mode, how long to wait for the learner's warm-start (:func:`serve_policy_dir`)."""
    cfg = load_checked_config(config, overrides, nodes, gpus_per_node)
    from qrl_megatron.models.base import prepare_base_model

    model_dir = Path(prepare_base_model(cfg.model, cfg.run.cache_dir)).resolve()
    if cfg.learner.lora.enabled:
        policy = serve_policy_dir(cfg, model_dir, wait_s)
        serve = vllm_serve_args(cfg, serve_model_dir(cfg, policy), initial_adapter_dir(cfg, policy))
    else:
        serve = vllm_serve_args(cfg, serve_model_dir(cfg, model_dir))
    return shell_assignments(
        {
            "QRL_RUN_DIR": str(Path(cfg.run.dir).resolve()),
            "QRL_WORLD_SIZE": str(cfg.learner.world_size),
            "QRL_MODEL_DIR": str(model_dir),
            "QRL_SERVE_ARGS": serve,
        }
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.job_info", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["prepare"], help="prepare: validate, build/locate the model, print assignments")
    p.add_argument("--nodes", type=int, default=None, help="with --gpus-per-node: check the learner layout")
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--wait-s", type=float, default=0.0, help="QeRL mode: wait this long for the learner's warm-start")
    p.add_argument("config", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = p.parse_intermixed_args(None if argv is None else list(argv))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # library chatter must not reach the `eval`
            text = prepare(args.config, args.overrides, args.nodes, args.gpus_per_node, args.wait_s)
    except ValueError as err:
        print(f"qrl job_info: config error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

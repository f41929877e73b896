"""Pieces shared by the launchers: the nemo-run import, the world-size check, fail-fast environment."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qrl_megatron.config import QRLConfig

REPO_ROOT = Path(__file__).resolve().parent.parent

# nemo-run is in the default set-up (scripts/setup_env.sh; QRL_INSTALL_LAUNCH=0 leaves it out).
NEMO_RUN_INSTALL = (
    "bash scripts/setup_env.sh  "
    '(or: .venv/bin/python -m pip install -c scripts/constraints-cpu.txt "nemo-run==0.11.1" "leptonai==0.27.3")'
)

# Environment every multi-process learner job gets (slurm/learner.sbatch sets the same): a collective that fails or
# outlives the process-group timeout (QRL_DIST_TIMEOUT_MIN, read by qrl_megatron.platform) kills its process
# instead of hanging; unbuffered output so the last lines before a failure reach the log.
FAILFAST_ENV: dict[str, str] = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "PYTHONUNBUFFERED": "1",
}


def require_nemo_run() -> ModuleType:
    """`import nemo_run`, or an ImportError that says how to install it."""
    try:
        import nemo_run
    except ImportError as err:
        raise ImportError(f"nemo-run is not installed; install it with: {NEMO_RUN_INSTALL}") from err
    except Exception as err:  # e.g. an incompatible leptonai breaks `import nemo_run` with other errors
        raise ImportError(
            f"`import nemo_run` failed ({type(err).__name__}: {err}); nemo-run 0.11.1 needs leptonai==0.27.3. "
            f"Reinstall with: {NEMO_RUN_INSTALL}"
        ) from err
    return nemo_run


def load_checked_config(
    config_path: str | Path | None,
    overrides: Sequence[str] = (),
    nodes: int | None = None,
    gpus_per_node: int | None = None,
) -> QRLConfig:
    """Load and validate the config; with `nodes` and `gpus_per_node`, check they give learner.tp*pp*dp processes.

    Raises ValueError (qrl_megatron.config.ConfigError is one) naming the keys to change.
    """
    from qrl_megatron.config import load_config

    cfg = load_config(config_path, list(overrides))
    if nodes is not None or gpus_per_node is not None:
        if nodes is None or gpus_per_node is None:
            raise ValueError("give both nodes and gpus_per_node (or neither)")
        if nodes < 1 or gpus_per_node < 1:
            raise ValueError(f"nodes={nodes} and gpus_per_node={gpus_per_node} must be positive")
        learner = cfg.learner
        if nodes * gpus_per_node != learner.world_size:
            raise ValueError(
                f"nodes * gpus_per_node = {nodes} * {gpus_per_node} = {nodes * gpus_per_node} processes, but "
                f"learner.tp * learner.pp * learner.dp = {learner.tp} * {learner.pp} * {learner.dp} = "
                f"{learner.world_size}; change --nodes/--gpus-per-node or the overrides learner.tp/learner.pp/learner.dp"
            )
    return cfg


def cli_args(config_path: str | Path | None, overrides: Sequence[str]) -> list[str]:
    """Arguments of `python -m qrl_megatron.cli` for this config and overrides."""
    return ([str(config_path)] if config_path is not None else []) + [str(o) for o in overrides]


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` strings (from repeated --env flags) to a dict; ValueError naming a malformed one."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--env {item!r} must look like NAME=VALUE")
        env[key] = value
    return env

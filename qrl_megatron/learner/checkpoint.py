"""Megatron dist checkpoints, written atomically.

Every rank writes its shards into `<dir>.partial`; after a barrier rank 0 adds a `COMPLETE` marker and renames
the folder into place, so a crash mid-save leaves only a `.partial` folder that `load_checkpoint` refuses.
The layout-independent format (dist checkpointing) loads at another TP/PP layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

MARKER = "COMPLETE"
# megatron-core on gloo: the default DistributedOptimizer sharding fails and fully_reshardable fails to load.
OPTIMIZER_SHARDING = "dp_reshardable"


def _sharded_state(model: Any, optimizer: Any, is_loading: bool = False) -> dict[str, Any]:
    model_state = model.sharded_state_dict()
    metadata = {"distrib_optim_sharding_type": OPTIMIZER_SHARDING}
    return {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata),
    }


def save_checkpoint(model: Any, optimizer: Any, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    from megatron.core import dist_checkpointing

    final = Path(directory)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer), str(partial))
    dist.barrier()
    if dist.get_rank() == 0:
        (partial / MARKER).write_text(json.dumps(extra or {}))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    dist.barrier()
    return final


def load_checkpoint(model: Any, optimizer: Any, directory: str | Path) -> dict[str, Any]:
    from megatron.core import dist_checkpointing

    path = Path(directory)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (no {MARKER} marker: the save was interrupted or this is not a "
            "qrl-megatron checkpoint folder); point at a finished checkpoint"
        )
    state = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), str(path))
    model.load_state_dict(state["model"])
    with torch.no_grad():  # megatron-core on CPU/gloo: the fp32 optimizer state loads only under no_grad
        optimizer.load_state_dict(state["optimizer"])
    return json.loads((path / MARKER).read_text() or "{}")

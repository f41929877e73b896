"""Megatron dist checkpoints, written atomically, that say what model they hold.

Every rank writes its shards into `<dir>.partial`; rank 0 adds `meta.json` (what the checkpoint holds: format
version, model spec, parameter dtype, the layout it was written at, the base model folder and the run config) and
`hf/` (the base model's config, generation config and tokenizer files), then, after a barrier, the `COMPLETE`
marker last, and renames the folder into place. A crash mid-save leaves only a `.partial` folder that
`load_checkpoint` / `resolve_checkpoint` refuse. The layout-independent format (dist checkpointing) loads at
another TP/PP layout, which is how `qrl-export` reads a checkpoint of any layout into one process.

`meta.json` is a JSON object; readers ignore keys they do not know and later versions only add keys (resume state
goes next to it), so `format` grows only when an old reader would misread a new checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "HF_DIR",
    "MARKER",
    "META",
    "META_FORMAT",
    "OPTIMIZER_SHARDING",
    "copy_hf_metadata",
    "load_checkpoint",
    "load_model_weights",
    "read_checkpoint_meta",
    "resolve_checkpoint",
    "save_checkpoint",
]

MARKER = "COMPLETE"
META = "meta.json"
META_FORMAT = 1
HF_DIR = "hf"
WRAPPER_PREFIX = "module."  # megatron DDP's prefix on the sharded keys of the model it wraps  # the base model folder's small files: config.json, generation_config.json, tokenizer
# megatron-core on gloo: the default DistributedOptimizer sharding fails and fully_reshardable fails to load.
OPTIMIZER_SHARDING = "dp_reshardable"
# Files of a HF model folder that are weights (never copied into hf/: the weights are the checkpoint itself).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")


def _sharded_state(model: Any, optimizer: Any, is_loading: bool = False) -> dict[str, Any]:
    model_state = model.sharded_state_dict()
    metadata = {"distrib_optim_sharding_type": OPTIMIZER_SHARDING}
    return {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata),
    }


def copy_hf_metadata(src: str | Path, dst: str | Path) -> list[str]:
    """Copy a HF model folder's non-weight files (config, generation config, tokenizer, chat template) to ``dst``.

    Hidden files and our own markers (``.qrl*``) are skipped; so are sub-folders (HF folders keep nothing the
    loaders need in them). Returns the copied file names.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for item in sorted(src.iterdir()):
        if item.is_file() and not item.name.startswith(".") and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, dst / item.name)
            copied.append(item.name)
    return copied


def save_checkpoint(
    model: Any,
    optimizer: Any,
    directory: str | Path,
    extra: dict[str, Any] | None = None,
    *,
    meta: dict[str, Any] | None = None,
    base_dir: str | Path | None = None,
) -> Path:
    """Collective: write the model and optimizer shards of every rank to ``directory`` atomically.

    ``extra`` goes into the ``COMPLETE`` marker (returned by :func:`load_checkpoint`); ``meta`` into ``meta.json``
    (with ``format`` added); ``base_dir``'s config/tokenizer files are copied to ``hf/`` so that the checkpoint
    alone is enough to rebuild and export the model.
    """
    from megatron.core import dist_checkpointing

    final = Path(directory)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer), str(partial))
    if dist.get_rank() == 0:
        if base_dir is not None:
            copy_hf_metadata(base_dir, partial / HF_DIR)
        (partial / META).write_text(json.dumps({"format": META_FORMAT, **(meta or {})}, indent=2, default=str))
    dist.barrier()  # every rank's shards are on disk before the marker says so
    if dist.get_rank() == 0:
        (partial / MARKER).write_text(json.dumps(extra or {}))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    dist.barrier()
    return final


def _require_complete(path: Path) -> None:
    if not (path / MARKER).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (no {MARKER} marker: the save was interrupted or this is not a "
            "qrl-megatron checkpoint folder); point at a finished checkpoint"
        )


def load_checkpoint(model: Any, optimizer: Any, directory: str | Path) -> dict[str, Any]:
    from megatron.core import dist_checkpointing

    path = Path(directory)
    _require_complete(path)
    state = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), str(path))
    # DDP's sharded keys carry its "module." prefix, but its load_state_dict hands the dict to the wrapped module
    model.load_state_dict({key.removeprefix(WRAPPER_PREFIX): value for key, value in state["model"].items()})
    with torch.no_grad():  # megatron-core on CPU/gloo: the fp32 optimizer state loads only under no_grad
        optimizer.load_state_dict(state["optimizer"])
    return json.loads((path / MARKER).read_text() or "{}")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder holding one in ``checkpoint/``; a one-line error for anything else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run folder (run.dir) or its checkpoint folder")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; pass a run folder (run.dir) or its checkpoint folder")
    if (path / MARKER).is_file() or path.name.endswith(".partial"):
        candidate = path
    elif (path / "checkpoint").is_dir() or (path / "checkpoint.partial").is_dir():
        candidate = path / "checkpoint"
        if not candidate.is_dir():
            raise FileNotFoundError(
                f"{path}: the run's checkpoint was never completed (only checkpoint.partial exists: the save was "
                "interrupted); rerun training with trainer.checkpoint=true"
            )
    elif (path / "metadata.json").is_file() or (path / "common.pt").is_file():
        candidate = path  # a dist checkpoint without the marker: incomplete, reported below
    else:
        raise FileNotFoundError(
            f"{path} is neither a checkpoint nor a run folder with a checkpoint/ (train with trainer.checkpoint=true, "
            "or pass the checkpoint folder itself)"
        )
    _require_complete(candidate)
    return candidate


def read_checkpoint_meta(directory: str | Path) -> dict[str, Any]:
    """``meta.json`` of a complete checkpoint; a one-line error when it is missing, unreadable or too new."""
    path = resolve_checkpoint(directory)
    meta_file = path / META
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{path} has no {META} (written by an older qrl-megatron that did not record the model); re-save it "
            "with this version, or export from the run's final/ folder"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_file} is not valid JSON ({err}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or int(meta.get("format", 0)) > META_FORMAT:
        raise ValueError(
            f"{meta_file}: checkpoint format {meta.get('format') if isinstance(meta, dict) else '?'} is newer than "
            f"this qrl-megatron reads ({META_FORMAT}); upgrade qrl-megatron"
        )
    return meta


def load_model_weights(model: Any, directory: str | Path) -> None:
    """Load only the model weights of a complete checkpoint into ``model`` (any TP/PP layout; no optimizer).

    ``model`` is a bare GPTModel stage or a DDP-wrapped one. Checkpoints are written from the DDP wrapper, whose
    sharded keys carry its ``module.`` prefix; a bare model is read under that prefix.
    """
    from megatron.core import dist_checkpointing

    path = resolve_checkpoint(directory)
    wrapped = isinstance(getattr(model, "module", None), torch.nn.Module)
    prefix = "" if wrapped else WRAPPER_PREFIX
    state = dist_checkpointing.load({"model": model.sharded_state_dict(prefix=prefix)}, str(path))["model"]
    model.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()})

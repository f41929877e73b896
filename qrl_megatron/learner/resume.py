"""Periodic run checkpoints: atomic folders with a sha256 manifest, rotation, the latest good one, RNG state.

A run checkpoint is ``<root>/step_<NNNNNNNN>/``: whatever the trainer writes into it (the learner's Megatron dist
checkpoint, the run state, one RNG file per rank) plus ``MANIFEST.json`` (size and sha256 of every file), written
last. The folder is built as ``step_<N>.partial``, every file and the folder are fsynced, the manifest is written
and fsynced, and only then is the folder renamed into place and the parent fsynced; a crash at any point leaves
either the previous state or a ``.partial`` folder that nothing loads. Older checkpoints beyond ``keep`` are removed
only after the new one is in place. On resume, checkpoints are tried newest first: one that is truncated or fails
its manifest is named in a warning and skipped, and the previous good one is used.

Which parts are synchronous: all of it. The learner's shards are written by every rank, the hashing and fsyncs by
the rank that commits; the step loop waits for the save (a checkpoint that lags behind the loop is the one a kill
would lose).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "MANIFEST",
    "CheckpointStore",
    "capture_rng_state",
    "restore_rng_state",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_HASH_CHUNK = 8 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path


def verify_checkpoint(folder: str | Path) -> str | None:
    """None when ``folder`` is a complete checkpoint whose files all match its manifest; else why it is not."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return f"{folder}: no {MANIFEST} (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return f"{folder}: {MANIFEST} is unreadable ({exc})"
    on_disk = {p.relative_to(folder).as_posix() for p in _files(folder)}
    if extra := sorted(on_disk - set(entries)):
        return f"{folder}: files not in the manifest: {extra[:3]}"
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{folder}: {name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{folder}: {name} has {path.stat().st_size} bytes, the manifest says {entry['size']} (truncated?)"
        if _sha256(path) != entry["sha256"]:
            return f"{folder}: {name} fails its sha256 (corrupted)"
    return None


@dataclass(frozen=True)
class CheckpointStore:
    """The run's checkpoints under ``root``: ``step_<N>`` folders, the newest ``keep`` of them kept."""

    root: Path
    keep: int = 2

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ValueError(f"keep={self.keep}: at least the newest checkpoint must be kept")

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def partial(self, step: int) -> Path:
        return self.root / f"step_{step:08d}.partial"

    def begin(self, step: int) -> Path:
        """A fresh, empty ``.partial`` folder for step ``step`` (a leftover of an interrupted save is removed)."""
        partial = self.partial(step)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        return partial

    def commit(self, step: int) -> Path:
        """Seal the ``.partial`` folder of ``step``: fsync, manifest, rename into place, then rotate old ones."""
        partial, final = self.partial(step), self.path(step)
        entries: dict[str, dict[str, Any]] = {}
        for path in _files(partial):
            with path.open("rb") as f:
                os.fsync(f.fileno())
            entries[path.relative_to(partial).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        for folder in sorted({p.parent for p in _files(partial)} | {partial}, key=lambda p: -len(p.parts)):
            _fsync_dir(folder)
        manifest = partial / MANIFEST
        with manifest.open("w") as f:
            json.dump({"step": step, "files": entries}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(partial)
        if final.exists():  # a save of the same step again (after a resume that re-ran it)
            shutil.rmtree(final)
        partial.rename(final)
        _fsync_dir(self.root)
        for old in self.steps()[: -self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return final

    def steps(self) -> list[int]:
        """Steps of the sealed (renamed) checkpoint folders, oldest first; not verified."""
        if not self.root.is_dir():
            return []
        found = (_STEP_DIR.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest_good(self) -> Path | None:
        """The newest checkpoint that passes its manifest; each one skipped is named in a warning."""
        for step in reversed(self.steps()):
            reason = verify_checkpoint(self.path(step))
            if reason is None:
                return self.path(step)
            logger.warning("skipping checkpoint %s", reason)
        return None


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the run draws from on this process: python, numpy, torch CPU (and CUDA when present)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

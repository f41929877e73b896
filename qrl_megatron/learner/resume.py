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
    "EXIT_PREEMPTED",
    "PREEMPTED_MARKER",
    "INCOMPATIBLE_KEYS",
    "MANIFEST",
    "CheckpointStore",
    "Preempted",
    "PreemptionFlag",
    "RunCheckpointer",
    "RunStopped",
    "config_changes",
    "plan_resume",
    "resolve_resume",
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


RUN_STATE = "run_state.json"
LEARNER_DIR = "learner"
# Settings that change what a checkpoint's weights and optimizer state mean: resuming with another value is an
# error. Everything else (max_steps, eval cadence, the TP/PP/DP layout, ...) may change and is logged.
INCOMPATIBLE_KEYS = (
    "model",
    "task",
    "seed",
    "rollout.quant",
    "learner.precision",
    "learner.lora",
    "learner.base_format",
    "algo.invariant_scaling",
)


def _lookup(settings: dict[str, Any], dotted: str) -> Any:
    node: Any = settings
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(incompatible keys that differ, other keys that differ) between a checkpoint's settings and this run's."""
    incompatible = [key for key in INCOMPATIBLE_KEYS if _lookup(saved, key) != _lookup(current, key)]
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    harmless = sorted(
        key
        for key in set(flat_saved) | set(flat_current)
        if flat_saved.get(key) != flat_current.get(key) and not any(key.startswith(k) for k in incompatible)
    )
    return incompatible, harmless


def resolve_resume(resume: str, store: CheckpointStore) -> Path | None:
    """The checkpoint ``trainer.resume`` names: None to start afresh; one-line errors for a bad explicit path."""
    if resume == "never":
        return None
    if resume == "auto":
        return store.latest_good()
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(
            f"trainer.resume={resume!r}: no such checkpoint folder; use 'auto', 'never' or a step_<N> path"
        )
    if (reason := verify_checkpoint(path)) is not None:
        raise ValueError(f"trainer.resume={resume!r} is not a good checkpoint: {reason}")
    return path


class RunCheckpointer:
    """Saves and restores a whole run at a step boundary; collective over the learner world.

    A checkpoint holds the learner (``learner/``: Megatron dist checkpoint of weights, optimizer, what the model
    is), one RNG file per rank (``rng/rank<r>.pt``) and rank 0's ``run_state.json`` (the step, the prompt
    stream's position, counters, the settings), sealed by :meth:`CheckpointStore.commit`.
    """

    def __init__(self, store: CheckpointStore, rank: int) -> None:
        self.store, self.rank = store, rank

    def save(self, step: int, learner: Any, run_state: dict[str, Any] | None, **learner_kwargs: Any) -> Path:
        import torch.distributed as dist

        partial = self.store.partial(step)
        if self.rank == 0:
            self.store.begin(step)
        dist.barrier()
        learner.save_checkpoint(str(partial / LEARNER_DIR), step=step, **learner_kwargs)
        (partial / "rng").mkdir(exist_ok=True)
        torch.save(capture_rng_state(), partial / "rng" / f"rank{self.rank:05d}.pt")
        dist.barrier()
        if self.rank == 0:
            (partial / RUN_STATE).write_text(json.dumps({"step": step, **(run_state or {})}, indent=1))
            self.store.commit(step)
        dist.barrier()
        return self.store.path(step)

    def load(self, path: Path, learner: Any) -> dict[str, Any]:
        """Restore the learner and this rank's RNGs from ``path``; returns the run state (every rank)."""
        learner.load_checkpoint(str(path / LEARNER_DIR))
        rng_file = path / "rng" / f"rank{self.rank:05d}.pt"
        if rng_file.is_file():
            restore_rng_state(torch.load(rng_file, weights_only=False))
        else:  # another world size: the new ranks start their generators from the seed
            logger.warning("%s has no RNG state for rank %d (the layout changed); seeded afresh", path, self.rank)
        return json.loads((path / RUN_STATE).read_text())


def plan_resume(resume: str, store: CheckpointStore, settings: dict[str, Any]) -> tuple[str | None, str | None]:
    """Rank 0's decision: (checkpoint to resume from or None, the one-line error that stops the run or None).

    Returned rather than raised so the caller can hand the verdict to every rank before anyone raises.
    """
    try:
        path = resolve_resume(resume, store)
    except ValueError as err:
        return None, str(err)
    if path is None:
        return None, None
    saved = json.loads((path / RUN_STATE).read_text()).get("settings", {})
    incompatible, harmless = config_changes(saved, settings)
    if incompatible:
        changed = ", ".join(f"{k}: {_lookup(saved, k)!r} -> {_lookup(settings, k)!r}" for k in incompatible)
        return None, (
            f"cannot resume {path}: it was written with other settings that change what it holds ({changed}); "
            "restore them, or start afresh in another run.dir (or trainer.resume=never)"
        )
    step = json.loads((path / RUN_STATE).read_text())["step"]
    print(f"resuming from {path} (step {step})", flush=True)
    layout = [k for k in ("learner.tp", "learner.pp", "learner.dp") if k in harmless]
    if layout:
        old = "x".join(str(_lookup(saved, k)) for k in ("learner.tp", "learner.pp", "learner.dp"))
        new = "x".join(str(_lookup(settings, k)) for k in ("learner.tp", "learner.pp", "learner.dp"))
        print(f"  the learner layout changed (TPxPPxDP {old} -> {new}): the dist checkpoint is resharded", flush=True)
    if other := [k for k in harmless if k not in layout and not k.startswith("run.")]:
        print(f"  settings changed since the checkpoint (allowed): {', '.join(other)}", flush=True)
    return str(path), None


# Exit status of a run stopped by a preemption signal after writing its checkpoint (EX_TEMPFAIL): the sbatch
# scripts requeue the job on it, and the requeued job resumes (trainer.resume=auto).
EXIT_PREEMPTED = 75
# Written to run.dir by a preempted run (whatever status its launcher reports: torchrun turns any worker's exit
# status into 1): slurm/learner.sbatch requeues the job when it finds it.
PREEMPTED_MARKER = "preempted.json"


class RunStopped(RuntimeError):
    """The run cannot go on (it diverged, or its engine keeps dying); the message says why and what to change."""


class Preempted(Exception):
    """Raised at the step boundary after the preemption checkpoint was written."""

    def __init__(self, step: int) -> None:
        super().__init__(f"preempted: checkpoint written at step {step}; rerun the same command to resume")
        self.step = step


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (Slurm's ``--signal=USR1@<s>``, scancel, a torchrun shutdown); read between steps.

    The handler only records the request: a checkpoint written from inside a signal handler could interrupt a
    collective or a save halfway.
    """

    def __init__(self) -> None:
        import signal

        self.requested = False
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

"""Supervised warm-start: the project's own starting policy for RL.

A randomly initialised tiny model never samples a correct answer, so RL would have no signal. A short supervised
phase on the task's training split (answer tokens only) gives a policy that is right part of the time; GRPO then
improves it. The result is an HF model folder cached under `run.cache_dir`, keyed by everything that determines
it (model, task, warm-start settings, seed) but not by the parallel layout, so every layout reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from qrl_megatron.algos.policy_loss import sft_loss
from qrl_megatron.learner.batch import pack_sequences
from qrl_megatron.learner.config import LearnerConfig, LoRAConfig, WarmStartConfig
from qrl_megatron.learner.learner import Learner, scheduled_lr
from qrl_megatron.models.checkpoint_reader import INDEX_NAME, SINGLE_NAME
from qrl_megatron.models.registry import ModelSpec
from qrl_megatron.platform import ParallelLayout

MARKER = ".qrl_warmstart.json"


def warmstart_key(
    ws: WarmStartConfig, learner_precision: str, seed: int, base_dir: Path, provenance: dict[str, Any]
) -> str:
    """Cache key of a warm-started policy. `provenance`: the JSON-able settings the base model and the training
    rows came from (the trainer passes ``{"model": ..., "task": ...}``, its `model` and `task` config sections)."""
    identity = {
        **provenance,
        "base_weights": _weights_digest(base_dir),
        "warmstart": asdict(ws),
        "learner_precision": learner_precision,
        "seed": seed,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _weights_digest(base_dir: Path) -> str:
    """Digest of the base weights' bytes: the single ``model.safetensors``, or the index and every shard it names.

    Streamed (every rank computes it; a 7B base would otherwise be read into memory whole). For a single file it
    is the file's sha256, as before, so existing caches stay valid.
    """
    index = base_dir / INDEX_NAME
    if not index.is_file():
        single = base_dir / SINGLE_NAME
        if not single.is_file():
            return str(base_dir)
        with single.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    h = hashlib.sha256()
    files = [index] + [base_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    for path in files:
        with path.open("rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def warmstart_dir(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"warmstart-{key}"


def is_complete(path: Path) -> bool:
    # a folder of an older version with a stale index next to its single file is rebuilt, not read
    return (path / MARKER).is_file() and (path / SINGLE_NAME).is_file() and not (path / INDEX_NAME).is_file()


def run_warmstart(
    ws: WarmStartConfig,
    learner_cfg: LearnerConfig,
    spec: ModelSpec,
    layout: ParallelLayout,
    base_dir: Path,
    base_weights: Mapping[str, torch.Tensor],
    train_rows: list[dict[str, str]],
    tokenizer: Any,
    seq_length: int,
    *,
    seed: int,
    cache_dir: str | Path,
    provenance: dict[str, Any],
    progress: bool = True,
) -> Path:
    """Train (all ranks), write the policy folder atomically (rank 0), return its path. Cached: reruns are free.

    The policy lands in `cache_dir` under a key of `provenance` (see `warmstart_key`), `ws`, the learner
    precision, `seed` and the base weights; `progress` prints a loss line every 50 steps on rank 0.
    """
    out = warmstart_dir(cache_dir, warmstart_key(ws, learner_cfg.precision, seed, base_dir, provenance))
    if is_complete(out):
        return out
    # the warm-start is full-parameter SFT also for a LoRA run (QeRL starts RL from a fine-tuned model): the key
    # above does not depend on learner.lora, so both modes share one cached warm-start
    full = dataclasses.replace(learner_cfg, lora=LoRAConfig(), base_format="bf16")
    learner = Learner(spec, layout, full, base_weights, lr=ws.lr, seq_length=seq_length)
    rng = random.Random(f"warmstart-{seed}")
    eos = tokenizer.eos_token_id
    losses = []
    for step in range(ws.steps):
        rows = [train_rows[rng.randrange(len(train_rows))] for _ in range(ws.batch_size)]
        batch = pack_sequences(
            [tokenizer.encode(r["prompt"], add_special_tokens=False) for r in rows],
            [tokenizer.encode(r["answer"], add_special_tokens=False) + [eos] for r in rows],
            seq_length,
            tokenizer.pad_token_id,
        )
        lr = scheduled_lr(ws.lr, step, ws.steps)  # cosine decay to 10% of the peak rate, no warm-up
        local = batch.split(layout.dp)[layout.dp_rank]
        metrics = learner.train_step(local, sft_loss, total_tokens=batch.num_tokens, total_seqs=len(batch), lr=lr)
        losses.append(metrics["loss"])
        if layout.rank == 0 and progress and (step % 50 == 0 or step == ws.steps - 1):
            print(f"warm-start step {step}/{ws.steps} | loss {metrics['loss']:.4f} | lr {lr:.2e}", flush=True)
    weights = learner.gather_hf_weights(dtype=torch.bfloat16, dst=0)
    if layout.rank == 0:
        assert weights is not None
        write_policy(out, base_dir, weights, {"final_loss": losses[-1] if losses else None, "steps": ws.steps})
    dist.barrier()
    del learner
    return out


def _is_weights_file(item: Path) -> bool:
    """A file holding (or indexing) weights: never copied from the base, or the new folder would name stale ones."""
    return item.suffix in _WEIGHT_SUFFIXES or item.name.endswith(".index.json")


_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf"}


def write_policy(out: Path, base_dir: Path, weights: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Copy the base folder's config/tokenizer, write the new weights, and rename into place (never half-written).

    The policy is one ``model.safetensors`` and no index: the base's index (of a sharded base) names the base's
    shards, so it is not copied, and readers then take the single file.
    """
    from safetensors.torch import save_file

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for item in base_dir.iterdir():
        if item.is_file() and not _is_weights_file(item) and not item.name.startswith(".qrl"):
            shutil.copy2(item, partial / item.name)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(partial / SINGLE_NAME), metadata={"format": "pt"})
    (partial / MARKER).write_text(json.dumps(info))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)

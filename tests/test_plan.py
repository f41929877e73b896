"""The memory planner (qrl_megatron/plan.py, `qrl-plan`) and qrl-train's refusal of a plan that does not fit.

The 32B figures come from the stored published config (configs/hf_configs), built on the meta device; the tiny
model's plan is checked against a live learner (bytes allocated after one optimizer step, and the bytes autograd
saves over one micro-batch forward).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from qrl_megatron.config import AlgoConfig, LearnerConfig, load_config
from qrl_megatron.learner.config import LoRAConfig

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
QERL = str(REPO / "configs" / "qwen2.5_32b_qerl.yaml")
FULL_1GPU = str(REPO / "configs" / "qwen2.5_32b_1gpu.yaml")
QERL_PAPER_BYTES = 20.7e9  # QeRL's 32B NVFP4 model size (REFERENCE.md)


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir):
    """A TP1 x PP1 parallel state in this process (the planner reuses it) and the tiny model."""
    from qrl_megatron.models.base import load_hf_weights
    from qrl_megatron.models.registry import load_spec
    from qrl_megatron.platform import destroy_distributed, init_distributed

    layout = init_distributed(1, 1, seed=0)
    yield layout, load_spec(tiny_model_dir), load_hf_weights(tiny_model_dir)
    destroy_distributed()


def _plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    from qrl_megatron.plan import main

    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_keys_and_32b_qerl_fits_with_the_papers_weights(one_rank, capsys) -> None:
    out = _plan_json(capsys, QERL)
    for key in ("fits", "peak_gb", "items", "learner", "engine"):
        assert key in out
    assert "weights_gb" in out["learner"] and "weights_gb" in out["engine"]
    assert set(out["counted"]) <= set(out["items"])
    # NVFP4 model weights (linears at 4.5 bits, embeddings/lm_head/norms bf16) within 5% of QeRL's 20.7 GB
    for weights in (out["engine"]["weights_gb"], out["learner"]["base_weights_gb"]):
        assert abs(weights * 1e9 - QERL_PAPER_BYTES) / QERL_PAPER_BYTES < 0.05, weights
    assert out["fits"] and out["peak_gb"] <= 80
    assert out["peak_gb"] == pytest.approx(max(out["phases_gb"].values()))


def test_full_parameter_32b_on_one_gpu_is_refused_before_anything_starts(one_rank, capsys, monkeypatch) -> None:
    import qrl_megatron.models.base as base
    from qrl_megatron.cli import EXIT_CONFIG_ERROR, main

    def no_model(*_a, **_k):
        raise AssertionError("the plan must refuse before the model is looked up")

    monkeypatch.setattr(base, "prepare_base_model", no_model)
    start = time.perf_counter()
    assert main([FULL_1GPU]) == EXIT_CONFIG_ERROR
    assert time.perf_counter() - start < 20
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "does not fit" in err and "learner.optimizer_state" in err, err
    assert "QeRL mode" in err, err  # the cheapest fix


def test_the_gate_fires_at_the_configured_memory(one_rank) -> None:
    """gpu.memory_gb is the gate: the accepted QeRL recipe is refused on a 40 GB GPU, and gpu.check=false skips."""
    from qrl_megatron.plan import check_plan

    assert check_plan(QERL, [], load_config(QERL)) is None
    refusal = check_plan(QERL, ["gpu.memory_gb=40"], load_config(QERL, ["gpu.memory_gb=40"]))
    assert refusal and "gpu.memory_gb=40" in refusal
    assert check_plan(QERL, [], load_config(QERL, ["gpu.memory_gb=40", "gpu.check=false"])) is None


def test_tiny_recipes_pass_quickly(one_rank) -> None:
    from qrl_megatron.plan import check_plan

    for recipe in ("tiny_cpu", "tiny_cpu_qerl"):
        path = str(REPO / "configs" / f"{recipe}.yaml")
        cfg = load_config(path)
        start = time.perf_counter()
        assert check_plan(path, [], cfg) is None
        assert time.perf_counter() - start < 2.0, recipe


@pytest.mark.parametrize(
    "learner",
    [
        LearnerConfig(precision="fp32", micro_batch_size=4, lr=1e-3),
        LearnerConfig(precision="bf16", micro_batch_size=4, lr=1e-3),
        LearnerConfig(precision="bf16", micro_batch_size=4, lr=1e-3, lora=LoRAConfig(rank=4, train_norms=True)),
    ],
    ids=["fp32", "bf16", "bf16-lora"],
)
def test_planner_equals_the_live_learner_on_the_tiny_model(one_rank, learner) -> None:
    from qrl_megatron.algos.policy_loss import grpo_loss
    from qrl_megatron.learner.activations import measure_saved_activation_bytes
    from qrl_megatron.learner.learner import Learner
    from qrl_megatron.learner.memory import learner_memory
    from qrl_megatron.plan import parameter_entries, saved_activation_bytes, stage_entries, stage_memory
    from tests._learner_dist_workers import SEQ_LENGTH, rollout_like_batch

    layout, spec, weights = one_rank
    live = Learner(spec, layout, learner, weights, lr=learner.lr, seq_length=SEQ_LENGTH)
    batch = rollout_like_batch(spec.vocab_size)
    saved = measure_saved_activation_bytes(live, batch)
    batch.old_logprobs = batch.rollout_logprobs
    live.train_step(batch, grpo_loss(AlgoConfig()), batch.num_tokens, len(batch))
    measured = learner_memory(live)
    planned = stage_memory(stage_entries(parameter_entries(spec, learner, layout), spec, 1, 0), 1, 1, learner)
    for key, value in planned.items():
        assert value == measured[key], (key, value, measured[key])
    plan_saved = saved_activation_bytes(spec, learner, learner.micro_batch_size, SEQ_LENGTH)
    assert abs(plan_saved - saved) / saved < 0.25, (plan_saved, saved)


def test_recompute_orders_the_activations(one_rank) -> None:
    from qrl_megatron.plan import layer_activation_bytes, make_plan, model_spec

    layout, spec, _ = one_rank

    def stage(layer_spec: str, mode: str) -> int:  # every layer's saves + one layer's backward transient
        saved, transient = layer_activation_bytes(spec, 4, 64, 1, 2, layer_spec, mode)
        return spec.num_layers * saved + transient

    for layer_spec in ("local", "te"):
        none, sel, full = (stage(layer_spec, mode) for mode in ("none", "selective", "full"))
        assert (none > sel > full) if layer_spec == "local" else (none == sel > full), (layer_spec, none, sel, full)
    cfg = load_config(QERL)  # LoRA: the local spec, whose unfused attention selective recompute helps
    items = make_plan(cfg, model_spec(cfg), layout).items
    acts = [items[f"learner.activations_{m}"] for m in ("none", "selective", "full")]
    assert acts[0] > acts[1] > acts[2] and items["learner.activations"] == acts[2]


def test_pipeline_and_tensor_parallel_rules(one_rank) -> None:
    """TP divides the split tensors only, PP gives each stage its layers (the last the lm_head) and the
    distributed optimizer shards Adam over DP: on the 32B shape the per-rank bytes follow."""
    from qrl_megatron.plan import parameter_entries, stage_entries, stage_memory

    layout, _, _ = one_rank
    cfg = load_config(str(REPO / "configs" / "qwen2.5_32b.yaml"))
    from qrl_megatron.plan import model_spec

    spec = model_spec(cfg)
    entries = parameter_entries(spec, cfg.learner, layout)
    whole = stage_memory(stage_entries(entries, spec, 1, 0), 1, 1, cfg.learner)
    assert whole["full_parameters"] == sum(e.nbytes for e in entries) == 2 * sum(e.numel for e in entries)
    stages = [stage_memory(stage_entries(entries, spec, 4, s), 4, 2, cfg.learner) for s in range(4)]
    replicated = sum(e.nbytes for e in entries if not e.tp_split)
    assert sum(s["full_parameters"] for s in stages) == (whole["full_parameters"] - replicated) // 4 + replicated
    assert all(s["optimizer_state"] == -(-s["gradients"] * 3 // 2) for s in stages)  # 12 B/param over DP2
    assert stages[0]["full_parameters"] - stages[1]["full_parameters"] == spec.vocab_size * spec.hidden_size * 2 // 4

"""End-to-end: the real `qrl-train` command (Megatron learner + vLLM CPU engine), as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_utils import qrl_train, read_metrics

from qrl_megatron.learner.resume import CheckpointStore

pytestmark = pytest.mark.e2e

REQUIRED_METRICS = (
    "step", "reward_mean", "accuracy", "time_rollout_s", "time_train_s", "sync_seconds", "rollout_tokens_per_s",
    "entropy", "logprob_diff_abs_mean",
)  # fmt: skip
# bf16 engine vs fp32 learner on the same weights: measured 0.004-0.013 nats per token on the tiny model.
MAX_LOGPROB_GAP = 0.05


def test_default_recipe_trains_and_writes_outputs(reference_run: Path) -> None:
    run_dir = reference_run  # the default recipe, 4 steps, a checkpoint every 2 (tests/conftest.py)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert set(REQUIRED_METRICS) <= row.keys()
        assert 0.0 <= row["reward_mean"] <= 1.0
        assert row["rollout_tokens_per_s"] > 0 and row["sync_seconds"] > 0
        # bf16 rollout ~= learner: the engine's processed logprobs agree with Megatron's on the sampled tokens
        assert 0.0 < row["logprob_diff_abs_mean"] < MAX_LOGPROB_GAP
        assert row["sync_bytes"] > 0
    evals = json.loads((run_dir / "eval.json").read_text())
    assert {"before", "after", "improvement"} <= evals.keys()
    assert evals["before"]["num_problems"] == 200
    assert CheckpointStore(run_dir / "checkpoints").steps() == [2, 4]  # trainer.save_every=2, keep_checkpoints=2
    assert (run_dir / "checkpoint" / "COMPLETE").is_file()
    assert not (run_dir / "checkpoint.partial").exists()
    meta = json.loads((run_dir / "checkpoint" / "meta.json").read_text())  # what qrl-export needs
    assert meta["layout"] == {"tp": 1, "pp": 1, "dp": 1} and (run_dir / "checkpoint" / "hf" / "config.json").is_file()
    final = run_dir / "final"  # the trained policy as a complete HF folder (tests/test_export.py loads such folders)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json"):
        assert (final / name).is_file(), name
    assert not (run_dir / "final.partial").exists()
    assert any((run_dir / "tb").glob("events.out.tfevents.*"))


def test_tp2_pp2_learner_trains_an_nvfp4_engine_through_the_bridge(tmp_path: Path, run_cache_dir: Path) -> None:
    """The bridge's acceptance command: `qrl-train <default> learner.tp=2 learner.pp=2 rollout.quant=nvfp4`, which
    starts its own four learner processes (torchrun-style) on one machine."""
    run_dir = tmp_path / "tp2pp2-nvfp4"
    qrl_train(
        run_dir, run_cache_dir, "learner.tp=2", "learner.pp=2", "rollout.quant=nvfp4", "trainer.max_steps=2",
        "sync.probe_every=1", "trainer.checkpoint=false",
        # and the quantized-RL machinery on top: QuRL ACR + invariant scaling (default s=1.5), a k3 KL to the frozen
        # reference policy, QeRL AQN (2 stages: step 2's rollout is noisy)
        "algo.correction=acr", "algo.kl_coef=0.01", "algo.kl_estimator=k3", "algo.aqn.enabled=true",
        "algo.aqn.stages=2",
    )  # fmt: skip
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["sync_seconds"] > 0 and row["sync_gbps"] > 0
        # NVFP4 linears: 4.5 bits per element (codes + E4M3 block scales) + one fp32 global scale per tensor
        assert row["sync_quantized_vs_bf16"] == pytest.approx(0.28125, abs=2e-3)
        assert row["sync_bytes_vs_bf16"] < 0.35  # embeddings and norms stay bf16
        # engine vs the learner's forward on the streamed (dequantized) weights; the run stops above sync.probe_tolerance
        assert 0.0 < row["probe_gap_mean"] <= 0.05
    assert rows[0]["aqn_sigma"] == 0.0 and rows[1]["aqn_sigma"] == pytest.approx(1e-2)
    assert all(r["is_weight_max"] <= 2.0 and r["is_weight_mean"] > 0 for r in rows)  # ACR weight min(r, C=2)
    evals = json.loads((run_dir / "eval.json").read_text())
    assert evals["initial_sync"]["probe_gap_mean"] <= 0.05
    assert (run_dir / "rollout_model_nvfp4" / "config.json").is_file()
    assert json.loads((run_dir / "config.json").read_text())["learner"]["tp"] == 2

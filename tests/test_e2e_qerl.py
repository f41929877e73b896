"""QeRL mode end to end through `qrl-train`: LoRA on a frozen NVFP4 base, adapter-only sync into a LoRA vLLM engine.

One short run of the tiny recipe with the QeRL settings (NVFP4 base in learner and engine, AQN on, probe every sync;
its warm-start shared with the other e2e tests), then its outputs: the bytes every sync streamed, the learner's
memory, and the exports -- the PEFT adapter loaded by ``peft`` onto the base the learner computes with (the
dequantized NVFP4 codes) against the merged export in ``transformers`` and in a fresh vLLM engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qrl_megatron.lora.adapter import adapter_bytes, norm_shapes
from qrl_megatron.models.registry import load_spec
from tests.e2e_utils import qrl_train, read_metrics

pytestmark = pytest.mark.e2e

LORA = ("learner.lora.rank=8", "learner.lora.alpha=16", "learner.lr=1e-3", "trainer.checkpoint=false")


@pytest.fixture(scope="module")
def qerl_run(tmp_path_factory: pytest.TempPathFactory, run_cache_dir: Path) -> Path:
    run = tmp_path_factory.mktemp("qerl") / "run"
    qrl_train(
        run,
        run_cache_dir,
        *LORA,
        "learner.base_format=nvfp4",
        "rollout.quant=nvfp4",
        "algo.aqn.enabled=true",
        "algo.aqn.stages=2",
        "trainer.max_steps=3",
        "sync.probe_every=1",
    )
    return run


def test_qerl_run_streams_only_the_adapter(qerl_run: Path) -> None:
    run = qerl_run
    policy = Path(json.loads((run / "eval.json").read_text())["policy"])
    spec = load_spec(policy)
    # adapter bytes = 2 (bf16) * r * layers * sum(in + out); AQN on: the 2 norms per layer ride along (bf16)
    expected = adapter_bytes(spec, 8) + 2 * sum(s[0] for s in norm_shapes(spec).values())
    rows = read_metrics(run)
    assert len(rows) == 3
    for row in rows:
        assert row["sync_bytes"] == expected
        assert row["sync_adapter_bytes"] == adapter_bytes(spec, 8)
        assert row["sync_base_bytes"] == 0
        assert row["probe_gap_mean"] < 0.05  # engine (NVFP4 + adapter) vs the learner's own forward
    assert rows[-1]["aqn_sigma"] > 0  # noise on the engine's norms; the next sync restored the learner's
    evals = json.loads((run / "eval.json").read_text())
    assert evals["initial_sync"]["sync_base_bytes"] == 0 and evals["initial_sync"]["sync_bytes"] == expected
    memory = evals["learner_memory"]
    assert memory["adapter"] > 0 and memory["full_parameters"] == 0 and memory["optimizer_state"] > 0
    assert rows[0]["memory/adapter_bytes"] == memory["adapter"]
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == policy.resolve() and config["r"] == 8
    assert "quantization_config" not in json.loads((run / "final" / "config.json").read_text())


def test_peft_adapter_on_the_base_equals_the_merged_export_in_transformers_and_vllm(qerl_run: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qrl_megatron.models.base import load_hf_weights
    from qrl_megatron.rollout.config import RolloutConfig
    from qrl_megatron.rollout.vllm_engine import VLLMEngine
    from te_ext.vllm_export import dequantize_checkpoint

    run = qerl_run
    policy = Path(json.loads((run / "eval.json").read_text())["policy"])
    # the base the learner computes with: the engine's NVFP4 codes, decoded
    base_weights = dequantize_checkpoint(dict(load_hf_weights(run / "rollout_model_nvfp4")), "nvfp4")
    base = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    base.load_state_dict(base_weights, strict=False)
    base.tie_weights()
    fresh = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    fresh.load_state_dict(base_weights, strict=False)
    fresh.tie_weights()
    peft_model = PeftModel.from_pretrained(base, run / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    sequences = [[1, 5, 9, 12, 20, 7, 3], [2, 8, 8, 30, 11]]
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            a, b = peft_model(ids).logits, merged(ids).logits
            # the merged folder is bf16: W + s*B@A rounded once, the logits then differ by bf16 rounding only
            assert (a - b).abs().max() < 0.02 * a.abs().max()
        # the adapter did something (B moved away from 0)
        assert (
            peft_model(torch.tensor([sequences[0]])).logits - fresh(torch.tensor([sequences[0]])).logits
        ).abs().max() > 1e-4
    engine = VLLMEngine(str(run / "final"), RolloutConfig(), seed=0, max_model_len=64)
    try:
        got = engine.prompt_logprobs(sequences)
    finally:
        engine.close()
    with torch.no_grad():
        for seq, row in zip(sequences, got, strict=True):
            logp = torch.log_softmax(peft_model(torch.tensor([seq])).logits[0], dim=-1)
            want = [logp[i, seq[i + 1]].item() for i in range(len(seq) - 1)]
            assert max(abs(x - y) for x, y in zip(row, want, strict=True)) < 0.05

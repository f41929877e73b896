"""QeRL mode end to end through `qrl-train`: LoRA on a frozen base, adapter-only sync into a LoRA vLLM engine.

Two short runs of the tiny recipe (its warm-start shared with the other e2e tests): the QeRL recipe's settings
(NVFP4 base in learner and engine, AQN on, probe every sync) and a bf16-base run whose PEFT adapter is loaded by
``peft`` onto the HF base and compared with the learner's merged export.
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


def test_qerl_run_streams_only_the_adapter(tmp_path: Path, run_cache_dir: Path) -> None:
    run = tmp_path / "qerl"
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
    # the exports: a PEFT folder on the base RL started from, and the merged bf16 model
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == policy.resolve() and config["r"] == 8
    assert (run / "final" / "config.json").is_file()
    assert "quantization_config" not in json.loads((run / "final" / "config.json").read_text())


def test_lora_bf16_adapter_loads_in_peft_and_the_merged_model_in_transformers_and_vllm(
    tmp_path: Path, run_cache_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qrl_megatron.rollout.config import RolloutConfig
    from qrl_megatron.rollout.vllm_engine import VLLMEngine

    run = tmp_path / "lora-bf16"
    qrl_train(
        run,
        run_cache_dir,
        *LORA,
        "learner.base_format=bf16",
        "rollout.quant=bf16",
        "trainer.max_steps=1",
        "learner.lr_warmup_steps=0",
    )
    policy = Path(json.loads((run / "eval.json").read_text())["policy"])
    sequences = [[1, 5, 9, 12, 20, 7, 3], [2, 8, 8, 30, 11]]
    base = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, run / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            a, b = peft_model(ids).logits, merged(ids).logits
            # the merged folder is bf16: W + s*B@A rounded once, the logits then differ by bf16 rounding only
            assert (a - b).abs().max() < 0.02 * a.abs().max()
    # the adapter did something (B moved away from 0); peft wraps `base` in place, so compare with a fresh one
    fresh = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    with torch.no_grad():
        delta = (peft_model(torch.tensor([sequences[0]])).logits - fresh(torch.tensor([sequences[0]])).logits).abs()
    assert delta.max() > 1e-4
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

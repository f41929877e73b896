"""bench/gpu_check.sh: the dry run goes through every step on CPU, and the report renders what a GPU run writes.

The dry run must finish (exit 0) with every step named and "skipped: needs CUDA (...)", write its Markdown and
JSON to its own folder and leave docs/results/gpu.md alone. The report test feeds it the JSON a GPU run would
write, so the tables are exercised here although no GPU has run the steps; the gates of the kernel and GEMM steps
are shown to fire.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402

STEPS = ["learner_full", "learner_lora_nvfp4", "triton_kernels", "w4a16_gemm"]


@pytest.mark.e2e
def test_dry_run_reports_every_step_as_needing_cuda(tmp_path: Path) -> None:
    committed = (ROOT / "docs" / "results" / "gpu.md").read_bytes()
    out = tmp_path / "dry"
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--python", sys.executable, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in STEPS:
        assert f"step {step}: {gpu_check.NEEDS_CUDA}" in proc.stdout, proc.stdout
        assert json.loads((out / f"{step}.json").read_text())["status"] == gpu_check.NEEDS_CUDA
    assert gpu_check.NEEDS_CUDA == "skipped: needs CUDA (torch.cuda.is_available() is False)"
    md = (out / "gpu.md").read_text()
    for title, _ in gpu_check.TITLES.values():
        assert f"## {title}" in md
    assert json.loads((out / "gpu.json").read_text())["steps"].keys() == set(STEPS)
    assert (ROOT / "docs" / "results" / "gpu.md").read_bytes() == committed  # the dry run writes elsewhere


@pytest.mark.unit
def test_the_steps_are_those_of_the_script() -> None:
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert list(gpu_check.STEPS) == STEPS
    assert f'STEPS="{" ".join(STEPS)}"' in script


@pytest.mark.unit
def test_gpu_shapes_and_configs_come_from_the_repository() -> None:
    assert gpu_check.linear_shapes("Qwen2.5-7B-Instruct") == {
        "qkv_proj": (4608, 3584),  # 28 heads + 2 x 4 KV heads of 128
        "o_proj": (3584, 3584),
        "gate_up_proj": (37888, 3584),
        "down_proj": (3584, 18944),
    }
    assert gpu_check.linear_shapes("Qwen2.5-32B-Instruct")["down_proj"] == (5120, 27648)
    full, lora = gpu_check._learner_config(False), gpu_check._learner_config(True)
    assert (full.tp, full.pp, full.dp, full.lora.enabled) == (1, 1, 1, False)
    assert (lora.lora.rank, lora.base_format) == (32, "nvfp4")
    batch = gpu_check._random_batch(151936, 512, seed=0)
    assert tuple(batch.tokens.shape) == (gpu_check.LEARNER_BATCH, 512)


@pytest.mark.unit
def test_the_gates_fire() -> None:
    good = {"kernel": "nvfp4_quantize", "shape": [4096, 11008], "bit_exact": True}
    assert gpu_check.kernels_status([good]) == "ok"
    assert gpu_check.kernels_status([good, {**good, "bit_exact": False}]) == (
        "FAILED: not bit-exact: nvfp4_quantize 4096x11008"
    )
    assert gpu_check.gemm_status(4e-3) == "ok"
    assert gpu_check.gemm_status(0.3).startswith("FAILED: relative error 0.3 > 0.02")


def _gpu_results() -> dict[str, dict]:
    kernel = {"kernel": "nvfp4_quantize", "shape": [4096, 11008], "bit_exact": True, "seconds": 1e-4, "gbps": 2500.0,
              "copy_gbps": 4000.0, "vs_copy": 0.625, "torch_path_seconds": 2e-3}  # fmt: skip
    gemm = {"model": "Qwen2.5-7B-Instruct", "linear": "down_proj", "n": 3584, "k": 18944, "tokens": 1,
            "w4a16_us": 30.0, "bf16_us": 60.0, "speedup_vs_bf16": 2.0, "w4a16_weight_gbps": 1200.0,
            "bf16_weight_gbps": 2200.0, "copy_gbps": 4000.0, "rel_err_vs_bf16_dequant": 3e-3}  # fmt: skip
    items = {"base_weights": 0.0, "adapter": 0.0, "trained_norms": 0.0, "full_parameters": 0.988, "gradients": 1.976,
             "optimizer_state": 5.93, "total": 8.9}  # fmt: skip
    learner = {"status": "ok", "mode": "full-parameter", "precision": "bf16", "batch": "16 x 512 tokens, 3 steps",
               "step_seconds": [1.5, 0.4, 0.4], "peak_allocated_gb": 14.2, "allocated_after_steps_gb": 8.95,
               "held_gb": items, "planned_gb": items, "planned_vs_held": 1.0, "peak_minus_planned_static_gb": 5.3,
               "newer_planner_gb": {"learner.activations": 4.1}, "newer_planner_tensors_gb": 13.0,
               "peak_vs_newer_planner": 1.09}  # fmt: skip
    return {
        "learner_full": learner,
        "learner_lora_nvfp4": {**learner, "mode": "LoRA r32 on an NVFP4 base"},
        "triton_kernels": {"status": "ok", "rows": [kernel]},
        "w4a16_gemm": {"status": "ok", "rows": [gemm]},
    }


@pytest.mark.unit
def test_report_renders_a_table_per_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name, result in _gpu_results().items():
        (out / f"{name}.json").write_text(json.dumps({**result, "step": name, "seconds": 12.0}))
    (out / "environment.json").write_text(json.dumps({"torch": "2.x", "cuda": True, "device": "NVIDIA H200"}))
    md, js = tmp_path / "gpu.md", tmp_path / "gpu.json"
    assert gpu_check.report(out, md, js, "bash bench/gpu_check.sh") == 0
    text = md.read_text()
    assert "device NVIDIA H200" in text
    assert "| full_parameters | 0.988 | 0.988 |" in text
    assert "peak allocated 14.200 GB" in text and "learner.activations" in text and "that 1.090" in text
    assert "| nvfp4_quantize | 4096x11008 | True | 2500 | 4000 | 0.625 | 2 |" in text
    assert "| Qwen2.5-7B-Instruct | down_proj | 3584x18944 | 1 | 30 | 60 | 2 | 1200 | 4000 | 0.003 |" in text
    assert json.loads(js.read_text())["steps"]["w4a16_gemm"]["rows"][0]["speedup_vs_bf16"] == 2.0


@pytest.mark.e2e
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_real_run_without_cuda_is_refused_before_writing_anything(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--python", sys.executable, "--out", str(tmp_path / "real")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "no CUDA device (torch.cuda.is_available() is False); run with --dry-run" in proc.stderr
    assert not list((tmp_path / "real").glob("*.json"))

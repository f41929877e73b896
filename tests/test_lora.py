"""QeRL mode in the learner: config rules, the adapter's size, the frozen NVFP4 linear, and layout invariance of the
LoRA update over TP1 / TP2 / PP2 / TP2xPP2 with real gloo processes (NVFP4 base, trained norms)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qrl_megatron.config import load_config
from qrl_megatron.config_fields import ConfigError
from qrl_megatron.lora.adapter import adapter_bytes, adapter_shapes
from qrl_megatron.models.registry import load_spec
from tests._lora_dist_workers import lora_update_worker
from tests.dist_utils import each_layout, run_distributed

REPO = Path(__file__).resolve().parents[1]
QERL = REPO / "configs" / "tiny_cpu_qerl.yaml"


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["learner.lora.rank=0"], "learner.base_format=nvfp4 freezes the base"),
        (["rollout.quant=bf16"], "rollout.quant=bf16 with learner.lora.rank > 0"),
        (["learner.precision=fp8"], "learner.precision=fp8 with learner.lora.rank > 0"),
        (["learner.lora.targets=[q_proj,qq_proj]"], "learner.lora.targets"),
        (["learner.lora.targets=[]"], "learner.lora.targets is empty"),
        (["algo.kl_coef=0.1"], "algo.kl_coef > 0"),
        (["trainer.save_every=5"], "trainer.save_every / trainer.checkpoint"),
        (["learner.lora.alpha=0"], "learner.lora.alpha"),
    ],
)
def test_invalid_lora_settings_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("+", r"\+").replace(".", r"\.")):
        load_config(QERL, overrides)


@pytest.mark.unit
def test_recipe_loads() -> None:
    cfg = load_config(QERL)
    assert cfg.learner.lora.enabled and cfg.learner.base_format == "nvfp4" and cfg.rollout.quant == "nvfp4"


@pytest.mark.unit
def test_adapter_bytes_formula(tiny_model_dir: Path) -> None:
    """bf16 adapter bytes = 2 * r * layers * sum over targets of (in + out) -- the number each sync must stream."""
    spec = load_spec(tiny_model_dir)
    h, f, d = spec.hidden_size, spec.ffn_hidden_size, spec.kv_channels
    q, kv = spec.num_attention_heads * d, spec.num_query_groups * d
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + f) + (f + h)
    for r in (1, 8, 16):
        assert adapter_bytes(spec, r) == 2 * r * spec.num_layers * per_layer
        assert sum(a * b for a, b in adapter_shapes(spec, r).values()) * 2 == adapter_bytes(spec, r)
    assert adapter_bytes(spec, 4, ("q_proj", "v_proj")) == 2 * 4 * spec.num_layers * ((h + q) + (h + kv))


# ------------------------------------------------------------------------------------- frozen NVFP4 linear
@pytest.mark.unit
def test_frozen_linear_decodes_again_instead_of_saving_the_weight() -> None:
    import te_ext

    w = torch.randn(48, 64)
    qt = te_ext.quantize(w, "nvfp4")
    packed, scale, gscale = qt.codes, qt.scales["weight_scale"], qt.scales["weight_global_scale"]
    calls = []

    def decode() -> torch.Tensor:
        calls.append(1)
        return te_ext.dequantize_nvfp4_checkpoint(packed, scale, gscale, (48, 64), torch.float32)

    dense = qt.dequantize(torch.float32)
    x = torch.randn(5, 64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = te_ext.frozen_linear(x, decode)
    assert saved == [], "nothing may be saved for backward (the decoded weight would stay alive)"
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref @ dense.t()).square().sum().backward()
    assert torch.equal(y, x.detach() @ dense.t())
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert len(calls) == 2  # forward and backward


# -------------------------------------------------------------------------------------- layout invariance
@pytest.fixture(scope="module")
def nvfp4_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from te_ext.vllm_export import export_quantized_checkpoint

    return export_quantized_checkpoint(
        tiny_model_dir, tmp_path_factory.mktemp("nvfp4") / "m", "nvfp4", ignore=["lm_head"]
    )


@pytest.fixture(scope="module")
def lora_layouts(tiny_model_dir: Path, nvfp4_base: Path) -> dict:
    """Two LoRA updates (NVFP4 base, norms trained) at every layout, one launch per world size."""
    runs = {}
    for world, layouts in ((1, [(1, 1, 1)]), (2, [(2, 1, 1), (1, 2, 1)]), (4, [(2, 2, 1)])):
        results = run_distributed(
            each_layout, world, lora_update_worker, layouts, str(tiny_model_dir), str(nvfp4_base), True
        )
        for layout in layouts:
            runs[layout] = [r[layout] for r in results]
    return runs


@pytest.mark.dist
@pytest.mark.parametrize("layout", [(2, 1, 1), (1, 2, 1), (2, 2, 1)], ids=["tp2", "pp2", "tp2pp2"])
def test_lora_update_is_layout_invariant(lora_layouts: dict, layout: tuple[int, int, int]) -> None:
    ref = lora_layouts[(1, 1, 1)][0]
    ranks = lora_layouts[layout]
    last = next(r for r in ranks if r["last_stage"])
    assert last["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert torch.allclose(last["new_logprobs"], ref["new_logprobs"], atol=1e-5)
    adapter = ranks[0]["adapter"]
    assert set(adapter) == set(ref["adapter"])
    for name, tensor in ref["adapter"].items():
        assert torch.allclose(adapter[name], tensor, atol=1e-4), name


@pytest.mark.dist
def test_only_the_adapter_and_norms_train_and_the_base_is_codes(lora_layouts: dict, tiny_model_dir: Path) -> None:
    ref = lora_layouts[(1, 1, 1)][0]
    assert ref["losses"][1] != ref["losses"][0], "the update must change the policy"
    assert all(".lora." in n or n.endswith("layernorm.weight") for n in ref["trainable"])
    assert not any("final_layernorm" in n or "embedding" in n for n in ref["trainable"])
    assert ref["dense_qkv"] == [], "no dense copy of the NVFP4 base may stay resident"
    spec = load_spec(tiny_model_dir)
    # B moved away from 0 and norms were sent along
    assert any(n.endswith("lora_B.weight") and t.abs().max() > 0 for n, t in ref["adapter"].items())
    assert sum(n.endswith("input_layernorm.weight") for n in ref["adapter"]) == spec.num_layers


@pytest.mark.dist
def test_memory_measured_equals_planned(lora_layouts: dict) -> None:
    """The learner's bytes per item (base codes, adapter, norms, fp32 grads, Adam) as allocated == as planned on meta."""
    ref = lora_layouts[(1, 1, 1)][0]
    measured, planned = ref["memory"], ref["planned_memory"]
    assert measured == planned, (measured, planned)
    assert measured["optimizer_state"] == 8 * (measured["adapter"] + measured["trained_norms"]) // 4
    assert measured["full_parameters"] == 0


# ------------------------------------------------------------------------------ vLLM CPU LoRA fast path
@pytest.mark.unit
def test_cpu_lora_fast_path_equals_vllms_ops() -> None:
    """One adapter for every token: one GEMM instead of a per-token gather; mixed batches use vLLM's own code."""
    from vllm.lora.ops.torch_ops import lora_ops

    from qrl_megatron.rollout.vllm_lora_cpu import _patched_ops

    fast = _patched_ops(lora_ops)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 16, generator=g)
    a = torch.randn(2, 1, 4, 16, generator=g)  # [max_loras, 1, r, in]
    b = torch.randn(2, 1, 24, 4, generator=g)  # [max_loras, 1, out, r]
    for indices in (torch.full((7,), 1), torch.tensor([0, 1, 1, 0, 1, 1, 1])):
        ref_h, got_h = torch.zeros(7, 4), torch.zeros(7, 4)
        lora_ops.bgmv_shrink(x, a, ref_h, indices, 0.5)
        fast["bgmv_shrink"](x, a, got_h, indices, 0.5)
        assert torch.allclose(ref_h, got_h, atol=1e-5)
        ref_y, got_y = torch.ones(7, 30), torch.ones(7, 30)
        lora_ops.bgmv_expand(ref_h, b, ref_y, indices, True)
        fast["bgmv_expand"](got_h, b, got_y, indices, True)
        assert torch.allclose(ref_y, got_y, atol=1e-5)
        ref_s, got_s = torch.ones(7, 40), torch.ones(7, 40)
        lora_ops.bgmv_expand_slice(ref_h, b, ref_s, indices, 8, 24, True)
        fast["bgmv_expand_slice"](got_h, b, got_s, indices, 8, 24, True)
        assert torch.allclose(ref_s, got_s, atol=1e-5)


@pytest.mark.dist
def test_adapter_probe_fires_on_an_engine_that_kept_the_old_adapter(tiny_model_dir: Path) -> None:
    from tests._lora_dist_workers import adapter_probe_worker

    result = run_distributed(adapter_probe_worker, 1, str(tiny_model_dir))[0]
    assert result["honest"]["probe_gap_mean"] == 0.0 and result["honest"]["sync_base_bytes"] == 0
    assert "not serving the adapter the learner sent" in result["stale_error"]

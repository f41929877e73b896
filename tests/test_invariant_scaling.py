"""QuRL invariant scaling: the function is unchanged, the quantized engine's weights move more per step."""

from __future__ import annotations

import pytest
import torch

import te_ext
from qrl_megatron.algos.invariant_scaling import apply_invariant_scaling
from qrl_megatron.config import ConfigError, load_config
from qrl_megatron.models.base import load_hf_weights

TARGETS = [["qkv"], ["qkv", "gate_up"]]


@pytest.fixture(scope="module")
def weights(tiny_model_dir):
    # a state dict in memory: the tests check which tensors pass through unchanged (the reader is lazy)
    return dict(load_hf_weights(tiny_model_dir))


def _hf_logits(model_dir, hf_state_dict: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """float32 transformers forward of the given HF weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir))).float().eval()
    result = model.load_state_dict({k: v.float() for k, v in hf_state_dict.items()}, strict=False)
    assert not result.unexpected_keys and all(k == "lm_head.weight" for k in result.missing_keys), result
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.mark.unit
@pytest.mark.parametrize("targets", TARGETS, ids=["+".join(t) for t in TARGETS])
def test_transformers_forward_is_unchanged(tiny_model_dir, weights, targets):
    tokens = torch.randint(2, 64, (3, 24), generator=torch.Generator().manual_seed(0))
    scaled = apply_invariant_scaling(weights, 1.5, targets)
    before, after = _hf_logits(tiny_model_dir, weights, tokens), _hf_logits(tiny_model_dir, scaled, tokens)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # ... while the scaled tensors really changed: linears / s, norms * s, float32; biases and the rest untouched
    i = 0
    for lin in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]:
        name = f"model.layers.{i}.{lin}.weight"
        assert scaled[name].dtype == torch.float32
        torch.testing.assert_close(scaled[name] * 1.5, weights[name].float())
        assert scaled[f"model.layers.{i}.{lin}.bias"] is weights[f"model.layers.{i}.{lin}.bias"]
    torch.testing.assert_close(
        scaled[f"model.layers.{i}.input_layernorm.weight"],
        weights[f"model.layers.{i}.input_layernorm.weight"].float() * 1.5,
    )
    gate, norm = f"model.layers.{i}.mlp.gate_proj.weight", f"model.layers.{i}.post_attention_layernorm.weight"
    assert (scaled[gate] is weights[gate]) == ("gate_up" not in targets)
    assert (scaled[norm] is weights[norm]) == ("gate_up" not in targets)
    for name in ("model.embed_tokens.weight", "model.norm.weight", f"model.layers.{i}.self_attn.o_proj.weight"):
        assert scaled[name] is weights[name]


@pytest.mark.dist
def test_megatron_learner_forward_is_unchanged(tiny_model_dir):
    from _invariant_scaling_workers import learner_logprobs_worker
    from dist_utils import run_distributed

    result = run_distributed(
        learner_logprobs_worker, 1, 1, 1, str(tiny_model_dir), 1.5, ["qkv", "gate_up"], timeout=180
    )[0]
    torch.testing.assert_close(result["scaled"], result["plain"], atol=2e-5, rtol=1e-5)


@pytest.mark.unit
def test_s_one_is_a_no_op_and_bad_arguments_raise(weights):
    same = apply_invariant_scaling(weights, 1.0, ["qkv", "gate_up"])
    assert same.keys() == weights.keys() and all(same[k] is weights[k] for k in weights)
    for bad in ([], ["qkvo"], ["qkv", "down"]):
        with pytest.raises(ValueError, match="targets"):
            apply_invariant_scaling(weights, 1.5, bad)
    for s in (0.0, -1.5):
        with pytest.raises(ValueError, match="s="):
            apply_invariant_scaling(weights, s, ["qkv"])
    partial = {k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"}
    apply_invariant_scaling(partial, 1.5, ["qkv"])  # gate/up not needed
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        apply_invariant_scaling(partial, 1.5, ["gate_up"])
    with pytest.raises(ValueError, match="no model.layers"):
        apply_invariant_scaling({"model.norm.weight": torch.ones(4)}, 1.5, ["qkv"])


@pytest.mark.unit
def test_config_keys_and_validation():
    cfg = load_config(overrides=["algo.invariant_scaling.s=2", "algo.invariant_scaling.targets=[qkv,gate_up]"])
    assert cfg.algo.invariant_scaling.s == 2.0 and cfg.algo.invariant_scaling.targets == ["qkv", "gate_up"]
    assert load_config().algo.invariant_scaling.s == 1.5
    assert load_config().algo.invariant_scaling.targets == ["qkv"]
    with pytest.raises(ConfigError, match=r"algo\.invariant_scaling\.s=0"):
        load_config(overrides=["algo.invariant_scaling.s=0"])
    with pytest.raises(ConfigError, match=r"algo\.invariant_scaling\.targets\[1\]='gateup'.*gate_up"):
        load_config(overrides=["algo.invariant_scaling.targets=[qkv,gateup]"])
    with pytest.raises(ConfigError, match=r"algo\.invariant_scaling\.targets must name"):
        load_config(overrides=["algo.invariant_scaling.targets=[]"])


# ---------------------------------------------------------------------------------------------------------------
def _quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-element codes, dequantized float32) as the bridge sends them (TP=1: per-tensor NVFP4 global amax,
    per-channel INT8/FP8); bf16 is the plain cast the bf16 engine gets."""
    if fmt == "bf16":
        b = w.to(torch.bfloat16)
        return b.view(torch.int16), b.float()
    qt = te_ext.quantize(w, fmt, **({} if fmt == "nvfp4" else {"granularity": "channel"}))
    if fmt == "nvfp4":
        from te_ext import _e2m1

        codes = _e2m1.unpack(qt.codes)
    else:
        codes = qt.codes.view(torch.uint8)
    return codes, qt.dequantize(torch.float32)


def _adam_step(params: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> list[torch.Tensor]:
    """One torch Adam step (the first one: lr * m/sqrt(v) = lr * sign(g), whatever the weights' magnitude)."""
    ps = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.Adam(ps, lr=lr, betas=(0.9, 0.99))
    for p, g in zip(ps, grads, strict=True):
        p.grad = g.clone()
    opt.step()
    return [p.detach() for p in ps]


def _per_step_change(weights: dict[str, torch.Tensor], s: float, lr: float, fmt: str) -> dict[str, float]:
    scaled = apply_invariant_scaling(weights, s, ["qkv"])
    names = sorted(k for k in weights if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")))
    before = [scaled[n].float() for n in names]
    g = torch.Generator().manual_seed(0)
    # the same loss gradient; by the chain rule the scaled copy's gradient is s times larger (Adam ignores that)
    grads = [torch.randn(w.shape, generator=g) * s for w in before]
    after = _adam_step(before, grads, lr)
    changed = total = 0
    dq2 = q2 = dw2 = w2 = dot = 0.0
    for w0, w1 in zip(before, after, strict=True):
        (c0, q0), (c1, q1) = _quantize(w0, fmt), _quantize(w1, fmt)
        changed += int((c0 != c1).sum())
        total += c0.numel()
        dq2 += float((q1 - q0).pow(2).sum())
        q2 += float(q0.pow(2).sum())
        dw2 += float((w1 - w0).pow(2).sum())
        w2 += float(w0.pow(2).sum())
        dot += float(((q1 - q0) * (w1 - w0)).sum())
    return {
        "codes_changed": changed / total,
        "rel_dq": (dq2 / q2) ** 0.5,
        "rel_dw": (dw2 / w2) ** 0.5,
        "cos": dot / (dq2 * dw2) ** 0.5,  # how much of the engine's weight change is the optimizer's update
    }


@pytest.mark.unit
def test_quantized_weights_move_more_per_step(weights):
    """Per-step change of the engine's q/k/v weights after one Adam step, s=1 vs s=1.5 (printed: `pytest -s`)."""
    print("\nformat  lr      s    codes changed  |Q(W')-Q(W)|/|Q(W)|  |W'-W|/|W|  cos(dQ, dW)")
    for fmt in ("nvfp4", "int8", "fp8", "bf16"):
        for lr in (5e-5, 1e-4):
            plain, scaled = (_per_step_change(weights, s, lr, fmt) for s in (1.0, 1.5))
            for s, r in ((1.0, plain), (1.5, scaled)):
                print(
                    f"{fmt:6}  {lr:.0e}  {s:<3}  {r['codes_changed']:12.2%}  {r['rel_dq']:19.3e}  {r['rel_dw']:10.3e}  {r['cos']:.3f}"
                )
            # the grids of the quantized formats follow amax exactly: crossings ~ s (bf16's grid is absolute: > only)
            factor = 1.0 if fmt == "bf16" else 1.3
            assert scaled["codes_changed"] > factor * plain["codes_changed"], (fmt, lr, plain, scaled)
            assert scaled["rel_dq"] > plain["rel_dq"] * (1.0 if fmt == "bf16" else 1.1), (fmt, lr, plain, scaled)

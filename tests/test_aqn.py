"""QeRL adaptive quantization noise (AQN): the sigma schedule, seeding, and the noise in a real vLLM engine."""

from __future__ import annotations

import math

import pytest
import torch

from qrl_megatron.config import AlgoConfig, AQNConfig, ConfigError
from qrl_megatron.rollout.aqn import (
    AQN_NORM_PATTERN,
    AdaptiveQuantizationNoise,
    add_norm_noise,
    aqn_sigma,
    aqn_stage,
    noise_seed,
    norm_noise,
)

ON = AQNConfig(enabled=True, sigma_start=1e-2, sigma_end=5e-4, stages=10)


# --------------------------------------------------------------------------------------------- schedule (unit)
@pytest.mark.unit
def test_stage_boundaries_are_equal_slices_of_the_rl_steps() -> None:
    total = 600
    stages = [aqn_stage(s, total, 10) for s in range(1, total + 1)]
    assert stages == [k for k in range(10) for _ in range(60)]
    # uneven split: every stage is visited, in order, each 2 or 3 steps long
    stages = [aqn_stage(s, 25, 10) for s in range(1, 26)]
    assert sorted(stages) == stages and set(stages) == set(range(10))
    assert {stages.count(k) for k in range(10)} <= {2, 3}
    assert aqn_stage(26, 25, 10) == 9 and aqn_stage(0, 25, 10) == 0  # clamped


@pytest.mark.unit
def test_sigma_is_zero_in_stage_zero_then_geometric_from_start_to_end() -> None:
    total = 600
    assert all(aqn_sigma(s, total, ON) == 0.0 for s in range(1, 61))
    per_stage = [aqn_sigma(60 * k + 1, total, ON) for k in range(1, 10)]
    assert per_stage[0] == pytest.approx(1e-2) and per_stage[-1] == pytest.approx(5e-4)
    ratios = [b / a for a, b in zip(per_stage, per_stage[1:], strict=False)]
    assert ratios == pytest.approx([(5e-4 / 1e-2) ** (1 / 8)] * 8)
    for k, sigma in enumerate(per_stage, start=1):
        assert sigma == pytest.approx(1e-2 * (5e-4 / 1e-2) ** ((k - 1) / 8))
        assert aqn_sigma(60 * k + 60, total, ON) == sigma  # constant within the stage
    assert aqn_sigma(61, total, AQNConfig(enabled=False)) == 0.0


@pytest.mark.unit
def test_two_stages_use_sigma_start_in_the_second_half() -> None:
    cfg = AQNConfig(enabled=True, sigma_start=2e-2, sigma_end=1e-3, stages=2)
    assert [aqn_sigma(s, 10, cfg) for s in range(1, 11)] == [0.0] * 5 + [2e-2] * 5


@pytest.mark.unit
def test_config_defaults_and_errors_name_the_key() -> None:
    cfg = AlgoConfig()
    assert (cfg.aqn.enabled, cfg.aqn.sigma_start, cfg.aqn.sigma_end, cfg.aqn.stages) == (False, 1e-2, 5e-4, 10)
    cfg.validate()
    for bad, key in (({"stages": 1}, "algo.aqn.stages"), ({"sigma_start": 0.0}, "algo.aqn.sigma_start")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            AlgoConfig(aqn=AQNConfig(**bad)).validate()
    with pytest.raises(ConfigError, match=r"algo\.aqn\.sigma_end"):
        AlgoConfig(aqn=AQNConfig(sigma_end=-1e-3)).validate()


@pytest.mark.unit
def test_noise_is_seeded_by_run_step_and_module_name() -> None:
    assert noise_seed(0, 5) == noise_seed(0, 5)
    assert len({noise_seed(s, t) for s in range(3) for t in range(50)}) == 150
    a = norm_noise("model.layers.0.input_layernorm", (4096,), 1e-2, seed=7)
    assert torch.equal(a, norm_noise("model.layers.0.input_layernorm", (4096,), 1e-2, seed=7))
    assert not torch.equal(a, norm_noise("model.layers.1.input_layernorm", (4096,), 1e-2, seed=7))
    assert not torch.equal(a, norm_noise("model.layers.0.input_layernorm", (4096,), 1e-2, seed=8))
    assert a.dtype == torch.float32 and a.std().item() == pytest.approx(1e-2, rel=0.05)
    assert torch.allclose(norm_noise("n", (8,), 5e-2, seed=1), 5 * norm_noise("n", (8,), 1e-2, seed=1))


@pytest.mark.unit
def test_norm_pattern_selects_decoder_layer_norms_only() -> None:
    names = ["model.layers.0.input_layernorm", "model.layers.11.post_attention_layernorm", "layers.3.input_layernorm"]
    assert all(AQN_NORM_PATTERN.search(n) for n in names)
    for other in ("model.norm", "model.layers.0.self_attn.q_norm", "model.layers.0.input_layernorm.weight"):
        assert not AQN_NORM_PATTERN.search(other)


@pytest.mark.unit
def test_add_norm_noise_rounds_once_to_the_weight_dtype() -> None:
    norms = [(f"model.layers.{i}.input_layernorm", torch.nn.Module()) for i in range(2)]
    for _, m in norms:
        m.weight = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    report = add_norm_noise(norms, 1e-2, seed=3)
    z = norm_noise("model.layers.1.input_layernorm", (4096,), 1e-2, seed=3)
    assert torch.equal(norms[1][1].weight, (1.0 + z).to(torch.bfloat16))
    assert report["norms"] == 2 and report["sigma"] == 1e-2
    assert 0.5 < report["changed_fraction"] < 1.0 and report["applied_rms"] == pytest.approx(1e-2, rel=0.15)
    # QeRL's last stage: a bf16 weight of ~1 (spacing 2^-7 / 2^-8) barely moves under sigma = 5e-4
    m = torch.nn.Module()
    m.weight = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    assert add_norm_noise([("model.layers.0.input_layernorm", m)], 5e-4, seed=3)["changed_fraction"] < 0.01


class _FakeEngine:
    def __init__(self, norms: int = 8) -> None:
        self.calls: list[tuple[float, int]] = []
        self.norms = norms

    def add_norm_noise(self, sigma: float, seed: int) -> dict[str, float]:
        self.calls.append((sigma, seed))
        return {"norms": self.norms, "sigma": sigma}


@pytest.mark.unit
def test_schedule_object_calls_the_engine_for_the_next_rollout_only_when_sigma_is_positive() -> None:
    total = 20
    engine, again = _FakeEngine(), _FakeEngine()
    aqn, aqn2 = AdaptiveQuantizationNoise(ON, total, seed=1), AdaptiveQuantizationNoise(ON, total, seed=1)
    sigmas = [aqn(engine, step) for step in range(0, total + 1)]  # after the step-0 sync ... after the last one
    for step in range(0, total + 1):
        aqn2(again, step)
    assert sigmas[:2] == [0.0, 0.0] and sigmas[-1] == 0.0  # rollouts 1-2: stage 0; after the last step: none
    assert sigmas[:-1] == [aqn_sigma(step + 1, total, ON) for step in range(total)]
    assert [s for s, _ in engine.calls] == [s for s in sigmas if s > 0] and len(engine.calls) == 18
    assert engine.calls == again.calls  # reproducible
    assert len({seed for _, seed in engine.calls}) == 18  # fresh noise every sync
    assert AdaptiveQuantizationNoise(ON, total, seed=2)(_FakeEngine(), 5) > 0.0
    assert _FakeEngine().calls == []
    off = _FakeEngine()
    assert AdaptiveQuantizationNoise(AQNConfig(), total, seed=1)(off, 10) == 0.0 and off.calls == []
    with pytest.raises(RuntimeError, match="no decoder-layer RMSNorm"):
        AdaptiveQuantizationNoise(ON, total, seed=1)(_FakeEngine(norms=0), 10)


# --------------------------------------------------------------------------------------------- real engine (e2e)
TEXTS = ["what is 12+34? answer: 46", "compute 7*8 = 56 and 99-1 = 98", "q: 3+4+5 ? a: 12", "x 81-27 = 54 ok"]
SEED = 1234


def _reference_logprobs(model, sequences: list[list[int]]) -> list[list[float]]:
    out = []
    with torch.no_grad():
        for seq in sequences:
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
            out.append([logp[t - 1, seq[t]].item() for t in range(1, len(seq))])
    return out


def _flat(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([x for row in rows for x in row], dtype=torch.float64)


@pytest.mark.e2e
def test_engine_norm_noise_changes_logprobs_reproducibly_and_a_sync_removes_it(tiny_model_dir, tiny_engine) -> None:
    from transformers import AutoModelForCausalLM

    from qrl_megatron.models.base import load_hf_weights

    clean_weights = {k: v for k, v in load_hf_weights(tiny_model_dir).items() if k != "lm_head.weight"}
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    hf_norms = {n: m for n, m in hf.named_modules() if AQN_NORM_PATTERN.search(n)}
    clean_norms = {n: m.weight.detach().clone() for n, m in hf_norms.items()}
    num_layers = hf.config.num_hidden_layers

    def reference(sigma: float) -> list[list[float]]:
        """transformers float32 forward with exactly the engine's noisy norms (clean bf16 + z, rounded to bf16)."""
        with torch.no_grad():
            for name, module in hf_norms.items():
                w = clean_norms[name].to(torch.bfloat16).float()
                noisy = (w + norm_noise(name, w.shape, sigma, SEED)).to(torch.bfloat16).float() if sigma else w
                module.weight.copy_(noisy)
        return _reference_logprobs(hf, sequences)

    engine = tiny_engine  # the session's (tests/conftest.py), with the model's weights
    try:
        sequences = [engine.tokenizer.encode(t) for t in TEXTS]
        clean = engine.prompt_logprobs(sequences)
        checks_clean = engine.parameter_checksums()

        noisy: dict[float, list[list[float]]] = {}
        reports: dict[float, dict[str, float]] = {}
        for sigma in (1e-2, 5e-2, 5e-4):
            engine.load_weights(clean_weights)  # what every sync does: the clean norms come back
            reports[sigma] = engine.add_norm_noise(sigma, SEED)
            noisy[sigma] = engine.prompt_logprobs(sequences)
            if sigma == 1e-2:
                checks_noisy = engine.parameter_checksums()
        # the same seed reproduces the same noise exactly
        engine.load_weights(clean_weights)
        engine.add_norm_noise(1e-2, SEED)
        assert engine.prompt_logprobs(sequences) == noisy[1e-2]
        # a later sync of the clean weights removes the noise
        engine.load_weights(clean_weights)
        restored = engine.prompt_logprobs(sequences)
        assert engine.parameter_checksums() == checks_clean
    finally:
        engine.load_weights(clean_weights)  # the session's engine leaves without noise, whatever failed

    # only the decoder-layer norms moved (not the final norm, not any linear or embedding)
    changed = {n for n in checks_clean if checks_clean[n] != checks_noisy[n]}
    kinds = ("input_layernorm", "post_attention_layernorm")
    expected = {f"model.layers.{i}.{k}.weight" for i in range(num_layers) for k in kinds}
    assert changed == expected, sorted(changed ^ expected)
    assert all(r["norms"] == 2 * num_layers for r in reports.values())

    base = _flat(clean)
    assert (_flat(restored) - base).abs().max().item() < 1e-3
    ref_clean = _flat(reference(0.0))
    print(f"\nAQN on the tiny model ({len(base)} scored tokens, {2 * num_layers} norms, bf16 engine):")
    figures = {}
    for sigma in (5e-4, 1e-2, 5e-2):
        delta = _flat(noisy[sigma]) - base
        ref_delta = _flat(reference(sigma)) - ref_clean
        figures[sigma] = (delta.abs().mean().item(), ref_delta.abs().mean().item())
        err = (delta - ref_delta).abs().mean().item()
        corr = torch.corrcoef(torch.stack([delta, ref_delta]))[0, 1].item() if ref_delta.abs().sum() > 0 else math.nan
        r = reports[sigma]
        print(
            f"  sigma={sigma:g}: applied rms {r['applied_rms']:.2e}, changed {100 * r['changed_fraction']:.0f}% of "
            f"norm elements; mean|dlogprob| engine {figures[sigma][0]:.4f} (max {delta.abs().max().item():.4f}), "
            f"fp32 reference {figures[sigma][1]:.4f}; mean|engine - reference| {err:.4f}, corr {corr:.3f}"
        )
        if sigma >= 1e-2:  # the engine's change is the reference's, up to bf16 arithmetic (~2e-3 nats here)
            assert 0.5 < figures[sigma][0] / figures[sigma][1] < 2.0, figures[sigma]
            assert err < 0.5 * figures[sigma][1] or err < 3e-3, (err, figures[sigma])
            assert corr > (0.9 if sigma == 5e-2 else 0.6), corr
    # to first order the change is linear in sigma: 5x the noise moves the logprobs ~5x as much
    growth = figures[5e-2][0] / figures[1e-2][0]
    print(
        f"  mean|dlogprob| ratio sigma 5e-2 / 1e-2: {growth:.2f} (engine), "
        f"{figures[5e-2][1] / figures[1e-2][1]:.2f} (reference); clean restore max gap "
        f"{(_flat(restored) - base).abs().max().item():.2e}"
    )
    assert 2.5 < growth < 10.0
    # QeRL's last stage (sigma_end 5e-4) rounds away on bf16 norm weights of ~1: the engine reports what it applied
    assert reports[5e-4]["applied_rms"] < 1e-4 and figures[1e-2][0] > 3 * figures[5e-4][0]

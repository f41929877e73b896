"""The vLLM CPU engine: grouped sampling, processed (tempered) logprobs, and in-place weight reload."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.e2e

TEMPERATURE = 0.7


def hf_token_logprobs(model, sequence: list[int], start: int, temperature: float = 1.0) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].float() / temperature
    logp = torch.log_softmax(logits, -1)
    return [logp[t - 1, sequence[t]].item() for t in range(start, len(sequence))]


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)


@pytest.fixture
def engine(tiny_engine):
    return tiny_engine  # tests/conftest.py: one engine per session, the tiny model's weights reloaded per test


def test_groups_and_processed_logprobs(engine, hf_model) -> None:
    prompts = ["12+34=", "7+8=", "99+1="]
    completions = engine.generate(prompts, n=4, temperature=TEMPERATURE, max_new_tokens=6, step=1)
    assert [c.prompt_index for c in completions] == [0] * 4 + [1] * 4 + [2] * 4
    gaps = []
    for c in completions:
        assert len(c.rollout_logprobs) == len(c.token_ids) > 0
        reference = hf_token_logprobs(hf_model, c.prompt_token_ids + c.token_ids, len(c.prompt_token_ids), TEMPERATURE)
        gaps += [abs(a - b) for a, b in zip(c.rollout_logprobs, reference, strict=True)]
        # raw (untempered) logprobs would be off by far more than bf16 noise
        raw = hf_token_logprobs(hf_model, c.prompt_token_ids + c.token_ids, len(c.prompt_token_ids), 1.0)
        assert max(abs(a - b) for a, b in zip(c.rollout_logprobs, raw, strict=True)) > 0.05
    assert max(gaps) < 0.03, f"engine vs transformers logprob gap {max(gaps):.4f}"


def test_sampling_is_seeded(engine) -> None:
    first = engine.generate(["5+5="], n=4, temperature=1.0, max_new_tokens=6, step=3)
    again = engine.generate(["5+5="], n=4, temperature=1.0, max_new_tokens=6, step=3)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]


def test_in_place_reload_updates_every_weight_including_tied_lm_head(engine, hf_model, tiny_model_dir) -> None:
    """Regression: on CPU the tied lm_head kept a stale packed copy of the embedding after reload."""
    from transformers import AutoModelForCausalLM

    sequence = [3, 4, 12, 5, 6, 15, 5, 8, 1]
    before = hf_token_logprobs(hf_model, sequence, 1)
    g = torch.Generator().manual_seed(0)
    new_state = {
        k: (v + 0.05 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
        for k, v in hf_model.state_dict().items()
        if k != "lm_head.weight"
    }
    try:
        engine.load_weights(new_state)
        updated = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        updated.load_state_dict({k: v.float() for k, v in new_state.items()}, strict=False)
        updated.tie_weights()
        expected = hf_token_logprobs(updated, sequence, 1)
        got = engine.prompt_logprobs([sequence])[0]
        assert max(abs(a - b) for a, b in zip(expected, before, strict=True)) > 0.1, "perturbation too small to test"
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 0.03
    finally:
        engine.load_weights(
            {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
        )


def test_dynamic_sampling_keeps_informative_groups(engine) -> None:
    """Groups with all-equal rewards are dropped and refilled; the batch shape never changes."""
    from qrl_megatron.config import QRLConfig
    from qrl_megatron.rollout.stage import PromptSampler, rollout

    cfg = QRLConfig()
    cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt, cfg.rollout.max_new_tokens = 4, 4, 4
    cfg.algo.dynamic_sampling, cfg.algo.dynamic_sampling_max_attempts = True, 3
    prompts = [f"{a}+{a}=" for a in range(10, 30)]
    # the answer of every prompt is one of the engine's own seeded samples for round 1 of step 1, so the first
    # round's groups are mixed unless all samples of a group agree; unrelated answers elsewhere never match
    first = engine.generate(prompts[:4], 4, cfg.rollout.temperature, 4, step=3)
    answers = [first[4 * i].text if first[4 * i].finished else "0" for i in range(4)] + ["nope"] * 16
    sampler = PromptSampler(prompts, answers, seed=0)
    sampler.order = list(range(len(prompts)))[::-1]  # take() pops from the end: prompts 0..3 come first
    result = rollout(engine, sampler, cfg.rollout, cfg.algo, step=1, seq_length=16, pad_id=0)
    metrics = result.metrics
    assert len(result.batch) == 16
    assert 1 <= metrics["rollout_rounds"] <= 3
    kept_informative = metrics["batch_groups_informative"]
    groups = result.batch.advantages.view(4, 4)
    assert kept_informative == pytest.approx(float((groups.abs().sum(1) > 0).float().mean()))
    if metrics["rollout_rounds"] == 3:  # could not fill: the remainder is zero-advantage groups
        assert kept_informative < 1.0

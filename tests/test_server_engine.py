"""The disaggregated rollout engine: a real `vllm serve` on loopback, driven over HTTP.

One server for the module. It must generate what the colocated engine generates, reproduce seeded samples,
take new weights through vLLM's weight-transfer API (start -> buckets -> finish, prefix cache dropped) and
refuse a bucket whose bytes differ from the sender's checksums, naming the tensor.
"""

from __future__ import annotations

import time

import pytest
import torch
from e2e_utils import push_weights

from qrl_megatron.config import RolloutConfig

pytestmark = [pytest.mark.e2e]

MAX_MODEL_LEN = 64
PROMPTS = ["12+34=", "7+8=", "99+1=", "5*6="]
# The server caches KV in blocks of BLOCK_SIZE tokens (the CPU default, 128, is the tiny model's whole context);
# LONG_PROMPT fills one, so a prefix cache not dropped after a weight update would be hit by the next request.
BLOCK_SIZE = 32
LONG_PROMPT = "12+34=46 7+8=15 99+1=100 5*6=30 abc xyz 3+3="
PROBES = [[3, 4, 12, 5, 6, 15, 5, 8, 1], [9, 10, 12, 11, 15, 3, 4]]
NOISE = 0.05


def _cfg() -> RolloutConfig:
    return RolloutConfig(kv_cache_mib=64)


def hf_token_logprobs(model, sequence: list[int], start: int, temperature: float = 1.0) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].float() / temperature
    logp = torch.log_softmax(logits, -1)
    return [logp[t - 1, sequence[t]].item() for t in range(start, len(sequence))]


def _max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


@pytest.fixture
def colocated(tiny_engine):
    """What the colocated engine (the session's, tests/conftest.py; same config) produces on the same model."""
    assert tiny_engine.cfg == _cfg() and tiny_engine.seed == 0
    return {
        "greedy": tiny_engine.greedy(PROMPTS, max_new_tokens=8),
        "sampled": tiny_engine.generate(PROMPTS, n=3, temperature=1.0, max_new_tokens=6, step=2),
        "probes": tiny_engine.prompt_logprobs(PROBES),
    }


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from qrl_megatron.rollout.server_engine import VLLMServerEngine

    start = time.perf_counter()
    eng = VLLMServerEngine(
        str(tiny_model_dir), _cfg(), seed=0, max_model_len=MAX_MODEL_LEN, extra_args=["--block-size", str(BLOCK_SIZE)]
    )
    print(f"\nvllm serve ready in {time.perf_counter() - start:.1f} s at {eng.url}")
    yield eng
    proc = eng.proc
    eng.close()
    assert proc is not None and proc.poll() is not None, "close() must stop the server it started"


@pytest.fixture(scope="module")
def base_weights(tiny_model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(tiny_model_dir / "model.safetensors"))


def _hf_model(tiny_model_dir, weights: dict[str, torch.Tensor]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    result = model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


def test_greedy_matches_colocated(server, colocated) -> None:
    got = server.greedy(PROMPTS, max_new_tokens=8)
    want = colocated["greedy"]
    assert [c.prompt_index for c in got] == list(range(len(PROMPTS)))
    for g, w, prompt in zip(got, want, PROMPTS, strict=True):
        assert g.prompt_token_ids == w.prompt_token_ids == server.tokenizer.encode(prompt)
        assert (g.token_ids, g.text, g.finished) == (w.token_ids, w.text, w.finished)
        assert g.rollout_logprobs == [0.0] * len(g.token_ids)
    # the probe path (prompt_logprobs) agrees with the colocated engine too
    probe_gap = _max_gap(server.prompt_logprobs(PROBES), colocated["probes"])
    print(f"\nprompt_logprobs server vs colocated gap {probe_gap:.2e}")
    assert probe_gap < 1e-3


def test_sampling_is_seeded_and_logprobs_are_processed(server, colocated, tiny_model_dir, base_weights) -> None:
    first = server.generate(PROMPTS, n=3, temperature=1.0, max_new_tokens=6, step=2)
    again = server.generate(PROMPTS, n=3, temperature=1.0, max_new_tokens=6, step=2)
    other = server.generate(PROMPTS, n=3, temperature=1.0, max_new_tokens=6, step=3)
    assert [c.prompt_index for c in first] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.rollout_logprobs for c in first] == [c.rollout_logprobs for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    # same seeds as the colocated engine: same samples (per-prompt seeds, same sampler)
    assert [c.token_ids for c in first] == [c.token_ids for c in colocated["sampled"]]
    colocated_gap = max(
        abs(a - b)
        for g, w in zip(first, colocated["sampled"], strict=True)
        for a, b in zip(g.rollout_logprobs, w.rollout_logprobs, strict=True)
    )
    print(f"\nsampled logprobs server vs colocated gap {colocated_gap:.2e}")
    assert colocated_gap < 1e-3
    # logprobs are of the processed (tempered) distribution; at temperature 0.7 they differ from raw ones
    hf = _hf_model(tiny_model_dir, base_weights)
    tempered = server.generate(PROMPTS[:2], n=2, temperature=0.7, max_new_tokens=6, step=1)
    gaps, raw_gaps = [], []
    for c in tempered:
        assert len(c.rollout_logprobs) == len(c.token_ids) > 0
        seq, start = c.prompt_token_ids + c.token_ids, len(c.prompt_token_ids)
        gaps += [abs(a - b) for a, b in zip(c.rollout_logprobs, hf_token_logprobs(hf, seq, start, 0.7), strict=True)]
        raw_gaps += [abs(a - b) for a, b in zip(c.rollout_logprobs, hf_token_logprobs(hf, seq, start), strict=True)]
    print(f"tempered logprobs vs fp32 HF gap {max(gaps):.4f} (vs untempered {max(raw_gaps):.3f})")
    assert max(gaps) < 0.03 < 0.05 < max(raw_gaps)


def test_weight_transfer_updates_the_served_model(server, tiny_model_dir, base_weights) -> None:
    before = server.prompt_logprobs(PROBES)
    assert len(server.tokenizer.encode(LONG_PROMPT)) > BLOCK_SIZE
    server.generate([LONG_PROMPT], n=1, temperature=1.0, max_new_tokens=4, step=0)  # caches its first block
    g = torch.Generator().manual_seed(0)
    new = {k: (v.float() + NOISE * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base_weights.items()}
    start = time.perf_counter()
    push_weights(server, new)
    push_s = time.perf_counter() - start
    try:
        hf_new = _hf_model(tiny_model_dir, new)
        expected = [hf_token_logprobs(hf_new, s, 1) for s in PROBES]
        got = server.prompt_logprobs(PROBES)
        gap, moved = _max_gap(got, expected), _max_gap(before, expected)
        print(f"\nweight push (2 buckets, HTTP) {push_s:.2f} s; engine vs fp32 HF gap {gap:.4f}; moved {moved:.3f}")
        assert moved > 0.1, "perturbation too small to test"
        assert _max_gap(got, before) > 0.1
        assert gap < 0.03, f"engine vs transformers (new weights) logprob gap {gap:.4f}"
        # generation after the update uses the new weights for the whole prompt: the prefix cache was dropped
        sample = server.generate([LONG_PROMPT], n=1, temperature=1.0, max_new_tokens=4, step=0)[0]
        seq = sample.prompt_token_ids + sample.token_ids
        ref = hf_token_logprobs(hf_new, seq, len(sample.prompt_token_ids))
        gen_gap = max(abs(a - b) for a, b in zip(sample.rollout_logprobs, ref, strict=True))
        print(f"generation after update vs fp32 HF gap {gen_gap:.4f}")
        assert gen_gap < 0.03
    finally:
        push_weights(server, base_weights)
    assert _max_gap(server.prompt_logprobs(PROBES), before) < 1e-3


def test_corrupted_bucket_is_refused_by_name(server, base_weights) -> None:
    from qrl_megatron.bridge.checksum import WeightVerificationError

    before = server.prompt_logprobs(PROBES)
    victim = "model.layers.1.mlp.down_proj.weight"
    assert victim in base_weights
    with pytest.raises(WeightVerificationError, match=victim.replace(".", r"\.")) as info:
        push_weights(server, base_weights, corrupt=victim)
    print(f"\nrefused: {info.value}")
    # the update can be redone after a refusal, and the served model never saw the damaged tensor
    push_weights(server, base_weights)
    assert _max_gap(server.prompt_logprobs(PROBES), before) < 1e-3


def test_connecting_to_a_running_server(server, tiny_model_dir) -> None:
    """``url=...`` reaches an existing server and close() leaves it running."""
    from qrl_megatron.rollout.server_engine import VLLMServerEngine

    client = VLLMServerEngine(str(tiny_model_dir), _cfg(), seed=0, max_model_len=MAX_MODEL_LEN, url=server.url + "/")
    assert client.proc is None and client.url == server.url
    assert client.greedy(PROMPTS[:1], 4)[0].token_ids == server.greedy(PROMPTS[:1], 4)[0].token_ids
    client.close()
    assert server.proc is not None and server.proc.poll() is None
    assert server.prompt_logprobs(PROBES[:1])


def test_a_server_that_dies_at_startup_is_reported_with_its_log(tiny_model_dir, tmp_path) -> None:
    import json
    import os
    import re
    import shutil

    from qrl_megatron.rollout.server_engine import VLLMServerEngine

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchArchitectureForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match=r"vllm serve exited with code (?s:.*)NoSuchArchitectureForCausalLM") as info:
        VLLMServerEngine(str(broken), _cfg(), seed=0, max_model_len=MAX_MODEL_LEN, startup_timeout_s=300)
    log = re.search(r"\(log: (\S+)\)", str(info.value))
    assert log is not None and os.path.isfile(log.group(1)), "the failed server's log is kept and named"
    shutil.rmtree(os.path.dirname(log.group(1)))

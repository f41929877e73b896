"""Memory discipline of the learner: activation recompute, chunked logprobs/entropy, token-budget micro-batches,
and the device path (one CUDA step, gpu-marked)."""

from __future__ import annotations

import pytest
import torch
from _learner_dist_workers import SEQ_LENGTH, rollout_like_batch

from qrl_megatron.algos.policy_loss import grpo_loss
from qrl_megatron.config import AlgoConfig, ConfigError, LearnerConfig
from qrl_megatron.learner.activations import SavedTensorMeter, measure_saved_activation_bytes
from qrl_megatron.learner.batch import token_budget_groups
from qrl_megatron.learner.config import LoRAConfig
from qrl_megatron.learner.learner import Learner, token_logprobs_and_entropy

# the entropy bonus makes the entropy term carry gradient too
LOSS = grpo_loss(AlgoConfig(clip_low=0.2, clip_high=0.28, entropy_coef=0.05))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """World size 1 in this process; the tiny model's spec, layout and HF weights."""
    from qrl_megatron.models.base import load_hf_weights
    from qrl_megatron.models.registry import load_spec
    from qrl_megatron.platform import destroy_distributed, init_distributed

    layout = init_distributed(1, 1, seed=0)
    yield load_spec(tiny_model_dir), layout, load_hf_weights(tiny_model_dir)
    destroy_distributed()


def _learner(tiny, **cfg) -> Learner:
    spec, layout, weights = tiny
    config = LearnerConfig(lr=1e-3, **{"micro_batch_size": 4, **cfg})
    return Learner(spec, layout, config, weights, lr=config.lr, seq_length=SEQ_LENGTH)


def _batch(vocab_size: int, size: int = 8):
    batch = rollout_like_batch(vocab_size, size)
    batch.old_logprobs = batch.rollout_logprobs + 0.1 * batch.loss_mask * torch.sign(batch.advantages)[:, None]
    return batch


def _step(learner: Learner, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """One train step's loss and the gradients it computed (DDP's main_grad, before the optimizer moved on)."""
    loss = learner.train_step(batch, LOSS, batch.num_tokens, len(batch))["loss"]
    grads = {n: p.main_grad.clone() for n, p in learner.model.module.named_parameters() if p.requires_grad}
    return loss, grads


# ------------------------------------------------------------------------------------------------ config keys
@pytest.mark.unit
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("recompute", "some", "learner.recompute='some' is not allowed"),
        ("micro_batch_tokens", -1, "learner.micro_batch_tokens=-1 must be >= 0"),
        ("logprob_chunk_tokens", -8, "learner.logprob_chunk_tokens=-8 must be >= 0"),
    ],
)
def test_memory_keys_are_validated(key, value, message):
    with pytest.raises(ConfigError, match=message):
        LearnerConfig(**{key: value}).validate()


# ------------------------------------------------------------------------------------------------ recompute
@pytest.mark.unit
def test_recompute_keeps_loss_and_gradients_and_saves_fewer_activations(tiny):
    spec = tiny[0]
    batch = _batch(spec.vocab_size)
    results, saved = {}, {}
    for mode in ("none", "selective", "full"):
        for lora in (0, 4):
            learner = _learner(tiny, recompute=mode, lora=LoRAConfig(rank=lora))
            saved[mode, lora] = measure_saved_activation_bytes(learner, batch)
            results[mode, lora] = _step(learner, batch)
    for lora in (0, 4):
        ref_loss, ref_grads = results["none", lora]
        for mode in ("selective", "full"):
            loss, grads = results[mode, lora]
            assert loss == ref_loss, (mode, lora)
            assert grads.keys() == ref_grads.keys()
            for name in ref_grads:  # the same operations on the same inputs: bit for bit
                assert torch.equal(grads[name], ref_grads[name]), (mode, lora, name)
        assert saved["none", lora] > saved["selective", lora] > saved["full", lora] > 0, saved
    assert any(g.abs().sum() > 0 for g in results["full", 4][1].values())


# ------------------------------------------------------------------------------------------------ chunked logprobs
def _logits_and_labels(tokens: int = 45, vocab: int = 96, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, tokens // 3, vocab, generator=g) * 4).to(dtype)
    return logits, torch.randint(0, vocab, (3, tokens // 3), generator=g)


def _value_and_grads(logits, labels, chunk: int):
    x = logits.detach().clone().requires_grad_()
    logp, entropy = token_logprobs_and_entropy(x, labels, temperature=0.7, chunk_tokens=chunk)
    weights = torch.linspace(-1, 1, logp.numel()).view_as(logp)
    (x_grad_both,) = torch.autograd.grad((logp * weights).sum() + (entropy * weights.flip(-1)).sum(), x)
    y = logits.detach().clone().requires_grad_()
    logp_only, _ = token_logprobs_and_entropy(y, labels, temperature=0.7, chunk_tokens=chunk)
    (x_grad_logp,) = torch.autograd.grad((logp_only * weights).sum(), y)  # entropy unused: no gradient from it
    return logp, entropy, x_grad_both, x_grad_logp


@pytest.mark.unit
@pytest.mark.parametrize("chunk", [1, 7, 15, 45, 1024])  # 7 does not divide the 45 tokens, 15 does
def test_chunked_logprobs_and_entropy_equal_the_unchunked_ones(tiny, chunk):
    logits, labels = _logits_and_labels()
    for want, got in zip(_value_and_grads(logits, labels, 0), _value_and_grads(logits, labels, chunk), strict=True):
        assert torch.equal(got, want)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs_save_no_full_vocabulary_fp32_tensor(tiny, dtype):
    logits, labels = _logits_and_labels(tokens=300, vocab=512, dtype=dtype)
    full_fp32 = logits[..., 0].numel() * logits.shape[-1] * 4
    saved = {}
    for chunk in (0, 32):
        x = logits.clone().requires_grad_()
        with SavedTensorMeter(exclude=[x]) as meter:
            token_logprobs_and_entropy(x, labels, chunk_tokens=chunk)
        saved[chunk] = meter.bytes
    # chunked: only the labels besides the logits themselves; unchunked: the fp32 log-softmax and more
    assert saved[32] == labels.numel() * 8
    assert saved[0] >= full_fp32 > saved[32]


# ------------------------------------------------------------------------------------------------ token budget
@pytest.mark.unit
def test_token_budget_groups_are_sorted_greedy_and_deterministic():
    lengths = [5, 13, 3, 9, 5, 16, 2, 8]
    groups = token_budget_groups(lengths, budget=32, max_length=16)
    # ascending length, ties in batch order; count x padded longest <= 32; widths rounded up to 8 (cap 16)
    assert groups == [([6, 2, 0, 4], 8), ([7, 3], 16), ([1, 5], 16)]
    assert token_budget_groups(lengths, budget=32, max_length=16) == groups
    assert all(len(rows) * width <= 32 for rows, width in groups)
    assert token_budget_groups([40], budget=16, max_length=48) == [([0], 40)]  # too long alone: a group of one


@pytest.mark.unit
def test_token_budget_micro_batches_keep_loss_and_gradients_with_less_padding(tiny):
    spec = tiny[0]
    batch = _batch(spec.vocab_size)
    by_count = _learner(tiny)
    by_tokens = _learner(tiny, micro_batch_tokens=32)
    groups = by_tokens._microbatches(batch)
    assert by_tokens.device == torch.device("cpu")  # platform.device() without CUDA: the CPU path as before
    padded = sum(mb.tokens.numel() for mb, _ in groups)
    assert len(groups) > 1 and padded < batch.tokens.numel(), (padded, batch.tokens.numel())
    logp, entropy = by_count.logprobs(batch)
    logp_t, entropy_t = by_tokens.logprobs(batch)
    mask = batch.loss_mask > 0
    torch.testing.assert_close(logp_t[mask], logp[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy_t[mask], entropy[mask], rtol=1e-5, atol=1e-5)
    loss, grads = _step(by_count, batch)
    loss_t, grads_t = _step(by_tokens, batch)
    assert loss_t == pytest.approx(loss, rel=1e-5, abs=1e-7)
    for name in grads:
        torch.testing.assert_close(grads_t[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ device
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_train_step_on_cuda(tiny):
    learner = _learner(tiny, micro_batch_tokens=32, recompute="selective")
    assert learner.device.type == "cuda"
    assert all(p.is_cuda for p in learner.model.parameters())
    batch = _batch(tiny[0].vocab_size)
    batch.old_logprobs = learner.logprobs(batch)[0]
    metrics = learner.train_step(batch, LOSS, batch.num_tokens, len(batch))
    assert metrics["update_skipped"] == 0.0 and torch.isfinite(torch.tensor(metrics["loss"]))


# ------------------------------------------------------------------------------------------------ TP2 / PP2
MEMORY_OPTIONS = {"recompute": "full", "micro_batch_tokens": 32, "logprob_chunk_tokens": 5}


@pytest.mark.dist
def test_memory_settings_keep_the_update_at_tp2_and_pp2(tiny, tiny_model_dir):
    """Full recompute, 5-token logprob chunks (TP-gathered chunk by chunk) and variable-shape token-budget
    micro-batches (p2p shapes exchanged at PP2) give the update of the plain one-process learner."""
    from _learner_dist_workers import update_worker
    from dist_utils import each_layout, run_distributed

    threads = torch.get_num_threads()
    try:  # the reference in this process (default settings); the worker pins one thread, give them back
        reference = update_worker(0, 1, 1, 1, 1, str(tiny_model_dir), 2)
    finally:
        torch.set_num_threads(threads)
    layouts = [(2, 1, 1), (1, 2, 1)]
    per_rank = run_distributed(
        each_layout, 2, update_worker, layouts, str(tiny_model_dir), 2, MEMORY_OPTIONS, timeout=300
    )
    mask = reference["loss_mask"] > 0
    for layout in layouts:
        results = [r[layout] for r in per_rank]
        last = next(r for r in results if r["last_stage"] and r["tp_rank"] == 0)
        assert last["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-6), layout
        torch.testing.assert_close(last["new_logprobs"][mask], reference["new_logprobs"][mask], atol=2e-5, rtol=1e-5)
        for key, want in reference["weights"].items():
            torch.testing.assert_close(results[0]["weights"][key], want, atol=2e-5, rtol=1e-4, msg=key)
        assert all(r["saved_activation_bytes"] > 0 for r in results), layout  # every stage measures on its own

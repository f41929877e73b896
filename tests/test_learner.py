"""The learner gives the same losses, logprobs and updated weights whatever the TP/PP/DP layout (gloo)."""

from __future__ import annotations

import pytest
import torch
from _learner_dist_workers import update_worker
from dist_utils import each_layout, run_distributed

LAYOUTS = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "dp2": (1, 1, 2), "tp2pp2": (2, 2, 1)}


def _collect(results: list[dict], dp: int) -> tuple[list[float], torch.Tensor, dict[str, torch.Tensor]]:
    """Losses, per-token logprobs in global batch order (from last-stage TP-rank-0 ranks), weights of rank 0."""
    last = sorted((r for r in results if r["last_stage"] and r["tp_rank"] == 0), key=lambda r: r["dp_rank"])
    assert len(last) == dp
    return last[0]["losses"], torch.cat([r["new_logprobs"] for r in last]), results[0]["weights"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return _collect(run_distributed(update_worker, 1, 1, 1, 1, str(tiny_model_dir), 4, timeout=180), 1)


@pytest.fixture(scope="module")
def layout_results(tiny_model_dir) -> dict[tuple[int, int, int], list[dict]]:
    """layout -> per-rank results; one launch per world size, its layouts one after the other."""
    by_world: dict[int, list[tuple[int, int, int]]] = {}
    for tp, pp, dp in LAYOUTS.values():
        by_world.setdefault(tp * pp * dp, []).append((tp, pp, dp))
    out: dict[tuple[int, int, int], list[dict]] = {}
    for world, layouts in by_world.items():
        per_rank = run_distributed(each_layout, world, update_worker, layouts, str(tiny_model_dir), 2, timeout=480)
        out.update({layout: [r[layout] for r in per_rank] for layout in layouts})
    return out


@pytest.mark.dist
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_update_is_layout_invariant(name, reference, layout_results):
    tp, pp, dp = LAYOUTS[name]
    ref_losses, ref_logprobs, ref_weights = reference
    losses, logprobs, weights = _collect(layout_results[(tp, pp, dp)], dp)
    # same global loss (token mean over all DP ranks and micro-batches), before and after the first update
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert ref_losses[0] != pytest.approx(ref_losses[1], abs=1e-6), "the update changed nothing"
    torch.testing.assert_close(logprobs, ref_logprobs, atol=2e-5, rtol=1e-5)
    assert weights.keys() == ref_weights.keys()
    for key in ref_weights:
        torch.testing.assert_close(weights[key], ref_weights[key], atol=2e-5, rtol=1e-4, msg=key)


@pytest.mark.dist
def test_grpo_step_moves_logprobs_in_the_direction_of_the_advantage(tiny_model_dir):
    from _learner_dist_workers import direction_worker

    result = run_distributed(direction_worker, 1, str(tiny_model_dir), timeout=180)[0]
    change, advantages = result["change"], result["advantages"]
    assert (advantages > 0).any() and (advantages < 0).any()
    assert torch.all(torch.sign(change) == torch.sign(advantages)), (change, advantages)

"""Faults the trainer survives, each injected from the test: a non-finite step, a kill -9, a preemption signal."""

from __future__ import annotations

import math

import pytest
from _fault_workers import nan_step_worker
from dist_utils import run_distributed


@pytest.mark.dist
def test_a_non_finite_loss_on_one_rank_skips_the_step_everywhere_and_leaves_weights_and_adam_untouched(
    tiny_model_dir,
):
    results = run_distributed(nan_step_worker, 2, 2, str(tiny_model_dir), timeout=240)
    for r in results:
        assert r["first_skipped"] == 0.0
        assert r["skipped"] == 1.0 and math.isnan(r["skipped_grad_norm"])
        assert r["weights_untouched"] and r["moments_untouched"]
        assert r["recovered_skipped"] == 0.0 and r["recovered_moved"] and r["recovered_finite"]

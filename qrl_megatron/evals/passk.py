"""pass@k with the unbiased estimator (Chen et al. 2021, arXiv 2107.03374) and mean@k."""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

__all__ = ["mean_at_k", "pass_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them correct, is correct)
    = 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_at_k(correct: Sequence[Sequence[float]], k: int) -> float:
    """Mean correctness of the first k samples of each problem, averaged over problems."""
    if not correct:
        return 0.0
    return sum(sum(row[:k]) / k for row in correct) / len(correct)

"""Held-out evaluation: greedy accuracy, pass@k (unbiased estimator) and mean@k per eval set."""

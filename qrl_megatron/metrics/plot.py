"""Learning curves of one or more runs: held-out accuracy and sampled reward against the RL step.

    .venv/bin/python -m qrl_megatron.metrics.plot runs/tiny-grpo [OTHER_RUN ...] --out curves.png

Reads each run's ``metrics.jsonl`` (``eval_accuracy`` rows from ``trainer.eval_every``) and ``eval.json`` (the
accuracy before RL, drawn at step 0, and after it); the reward is a moving mean over ``--smooth`` steps, because a
single step's batch reward is noisy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qrl_megatron.metrics.logger import read_metrics


def read_run(run_dir: Path) -> dict[str, Any]:
    """Steps, rewards and held-out accuracies of one run folder (ValueError naming what is missing)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl (is this a qrl-train run.dir?)")
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{path}: empty (the run logged no step)")
    evals: list[tuple[int, float]] = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    summary = run_dir / "eval.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        if "before" in data:
            evals.insert(0, (0, data["before"]["accuracy"]))
        if "after" in data and (not evals or evals[-1][0] != rows[-1]["step"]):
            evals.append((rows[-1]["step"], data["after"]["accuracy"]))
    return {
        "name": run_dir.name,
        "steps": [r["step"] for r in rows],
        "reward": [r["reward_mean"] for r in rows],
        "evals": evals,
    }


def moving_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(run_dirs: list[Path], out: Path, smooth: int = 10, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_run(d) for d in run_dirs]
    fig, (acc_ax, reward_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        steps, accuracy = zip(*run["evals"], strict=True) if run["evals"] else ((), ())
        acc_ax.plot(steps, accuracy, marker="o", label=run["name"])
        reward_ax.plot(run["steps"], moving_mean(run["reward"], smooth), label=run["name"])
    acc_ax.set(xlabel="RL step", ylabel="held-out greedy accuracy", title="held-out accuracy")
    reward_ax.set(xlabel="RL step", ylabel=f"sampled reward (mean of {smooth} steps)", title="rollout reward")
    for ax in (acc_ax, reward_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (qrl-train run.dir)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--smooth", type=int, default=10, help="moving-mean window of the reward curve (steps)")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth must be >= 1, got {args.smooth}")
    try:
        print(plot_runs(args.runs, args.out, args.smooth, args.title))
    except ValueError as e:
        print(f"qrl_megatron.metrics.plot: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-step metrics: `metrics.jsonl` (one JSON object per step), TensorBoard events and a live progress line."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

PROGRESS_FIELDS = (
    ("reward_mean", "reward {:.3f}"),
    ("accuracy", "acc {:.3f}"),
    ("time_rollout_s", "rollout {:.2f}s"),
    ("time_train_s", "train {:.2f}s"),
    ("sync_seconds", "sync {:.2f}s"),
    ("rollout_tokens_per_s", "{:.0f} tok/s"),
    ("logprob_diff_abs_mean", "|Δlogp| {:.4f}"),
)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows :class:`MetricsLogger` wrote to ``run_dir/metrics.jsonl`` (FileNotFoundError if there is none)."""
    text = (Path(run_dir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = True,
        progress: bool = True,
        total_steps: int = 0,
        resume_step: int = 0,
    ) -> None:
        """``resume_step > 0``: continue a run resumed from that step's checkpoint -- the rows it had logged after
        that step (the steps a crash lost) are dropped from ``metrics.jsonl`` and TensorBoard, so the resumed run
        logs each step exactly once."""
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        if resume_step > 0:
            lines = path.read_text().splitlines() if path.is_file() else []
            # a kill mid-write can leave the last line cut short; it is past the checkpoint, so it is dropped
            rows = [json.loads(line) for line in lines[:-1] if line.strip()]
            if lines and lines[-1].strip():
                with contextlib.suppress(json.JSONDecodeError):
                    rows.append(json.loads(lines[-1]))
            kept = [row for row in rows if row["step"] <= resume_step]
            if len(kept) != resume_step:
                raise ValueError(
                    f"{path} holds {len(kept)} rows up to step {resume_step}, expected {resume_step}: it is not the "
                    "log of the run being resumed; resume in the run's own run.dir"
                )
            partial = path.with_suffix(".jsonl.partial")
            partial.write_text("".join(json.dumps(row) + "\n" for row in kept))
            partial.replace(path)
        self.jsonl: TextIO = path.open("a" if resume_step > 0 else "w")
        self.total = total_steps
        self.progress = progress
        self.started = time.perf_counter()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides events at or after it that an earlier (crashed) writer left behind
            self.writer = SummaryWriter(str(self.dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
        if self.progress:
            self._print_progress(step, record)

    def _print_progress(self, step: int, record: dict[str, Any]) -> None:
        parts = [f"step {step}/{self.total}" if self.total else f"step {step}"]
        parts += [fmt.format(record[key]) for key, fmt in PROGRESS_FIELDS if key in record]
        parts.append(f"{time.perf_counter() - self.started:.0f}s")
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value

"""The learning-curve plot reads a run folder as qrl-train writes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qrl_megatron.metrics.plot import main, moving_mean, read_run

pytestmark = pytest.mark.unit


def _run(tmp_path: Path, name: str = "run") -> Path:
    run = tmp_path / name
    run.mkdir()
    rows = [{"step": s, "reward_mean": 0.5 + s / 100} for s in range(1, 11)]
    rows[4]["eval_accuracy"] = 0.6
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval.json").write_text(json.dumps({"before": {"accuracy": 0.5}, "after": {"accuracy": 0.7}}))
    return run


def test_read_run_puts_before_and_after_around_the_periodic_evals(tmp_path: Path) -> None:
    run = read_run(_run(tmp_path))
    assert run["evals"] == [(0, 0.5), (5, 0.6), (10, 0.7)]
    assert run["steps"] == list(range(1, 11))


def test_moving_mean() -> None:
    assert moving_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    assert main([str(_run(tmp_path, "a")), str(_run(tmp_path, "b")), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_without_metrics_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no metrics.jsonl" in err and "\n" not in err

"""End-to-end on a math task: `qrl-train` on a GSM8K-schema file with the math verifier, then `qrl-eval`.

The tiny model cannot solve GSM8K (and its character tokenizer lacks upper case and punctuation: such prompts are
kept and counted as `lossy_tokenization`), so the run checks the pipeline, not learning: the rows are accounted
for, rewards stay in [0, 1], the reward time is measured, pass@k / mean@k / greedy accuracy reach the metrics and
eval.json, and qrl-eval evaluates a model folder with the same code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


def _gsm8k_file(path: Path, count: int, bad: tuple[int, ...] = ()) -> Path:
    rows = [
        {"question": f"Tom has {i} apples and buys {i % 5 + 1} more. How many apples?", "answer": f"#### {2 * i % 97}"}
        for i in range(count)
    ]
    for i in bad:
        rows[i]["answer"] = "the final line is missing"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    assert result.returncode == 0, f"{args[2]} failed ({result.returncode}):\n{result.stderr[-6000:]}"
    return result


def test_gsm8k_file_trains_and_evaluates(tmp_path: Path) -> None:
    train = _gsm8k_file(tmp_path / "train.jsonl", 24, bad=(5,))
    test = _gsm8k_file(tmp_path / "test.jsonl", 6)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    result = _run(
        [
            sys.executable, "-m", "qrl_megatron.cli", "configs/tiny_cpu.yaml",
            f"run.dir={run_dir}", f"run.cache_dir={cache}", "run.progress=false",
            "task.name=gsm8k", f"task.data_files={train}", f"task.eval_files={test}", "task.prompt.preset=boxed",
            "warmstart.enabled=false", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
            "rollout.max_new_tokens=8", "algo.dynamic_sampling=false", "trainer.max_steps=2", "trainer.eval_every=2",
            "eval.k=[1,4]", "trainer.checkpoint=false", "reward.workers=1",
        ],
        timeout=600,
    )  # fmt: skip
    # the start-up lines: the accounting (with the skipped row named) and the rendered first prompt
    assert "train: 23 of 24 rows used; skipped 1: unparseable_answer 1 (rows [5]; first: {'question'" in result.stdout
    assert "lossy_tokenization" in result.stdout
    assert "first prompt (train):\nTom has 0 apples" in result.stdout and "\\boxed{}" in result.stdout

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["reward_mean"] <= 1.0
        assert row["time_reward_s"] > 0 and row["reward_timeouts"] == 0
    assert rows[0]["data/train/skipped_unparseable_answer"] == 1 and rows[0]["data/train/used"] == 23
    assert {"eval_accuracy", "eval/eval/pass@1", "eval/eval/pass@4", "eval/eval/mean@4"} <= rows[1].keys()

    evals = json.loads((run_dir / "eval.json").read_text())
    for when in ("before", "after"):
        assert evals[when]["num_problems"] == 6
        for key in ("accuracy", "pass@1", "pass@4", "mean@4"):
            assert 0.0 <= evals[when][key] <= 1.0
        assert evals[when]["pass@4"] >= evals[when]["pass@1"]
    assert evals["data"]["train"]["skipped_unparseable_answer"] == 1

    # qrl-eval on a model folder (the tiny base model the run built), with the same task and verifier
    model = next(cache.glob("tiny-*"))
    out = tmp_path / "qrl_eval.json"
    _run(
        [sys.executable, "-m", "qrl_megatron.evals.cli", str(model), "--task", "gsm8k", f"task.eval_files={test}",
         "eval.k=[1,2]", "rollout.max_new_tokens=8", f"run.cache_dir={cache}", "--out", str(out)],
        timeout=400,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["sets"]["eval"]["num_problems"] == 6
    assert 0.0 <= report["sets"]["eval"]["pass@2"] <= 1.0

"""The math verifier (real math-verify), its worker pool with a deadline, the format reward and the scorer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from qrl_megatron.config import ConfigError, load_config
from qrl_megatron.rewards import MATH_VERIFIER, math_reward
from qrl_megatron.rewards.config import RewardConfig
from qrl_megatron.rewards.format import format_reward
from qrl_megatron.rewards.pool import RewardError, RewardPool
from qrl_megatron.rewards.scorer import RewardScorer, verifier_name
from qrl_megatron.rewards.verifier import answer_span, verify_math
from qrl_megatron.rollout.engine import Completion

pytestmark = pytest.mark.unit

# (completion, ground truth, verdict)
TABLE = [
    # \boxed, nesting
    ("The answer is \\boxed{72}.", "72", 1.0),
    ("\\boxed{73}", "72", 0.0),
    ("\\boxed{\\boxed{5}}", "5", 1.0),
    ("first \\boxed{3}, finally \\boxed{5}", "5", 1.0),
    ("\\boxed{}", "5", 0.0),
    # fractions vs decimals, \frac vs \dfrac
    ("0.5", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac12}", "\\dfrac{1}{2}", 1.0),
    ("\\boxed{0.33}", "\\frac{1}{3}", 0.0),
    ("Answer: \\frac{3}{4}", "0.75", 1.0),
    ("\\boxed{\\tfrac{3}{4}}", "3/4", 1.0),
    # GSM8K #### lines, thousands separators
    ("so she has #### 1,000", "1000", 1.0),
    ("#### 1000", "1,000", 1.0),
    ("#### 18.00", "18", 1.0),
    ("#### 17", "18", 0.0),
    ("Answer: 1,234,567", "1234567", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0),
    # negative numbers
    ("#### -5", "-5", 1.0),
    ("#### 5", "-5", 0.0),
    ("\\boxed{-\\frac{2}{3}}", "-\\frac{2}{3}", 1.0),
    ("\\boxed{\\frac{2}{3}}", "-\\frac{2}{3}", 0.0),
    # Answer: lines and <answer> tags
    ("Answer: 18", "18", 1.0),
    ("<think>6*3</think><answer>18</answer>", "18", 1.0),
    ("<think>the answer is 42</think><answer>41</answer>", "42", 0.0),
    ("<think>x</think><answer>\\boxed{\\frac{1}{2}}</answer>", "0.5", 1.0),
    # units, percent, currency
    ("\\boxed{10 \\text{ cm}}", "10", 1.0),
    ("\\boxed{10\\,\\text{cm}^2}", "10", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{\\$18}", "18", 1.0),
    # sets and intervals
    ("\\boxed{[1,2]}", "[1,2]", 1.0),
    ("\\boxed{(1,2)}", "[1,2]", 0.0),
    ("\\boxed{(0,1)}", "(0, 1)", 1.0),
    ("\\boxed{\\{1,2,3\\}}", "\\{3,2,1\\}", 1.0),
    ("\\boxed{(-\\infty, 2]}", "(-\\infty,2]", 1.0),
    ("\\boxed{(-\\infty, 2)}", "(-\\infty,2]", 0.0),
    # symbolic equivalence
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("\\boxed{3\\sqrt{2}}", "\\sqrt{18}", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{2\\pi}", "2\\pi", 1.0),
    ("\\boxed{6.28}", "2\\pi", 0.0),
    ("\\boxed{x=3}", "3", 1.0),
    ("\\boxed{\\text{(B)}}", "B", 1.0),
    # no marker: the last number of the text
    ("I think it's 7", "7", 1.0),
    ("I think it's 7 or 8", "7", 0.0),
    ("", "5", 0.0),
    ("no answer here", "5", 0.0),
]


def test_table_is_large_and_balanced() -> None:
    assert len(TABLE) >= 40
    assert sum(v == 0.0 for *_, v in TABLE) >= 12


@pytest.mark.parametrize(("completion", "ground_truth", "verdict"), TABLE)
def test_verifier_table(completion: str, ground_truth: str, verdict: float) -> None:
    assert verify_math(completion, ground_truth) == verdict


def test_math_reward_goes_through_the_pool() -> None:
    assert math_reward("The total is \\boxed{\\dfrac{6}{4}}", "1.5") == 1.0
    assert math_reward("#### 3", "4") == 0.0
    assert type(math_reward("#### 3", "3")) is float


@pytest.mark.parametrize("bad", ["\\boxed{9^{9^{9^{9^{9}}}}}", "\\boxed{(10^{10^{10}})!}"])
def test_pathological_input_scores_zero_within_the_timeout(bad: str) -> None:
    math_reward("#### 1", "1", timeout_s=1.5)  # the worker is up: time only the call
    start = time.monotonic()
    assert math_reward(bad, "1", timeout_s=1.5) == 0.0
    assert time.monotonic() - start < 1.5 + 1.0
    assert math_reward("#### 1", "1", timeout_s=1.5) == 1.0  # the replacement worker answers


def test_answer_span_conventions() -> None:
    assert answer_span("<think>a</think><answer> 5 </answer>") == ("answer_tag", "5")
    assert answer_span("x #### 12\n")[0] == "hashes"
    assert answer_span("work\nAnswer: 7")[1] == "7"
    assert answer_span("just 3")[0] == "whole"


def test_pool_keeps_order_and_counts_timeouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "slow_reward.py").write_text(
        "import time\n"
        "def score(completion, ground_truth):\n"
        "    if completion == 'hang':\n"
        "        time.sleep(60)\n"
        "    return float(completion == ground_truth)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    pairs = [("a", "a"), ("hang", "x"), ("b", "c"), ("d", "d"), ("hang", "y"), ("e", "e")]
    with RewardPool("slow_reward:score", workers=2, timeout_s=1.0) as pool:
        start = time.monotonic()
        result = pool.map(pairs)
        assert time.monotonic() - start < 20
    assert result.values == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert result.timeouts == 2 and sorted(result.timed_out) == [1, 4]


def test_plugin_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bad_reward.py").write_text("def score(c, g):\n    raise KeyError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with (
        pytest.raises(RewardError, match="bad_reward:score.*raised KeyError"),
        RewardPool("bad_reward:score", 1) as pool,
    ):
        pool.map([("x", "y")])
    with pytest.raises(RewardError, match="cannot import 'no_such_module_xyz'"):
        RewardPool("no_such_module_xyz:score")
    with pytest.raises(RewardError, match="has no callable 'nope'"):
        RewardPool("bad_reward:nope")


def test_format_reward() -> None:
    assert format_reward("<think>r</think><answer>4</answer>", "qerl") == 1.0
    assert format_reward("<think>r</think> 4", "qerl") == 0.0
    assert format_reward("<answer>4</answer><think>r</think>", "qerl") == 0.0
    assert format_reward("steps\nAnswer: 4", "dapo") == 1.0
    assert format_reward("Answer: 4\nmore text", "dapo") == 0.0
    assert format_reward("so \\boxed{4}", "boxed") == 1.0
    assert format_reward("4", "boxed") == 0.0
    assert format_reward("anything", "none") == 1.0


def _completion(text: str, index: int = 0, finished: bool = True) -> Completion:
    return Completion(index, [1], [2], [0.0], text, finished)


def test_scorer_mixes_format_and_zeroes_truncated() -> None:
    cfg = RewardConfig(fn="math", format="qerl", format_weight=0.2, workers=1)
    scorer = RewardScorer(cfg, "gsm8k")
    try:
        completions = [
            _completion("<think>a</think><answer>4</answer>"),  # right, formatted
            _completion("#### 4"),  # right, unformatted
            _completion("<think>a</think><answer>5</answer>"),  # wrong, formatted
            _completion("<think>a</think><answer>4</answer>", finished=False),  # truncated: correctness 0
        ]
        rewards, metrics = scorer(completions, ["4"])
    finally:
        scorer.close()
    assert rewards.tolist() == pytest.approx([1.0, 0.8, 0.2, 0.2])
    assert float(rewards.min()) >= 0.0 and float(rewards.max()) <= 1.0
    assert metrics["reward_correct_mean"] == pytest.approx(0.5) and metrics["reward_format_mean"] == 0.75
    assert metrics["time_reward_s"] > 0 and metrics["reward_timeouts"] == 0


def test_verifier_choice_and_config_checks() -> None:
    assert verifier_name(RewardConfig(), "arithmetic") == "exact"
    assert verifier_name(RewardConfig(), "gsm8k") == MATH_VERIFIER
    assert verifier_name(RewardConfig(fn="mypkg.rewards:score"), "gsm8k") == "mypkg.rewards:score"
    cfg = load_config(None, ["reward.fn=mypkg.rewards:score", "reward.timeout_s=2"])
    assert cfg.reward.fn == "mypkg.rewards:score"
    for bad, key in [("reward.fn=not a function", "reward.fn"), ("reward.format=xml", "reward.format"),
                     ("reward.format_weight=0.5", "reward.format_weight"), ("reward.timeout_s=0", "reward.timeout_s")]:  # fmt: skip
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [bad])

"""The arithmetic task, local data files, and the exact-answer verifier."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest

from qrl_megatron.config import ConfigError, TaskConfig
from qrl_megatron.data.arithmetic import load_task, make_problems
from qrl_megatron.rewards.arithmetic import exact_answer_reward, extract_answer

pytestmark = pytest.mark.unit

PROBLEM = re.compile(r"(\d+)([+\-*])(\d+)=")


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private Hugging Face cache: `datasets` read its cache path at import time, so patch that too."""
    home = tmp_path / "hf_home"
    cache = home / "datasets"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


# --------------------------------------------------------------------------------------------- synthetic problems
def test_make_problems_is_deterministic_per_seed() -> None:
    cfg = TaskConfig(num_train=50, num_eval=10, operations="+-*")
    first = make_problems(cfg, seed=3)
    assert first == make_problems(cfg, seed=3)
    other = make_problems(cfg, seed=4)
    assert other != first
    assert [p["prompt"] for p in other] != [p["prompt"] for p in first]


def test_problems_are_unique_and_answers_correct() -> None:
    cfg = TaskConfig(num_train=400, num_eval=100, operations="+-*", min_digits=1, max_digits=3)
    problems = make_problems(cfg, seed=0)
    prompts = [p["prompt"] for p in problems]
    assert len(prompts) == len(set(prompts)) == 500
    ops_seen = set()
    for problem in problems:
        match = PROBLEM.fullmatch(problem["prompt"])
        assert match, problem
        a, op, b = match.groups()
        ops_seen.add(op)
        for operand in (a, b):
            assert 1 <= len(operand) <= 3
            assert operand == str(int(operand))  # no leading zeros
        assert isinstance(problem["answer"], str)
        assert int(problem["answer"]) == eval(problem["prompt"][:-1])  # the prompt is digits and one operator
    assert ops_seen == {"+", "-", "*"}
    assert any(int(p["answer"]) < 0 for p in problems)  # subtraction produces negative answers


def test_min_digits_is_respected() -> None:
    problems = make_problems(TaskConfig(num_train=200, num_eval=20, min_digits=2, max_digits=2), seed=1)
    for problem in problems:
        a, op, b = PROBLEM.fullmatch(problem["prompt"]).groups()
        assert op == "+"
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99


def test_whole_space_can_be_drawn() -> None:
    # 1-digit operands 0..9 with '+': exactly 100 distinct problems
    problems = make_problems(TaskConfig(num_train=90, num_eval=10, min_digits=1, max_digits=1), seed=0)
    assert {p["prompt"] for p in problems} == {f"{a}+{b}=" for a in range(10) for b in range(10)}


@pytest.mark.parametrize(
    ("cfg", "space"),
    [
        (TaskConfig(num_train=90, num_eval=11, min_digits=1, max_digits=1), 100),
        (TaskConfig(num_train=8000, num_eval=101, min_digits=2, max_digits=2), 8100),  # 90 * 90
        (TaskConfig(num_train=16000, num_eval=201, min_digits=2, max_digits=2, operations="+-"), 16200),
    ],
)
def test_too_many_problems_names_the_keys(cfg: TaskConfig, space: int) -> None:
    with pytest.raises(ConfigError) as info:
        make_problems(cfg, seed=0)
    message = str(info.value)
    for part in ("task.num_train", "task.num_eval", "task.max_digits", f"{cfg.num_train + cfg.num_eval}", f"{space}"):
        assert part in message, (part, message)


def test_load_task_arithmetic_splits_are_disjoint() -> None:
    cfg = TaskConfig(num_train=300, num_eval=40, operations="+-")
    task = load_task(cfg, seed=7)
    assert set(task.keys()) == {"train", "eval"}
    assert len(task["train"]) == 300 and len(task["eval"]) == 40
    assert task["train"].column_names == ["prompt", "answer"]
    train, held_out = set(task["train"]["prompt"]), set(task["eval"]["prompt"])
    assert len(train) == 300 and len(held_out) == 40
    assert not train & held_out
    problems = make_problems(cfg, seed=7)
    assert list(task["train"]["prompt"]) + list(task["eval"]["prompt"]) == [p["prompt"] for p in problems]


# --------------------------------------------------------------------------------------------- task.name=files
def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_files_jsonl_with_default_eval_split(tmp_path: Path, hf_cache: Path) -> None:
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1), "source": "x"} for i in range(6)]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    task = load_task(TaskConfig(name="files", data_files=str(data), num_eval=2), seed=0)
    assert task["train"].column_names == ["prompt", "answer"]  # extra columns dropped
    assert list(task["train"]["prompt"]) == ["0+1=", "1+1=", "2+1=", "3+1="]
    assert list(task["eval"]["prompt"]) == ["4+1=", "5+1="]
    assert list(task["eval"]["answer"]) == ["5", "6"]
    assert hf_cache.is_dir() and any(hf_cache.iterdir())  # the cache went to tmp, not the user's


def test_files_parquet_with_integer_answers_and_eval_file(tmp_path: Path, hf_cache: Path) -> None:
    train_file = tmp_path / "train.parquet"
    datasets.Dataset.from_dict({"prompt": ["1+1=", "2+2=", "3+3="], "answer": [2, 4, -6]}).to_parquet(str(train_file))
    eval_file = _write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "9*9=", "answer": 81}])
    task = load_task(TaskConfig(name="files", data_files=str(train_file), eval_files=str(eval_file)), seed=0)
    assert list(task["train"]["prompt"]) == ["1+1=", "2+2=", "3+3="]
    # answers are strings whatever the file's column type (the warm-start tokenizes them)
    assert list(task["train"]["answer"]) == ["2", "4", "-6"]
    assert list(task["eval"]["answer"]) == ["81"]
    assert task["train"].features["answer"].dtype == "string"


def test_files_missing_column_names_it(tmp_path: Path, hf_cache: Path) -> None:
    data = _write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1=", "answer": "2"}] * 3)
    with pytest.raises(ConfigError) as info:
        load_task(TaskConfig(name="files", data_files=str(data), num_eval=1), seed=0)
    assert "'prompt'" in str(info.value) and "question" in str(info.value)


def test_files_empty_prompt_is_rejected(tmp_path: Path, hf_cache: Path) -> None:
    data = _write_jsonl(tmp_path / "e.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "", "answer": "0"}])
    with pytest.raises(ConfigError, match=r"rows \[1\]"):
        load_task(TaskConfig(name="files", data_files=str(data), num_eval=1), seed=0)


def test_files_missing_file_and_bad_suffix(tmp_path: Path, hf_cache: Path) -> None:
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(ConfigError, match="task.data_files=.*absent.jsonl.*not found"):
        load_task(TaskConfig(name="files", data_files=str(missing)), seed=0)
    text = tmp_path / "rows.txt"
    text.write_text("1+1=\t2\n")
    with pytest.raises(ConfigError, match="task.data_files"):
        load_task(TaskConfig(name="files", data_files=str(text)), seed=0)


def test_files_too_few_rows_for_eval(tmp_path: Path, hf_cache: Path) -> None:
    data = _write_jsonl(tmp_path / "small.jsonl", [{"prompt": f"{i}+0=", "answer": str(i)} for i in range(3)])
    with pytest.raises(ConfigError, match="task.num_eval=3"):
        load_task(TaskConfig(name="files", data_files=str(data), num_eval=3), seed=0)


# --------------------------------------------------------------------------------------------- verifier
@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("95", "95", 1.0),
        ("96", "95", 0.0),
        (" 95\n", "95", 1.0),
        ("\t95 ", "95", 1.0),
        ("9 5", "95", 0.0),
        ("95.", "95", 0.0),
        ("95.0", "95", 0.0),
        ("95abc", "95", 0.0),
        ("ninety-five", "95", 0.0),
        ("", "95", 0.0),
        ("   ", "0", 0.0),
        ("0", "0", 1.0),
        ("-9", "-9", 1.0),
        ("9", "-9", 0.0),
        ("-9", "9", 0.0),
        ("--9", "-9", 0.0),
        ("+9", "9", 0.0),
    ],
)
def test_exact_answer_reward(completion: str, answer: str, reward: float) -> None:
    assert exact_answer_reward(completion, answer) == reward


def test_truncated_completion_scores_zero() -> None:
    assert exact_answer_reward("95", "95", finished=True) == 1.0
    assert exact_answer_reward("95", "95", finished=False) == 0.0
    assert exact_answer_reward("-3", "-3", finished=False) == 0.0


def test_reward_is_a_float() -> None:
    assert type(exact_answer_reward("7", "7")) is float
    assert type(exact_answer_reward("x", "7")) is float


def test_extract_answer() -> None:
    assert extract_answer(" -12 \n") == "-12"
    assert extract_answer("12") == "12"
    assert extract_answer("12 13") is None
    assert extract_answer("1.5") is None
    assert extract_answer("") is None


def test_non_integer_reference_answers_compare_as_text() -> None:
    from qrl_megatron.rewards.arithmetic import exact_answer_reward

    assert exact_answer_reward(" 3.5", "3.5") == 1.0
    assert exact_answer_reward("3", "3.5") == 0.0
    assert exact_answer_reward("blue", "blue ") == 1.0
    assert exact_answer_reward("blue", "blue", finished=False) == 0.0

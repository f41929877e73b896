"""Dataset loaders in the published schemas, through the real `datasets` library, on files the tests write."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from qrl_megatron.config import ConfigError, TaskConfig, load_config
from qrl_megatron.data.config import EvalSetConfig, PromptConfig
from qrl_megatron.data.loader import eval_sets, load_task
from qrl_megatron.data.prompts import PRESET_TEXT, render_prompt
from qrl_megatron.data.schemas import last_boxed
from qrl_megatron.evals.passk import mean_at_k, pass_at_k

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf_home"
    cache = home / "datasets"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def gsm8k_rows(count: int) -> list[dict]:
    return [
        {"question": f"Tom has {i} apples and buys 2 more. How many?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2:,}"}
        for i in range(998, 998 + count)
    ]


# --------------------------------------------------------------------------------------------- schemas
def test_gsm8k_schema_with_eval_file(tmp_path: Path) -> None:
    train = _jsonl(tmp_path / "train.jsonl", gsm8k_rows(5))
    test = _jsonl(tmp_path / "test.jsonl", gsm8k_rows(2))
    task = load_task(TaskConfig(name="gsm8k", data_files=str(train), eval_files=str(test)), seed=0)
    assert task["train"].column_names == ["prompt", "answer"]
    assert list(task["train"]["answer"]) == ["1000", "1001", "1002", "1003", "1004"]  # "1,000" -> "1000"
    assert task["train"]["prompt"][0] == "Tom has 998 apples and buys 2 more. How many?"
    assert len(task["eval"]) == 2 and task.report["train"] == {"rows": 5, "used": 5}


def test_math_schema_answer_column_or_boxed_solution(tmp_path: Path) -> None:
    rows = [
        {"problem": "What is 1/2 + 1/4?", "solution": "So \\boxed{\\frac{3}{4}}.", "answer": None, "level": "Level 1"},
        {"problem": "Simplify.", "solution": "\\boxed{\\frac{\\sqrt{2}}{2}} done", "answer": "\\frac{\\sqrt2}{2}"},
        {"problem": "No final answer.", "solution": "we give up", "answer": None},
    ]
    data = tmp_path / "math.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(data))
    cfg = TaskConfig(name="math", data_files=str(data), eval_files=str(data), max_bad_fraction=0.5)
    task = load_task(cfg, seed=0)
    assert list(task["train"]["answer"]) == ["\\frac{3}{4}", "\\frac{\\sqrt2}{2}"]  # the answer column wins
    assert task.report["train"]["skipped_unparseable_answer"] == 1


def test_dapo_math_verl_parquet(tmp_path: Path) -> None:
    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": f"Solve {i}+1. Answer: $Answer"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": str(i + 1), "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": i},
        }
        for i in range(6)
    ]
    data = tmp_path / "dapo.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(data))
    task = load_task(TaskConfig(name="dapo_math", data_files=str(data), num_eval=2), seed=0)
    assert list(task["train"]["answer"]) == ["1", "2", "3", "4"] and list(task["eval"]["answer"]) == ["5", "6"]
    assert task["train"]["prompt"][0] == "Solve 0+1. Answer: $Answer"  # raw template: the chat list's content


def test_deepscaler_and_aime(tmp_path: Path) -> None:
    deep = _jsonl(tmp_path / "deep.json", [{"problem": f"p{i}", "answer": f"{i}", "solution": "s"} for i in range(4)])
    aime = _jsonl(tmp_path / "aime.jsonl", [{"problem": "Find n.", "answer": 204}, {"problem": "m?", "answer": 33.0}])
    cfg = TaskConfig(
        name="deepscaler",
        data_files=str(deep),
        num_eval=1,
        eval_sets=[
            EvalSetConfig(name="aime24", schema="aime", data_files=str(aime)),
            EvalSetConfig(name="deep_head", data_files=str(deep), limit=2),
        ],
    )
    task = load_task(cfg, seed=0)
    sets = eval_sets(task)
    assert list(sets) == ["eval", "aime24", "deep_head"]  # the main set (last task.num_eval rows), then the extras
    assert list(sets["aime24"]["answer"]) == ["204", "33"]  # integer and float answers become "204", "33"
    assert len(sets["deep_head"]) == 2 and list(task["eval"]["answer"]) == ["3"] and len(task["train"]) == 3


def test_files_with_nested_keys_and_glob(tmp_path: Path) -> None:
    for part in range(2):
        _jsonl(tmp_path / f"part{part}.jsonl", [{"q": {"text": f"{part}{i}?"}, "meta": {"gt": i}} for i in range(3)])
    cfg = TaskConfig(
        name="files", data_files=str(tmp_path / "part*.jsonl"), prompt_key="q.text", answer_key="meta.gt", num_eval=1
    )
    task = load_task(cfg, seed=0)
    assert list(task["train"]["prompt"]) == ["00?", "01?", "02?", "10?", "11?"]
    assert list(task["eval"]["answer"]) == ["2"]


def test_save_to_disk_folder_and_missing_hub_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "gsm8k_disk"
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(gsm8k_rows(4)), test=datasets.Dataset.from_list(gsm8k_rows(2))
    ).save_to_disk(str(folder))
    task = load_task(TaskConfig(name="gsm8k", dataset=str(folder)), seed=0)
    assert len(task["train"]) == 4 and len(task["eval"]) == 2
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as info:
        load_task(TaskConfig(name="gsm8k", dataset="openai/gsm8k", dataset_config="main"), seed=0)
    message = str(info.value)
    assert "\n" not in message and "task.dataset='openai/gsm8k'" in message and "load_dataset" in message


# --------------------------------------------------------------------------------------------- bad rows
def test_bad_rows_are_counted_by_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = gsm8k_rows(16)
    rows[3]["answer"] = "no final line"  # unparseable
    rows[7]["answer"] = None  # missing
    rows[9]["question"] = ""  # missing prompt
    rows[11]["answer"] = "#### \\frac{"  # math-verify cannot read it
    rows[12]["question"] = "x" * 500  # longer than the budget
    data = _jsonl(tmp_path / "gsm.jsonl", rows)
    cfg = TaskConfig(name="gsm8k", data_files=str(data), eval_files=str(data), max_bad_fraction=0.5)
    task = load_task(cfg, seed=0, tokenizer=_tiny_tokenizer(), max_prompt_tokens=100, check_answers=True, workers=1)
    report = task.report["train"]
    assert report["rows"] == 16 and report["used"] == 11
    for reason in ("unparseable_answer", "missing_answer", "missing_prompt", "prompt_too_long"):
        assert report[f"skipped_{reason}"] >= 1, reason
    assert report["skipped_unparseable_answer"] == 2  # row 3 (no ####) and row 11 (math-verify)
    out = capsys.readouterr().out
    assert "skipped 5" in out and "rows [3, 11]" in out and "first prompt" in out


def test_too_many_bad_rows_stop_the_run(tmp_path: Path) -> None:
    rows = gsm8k_rows(10)
    for i in (1, 2):
        rows[i]["answer"] = "forgot the hashes"
    data = _jsonl(tmp_path / "gsm.jsonl", rows)
    with pytest.raises(ConfigError, match=r"25% unusable.*task\.max_bad_fraction=0\.1"):
        load_task(TaskConfig(name="gsm8k", data_files=str(data), num_eval=2), seed=0)


def test_missing_schema_column_is_a_config_error(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "q.jsonl", [{"problem": "1+1", "answer": "2"}] * 3)
    with pytest.raises(ConfigError, match=r"lacks column\(s\) \['question'\].*gsm8k"):
        load_task(TaskConfig(name="gsm8k", data_files=str(data), num_eval=1), seed=0)


def test_task_config_checks() -> None:
    with pytest.raises(ConfigError, match="task.data_files"):
        load_config(None, ["task.name=math"])
    with pytest.raises(ConfigError, match="task.name"):
        load_config(None, ["task.name=gsm8", "task.data_files=x.jsonl"])
    with pytest.raises(ConfigError, match="task.max_bad_fraction"):
        load_config(None, ["task.max_bad_fraction=2"])
    with pytest.raises(ConfigError, match="task.prompt.preset"):
        load_config(None, ["task.prompt.preset=r1"])


# --------------------------------------------------------------------------------------------- prompts
def _tiny_tokenizer(chat_template: str | None = None):  # noqa: ANN202
    """The tiny model's real character tokenizer (transformers), optionally given a chat template."""
    from qrl_megatron.models.tiny import build_tokenizer

    tokenizer = build_tokenizer(model_max_length=512)
    tokenizer.chat_template = chat_template
    return tokenizer


CHAT = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


def test_prompt_templates_and_presets() -> None:
    raw = PromptConfig(preset="boxed")
    assert render_prompt(raw, _tiny_tokenizer(), "What is 2+2?") == "What is 2+2?\n" + PRESET_TEXT["boxed"][1]
    assert render_prompt(PromptConfig(), None, "37+58=") == "37+58="  # nothing added to a bare prompt
    chat = render_prompt(PromptConfig(preset="qerl"), _tiny_tokenizer(CHAT), "What is 2+2?")
    assert chat.startswith("<|system|>A conversation between User and Assistant") and chat.endswith("<|assistant|>")
    assert "<|user|>What is 2+2?\n" in chat
    dapo = render_prompt(PromptConfig(preset="dapo", system="Be brief."), _tiny_tokenizer(CHAT), "Find x.")
    assert dapo.startswith("<|system|>Be brief.") and "Answer: $Answer" in dapo
    with pytest.raises(ConfigError, match="task.prompt.template=raw"):
        render_prompt(PromptConfig(template="chat"), _tiny_tokenizer(), "q")


def test_last_boxed_matches_braces() -> None:
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{x") is None and last_boxed("none") is None


# --------------------------------------------------------------------------------------------- pass@k
def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c correct) that hold at least one correct sample."""
    from itertools import combinations

    samples = [1] * c + [0] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    ("n", "c", "k"), [(8, 0, 1), (8, 1, 1), (8, 3, 2), (8, 3, 8), (10, 9, 5), (6, 2, 4), (5, 5, 3)]
)
def test_pass_at_k_matches_the_closed_form(n: int, c: int, k: int) -> None:
    from math import comb

    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k))


def test_pass_at_1_is_the_fraction_correct_and_mean_at_k() -> None:
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert mean_at_k([[1, 0, 1, 1], [0, 0, 0, 1]], 2) == pytest.approx((0.5 + 0.0) / 2)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)

"""The synthetic verifiable task: integer arithmetic with an exact answer.

Prompts look like `37+58=` and the reference answer is `95`. Problems are drawn deterministically from the seed;
the held-out split is disjoint from the training split by construction (problems are unique and split once).
"""

from __future__ import annotations

import random
from pathlib import Path

from datasets import Dataset, DatasetDict, Value, load_dataset

from qrl_megatron.config_fields import ConfigError
from qrl_megatron.data.config import TaskConfig

REQUIRED_COLUMNS = ("prompt", "answer")


def _operand(rng: random.Random, min_digits: int, max_digits: int) -> int:
    digits = rng.randint(min_digits, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def _space_size(cfg: TaskConfig) -> int:
    numbers = 10**cfg.max_digits - (0 if cfg.min_digits == 1 else 10 ** (cfg.min_digits - 1))
    return numbers * numbers * len(cfg.operations)


def make_problems(cfg: TaskConfig, seed: int) -> list[dict[str, str]]:
    """`num_train + num_eval` unique problems, in a seed-determined order."""
    total = cfg.num_train + cfg.num_eval
    if total > _space_size(cfg):
        raise ConfigError(
            f"task.num_train + task.num_eval = {total} exceeds the {_space_size(cfg)} distinct problems of "
            f"task.max_digits={cfg.max_digits}; raise task.max_digits or ask for fewer problems"
        )
    rng = random.Random(f"arithmetic-{seed}")
    seen: set[str] = set()
    problems: list[dict[str, str]] = []
    while len(problems) < total:
        a = _operand(rng, cfg.min_digits, cfg.max_digits)
        b = _operand(rng, cfg.min_digits, cfg.max_digits)
        op = rng.choice(cfg.operations)
        prompt = f"{a}{op}{b}="
        if prompt in seen:
            continue
        seen.add(prompt)
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        problems.append({"prompt": prompt, "answer": str(answer)})
    return problems


def _check_columns(ds: Dataset, source: str) -> Dataset:
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"dataset {source!r} lacks column(s) {missing}; it has {ds.column_names}. "
            "Each row needs a 'prompt' string and an 'answer' string"
        )
    bad = [i for i, row in enumerate(ds) if not row["prompt"] or row["answer"] is None]
    if bad:
        raise ConfigError(f"dataset {source!r}: rows {bad[:5]} have an empty prompt or no answer")
    ds = ds.select_columns(list(REQUIRED_COLUMNS))
    features = ds.features.copy()
    features["answer"] = Value("string")  # without it, map() keeps an int/float column's type and str() is undone
    return ds.map(lambda r: {"answer": str(r["answer"])}, features=features)


def _load_file(path: str) -> Dataset:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"task.data_files={path!r}: file not found")
    kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(p.suffix)
    if kind is None:
        raise ConfigError(f"task.data_files={path!r}: use a .json, .jsonl, .parquet or .csv file")
    return _check_columns(load_dataset(kind, data_files=str(p), split="train"), path)


def load_task(cfg: TaskConfig, seed: int) -> DatasetDict:
    """`train` and `eval` splits with `prompt` and `answer` columns."""
    if cfg.name == "arithmetic":
        problems = make_problems(cfg, seed)
        return DatasetDict(
            train=Dataset.from_list(problems[: cfg.num_train]), eval=Dataset.from_list(problems[cfg.num_train :])
        )
    data = _load_file(cfg.data_files)
    if cfg.eval_files:
        return DatasetDict(train=data, eval=_load_file(cfg.eval_files))
    if len(data) <= cfg.num_eval:
        raise ConfigError(f"task.data_files has {len(data)} rows, not more than task.num_eval={cfg.num_eval}")
    return DatasetDict(
        train=data.select(range(len(data) - cfg.num_eval)), eval=data.select(range(len(data) - cfg.num_eval, len(data)))
    )

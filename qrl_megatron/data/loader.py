"""`load_task`: the training split and the held-out sets of `task.*`, as `prompt` / `answer` string columns.

Rows go schema -> prompt template -> checks; a row that fails is skipped and counted by reason (per split), the
counts and the first examples are printed at start-up and kept in `TaskData.report` (the trainer logs them), and
a split with more than `task.max_bad_fraction` unusable rows stops the run.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from datasets import Dataset, DatasetDict, Features, Value

from qrl_megatron.config_fields import ConfigError
from qrl_megatron.data.arithmetic import make_problems
from qrl_megatron.data.config import EvalSetConfig, TaskConfig
from qrl_megatron.data.prompts import render_prompt
from qrl_megatron.data.schemas import Example, extract_row, required_columns
from qrl_megatron.data.sources import read_dataset, read_files

__all__ = ["ANSWER_CHECK", "TaskData", "eval_sets", "load_task"]

ANSWER_CHECK = "qrl_megatron.rewards.verifier:ground_truth_parses"
_FEATURES = Features({"prompt": Value("string"), "answer": Value("string")})
_EXAMPLES = 3  # skipped rows shown per reason


class TaskData(DatasetDict):
    """`train`, `eval` (the main held-out set) and `eval/<name>` per extra set; `report` counts skipped rows."""

    report: dict[str, dict[str, Any]]


def eval_sets(task: DatasetDict) -> dict[str, Dataset]:
    """The held-out sets by name: the main 'eval' first, then each `task.eval_sets` entry."""
    return {"eval": task["eval"], **{key.split("/", 1)[1]: ds for key, ds in task.items() if key.startswith("eval/")}}


def _check_columns(raw: Dataset, schema: str, cfg: TaskConfig, source: str) -> None:
    missing = [c for c in required_columns(schema, cfg.prompt_key, cfg.answer_key) if c not in raw.column_names]
    if missing:
        keys = " (set task.prompt_key / task.answer_key)" if schema == "files" else f" (the {schema} schema)"
        raise ConfigError(
            f"dataset {source!r} lacks column(s) {missing}; it has {raw.column_names}. Each row needs "
            f"{required_columns(schema, cfg.prompt_key, cfg.answer_key)}{keys}"
        )


class _Split:
    """Rows of one split that passed, and the ones that did not (reason -> original row indices)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.prompts: list[str] = []
        self.answers: list[str] = []
        self.indices: list[int] = []
        self.skipped: dict[str, list[int]] = {}
        self.examples: dict[str, str] = {}  # reason -> the first skipped row, shortened
        self.warnings: Counter[str] = Counter()
        self.warning_example = ""
        self.total = 0

    def skip(self, reason: str, index: int, example: str = "") -> None:
        self.skipped.setdefault(reason, []).append(index)
        if example and reason not in self.examples:
            self.examples[reason] = example

    def drop(self, keep: list[bool], reason: str) -> None:
        for ok, index, prompt, answer in zip(keep, self.indices, self.prompts, self.answers):
            if not ok:
                self.skip(reason, index, f"prompt {prompt[:40]!r}..., answer {answer[:30]!r}")
        self.prompts = [p for p, ok in zip(self.prompts, keep) if ok]
        self.answers = [a for a, ok in zip(self.answers, keep) if ok]
        self.indices = [i for i, ok in zip(self.indices, keep) if ok]

    def summary(self) -> str:
        bad = sum(len(v) for v in self.skipped.values())
        parts = [
            f"{reason} {len(rows)} (rows {rows[:_EXAMPLES]}"
            + (f"; first: {self.examples[reason]}" if reason in self.examples else "")
            + ")"
            for reason, rows in sorted(self.skipped.items())
        ]
        text = f"{self.name}: {len(self.prompts)} of {self.total} rows used"
        text += f"; skipped {bad}: " + ", ".join(parts) if parts else ""
        for reason, count in sorted(self.warnings.items()):
            text += f"; kept with a warning: {reason} {count}{self.warning_example}"
        return text


def _process(
    split: _Split,
    raw: Dataset,
    schema: str,
    cfg: TaskConfig,
    tokenizer: Any,
    max_prompt_tokens: int,
    offset: int = 0,
) -> None:
    for i, row in enumerate(raw):
        split.total += 1
        item = extract_row(schema, row, cfg.prompt_key, cfg.answer_key)  # type: ignore[arg-type]
        if not isinstance(item, Example):
            split.skip(item.reason, offset + i, str({k: str(v)[:30] for k, v in row.items()})[:120])  # type: ignore[union-attr]
            continue
        split.prompts.append(render_prompt(cfg.prompt, tokenizer, item.question, item.messages))
        split.answers.append(item.answer)
        split.indices.append(offset + i)
    if tokenizer is not None and split.prompts:
        ids = [tokenizer.encode(p, add_special_tokens=False) for p in split.prompts]
        split.drop([bool(x) for x in ids], "prompt_untokenizable")
        ids = [x for x in ids if x]
        if max_prompt_tokens:
            split.drop([len(x) <= max_prompt_tokens for x in ids], "prompt_too_long")
            ids = [x for x in ids if len(x) <= max_prompt_tokens]
        # a tokenizer without some characters (the tiny model's) drops them: kept, but counted as a warning
        lossy = [(tokenizer.decode(x), p) for x, p in zip(ids, split.prompts) if tokenizer.decode(x) != p]
        if lossy:
            split.warnings["lossy_tokenization"] = len(lossy)
            seen = lossy[0][0]
            split.warning_example = f" (the tokenizer lacks some characters; the model sees e.g. {seen[:60]!r})"


def _check_answers(splits: list[_Split], workers: int) -> None:
    """Skip rows whose reference answer math-verify cannot read (they could never score)."""
    from qrl_megatron.rewards.pool import RewardPool

    with RewardPool(ANSWER_CHECK, workers=workers, timeout_s=10.0) as pool:
        for split in splits:
            result = pool.map([("", a) for a in split.answers])
            split.drop([v > 0 for v in result.values], "unparseable_answer")


def _limit(raw: Dataset, limit: int) -> Dataset:
    return raw.select(range(min(limit, len(raw)))) if limit else raw


def load_task(
    cfg: TaskConfig,
    seed: int,
    tokenizer: Any = None,
    max_prompt_tokens: int = 0,
    check_answers: bool = False,
    workers: int = 2,
    verbose: bool = True,
) -> TaskData:
    """The task's splits; `tokenizer` renders chat templates and measures prompts against `max_prompt_tokens`
    (`task.max_prompt_tokens` wins when set); `check_answers` skips references math-verify cannot parse."""
    if cfg.name == "arithmetic":  # the synthetic task, exactly as the default demo has always had it
        problems = make_problems(cfg, seed)
        task = TaskData(
            train=Dataset.from_list(problems[: cfg.num_train]), eval=Dataset.from_list(problems[cfg.num_train :])
        )
        task.report = {}
        return task
    budget = cfg.max_prompt_tokens or max_prompt_tokens
    schema = cfg.name
    if cfg.data_files:
        raw_train, source = read_files(cfg.data_files, "task.data_files"), cfg.data_files
    else:
        raw_train, source = read_dataset(cfg.dataset, cfg.dataset_config, cfg.train_split, "task.dataset"), cfg.dataset
    _check_columns(raw_train, schema, cfg, source)

    evals: list[tuple[str, str, Dataset, int]] = []  # (name, schema, rows, index offset)
    sets: list[EvalSetConfig] = list(cfg.eval_sets)
    for es in sets:
        if es.data_files:
            raw = read_files(es.data_files, f"task.eval_sets[{es.name}].data_files")
        else:
            raw = read_dataset(es.dataset, es.dataset_config, es.split, f"task.eval_sets[{es.name}].dataset")
        _check_columns(raw, es.schema or schema, cfg, es.data_files or es.dataset)
        evals.append((es.name, es.schema or schema, _limit(raw, es.limit), 0))
    # the main held-out set first: task.eval_files, the dataset's eval split, or the last task.num_eval rows
    if cfg.eval_files:
        raw = read_files(cfg.eval_files, "task.eval_files")
        _check_columns(raw, schema, cfg, cfg.eval_files)
        evals.insert(0, ("eval", schema, raw, 0))
    elif cfg.dataset and cfg.eval_split:
        raw = read_dataset(cfg.dataset, cfg.dataset_config, cfg.eval_split, "task.dataset")
        evals.insert(0, ("eval", schema, raw, 0))
    else:
        if len(raw_train) <= cfg.num_eval:
            raise ConfigError(f"task.data_files has {len(raw_train)} rows, not more than task.num_eval={cfg.num_eval}")
        cut = len(raw_train) - cfg.num_eval
        evals.insert(0, ("eval", schema, raw_train.select(range(cut, len(raw_train))), cut))
        raw_train = raw_train.select(range(cut))

    splits = [_Split("train")]
    _process(splits[0], _limit(raw_train, cfg.limit_train), schema, cfg, tokenizer, budget)
    for name, set_schema, raw, offset in evals:
        splits.append(_Split(name))
        _process(splits[-1], raw, set_schema, cfg, tokenizer, budget, offset)
    if check_answers:
        _check_answers(splits, workers)

    if verbose:
        print(f"task {cfg.name}: " + "; ".join(s.summary() for s in splits), flush=True)
    for s in splits:
        bad = sum(len(v) for v in s.skipped.values())
        if s.total and bad / s.total > cfg.max_bad_fraction:
            raise ConfigError(
                f"task {cfg.name}, {s.summary()}: {bad / s.total:.0%} unusable is above "
                f"task.max_bad_fraction={cfg.max_bad_fraction}; fix the data or its keys (task.prompt_key, "
                "task.answer_key, task.max_prompt_tokens), or raise task.max_bad_fraction"
            )
        if not s.prompts:
            raise ConfigError(f"task {cfg.name}, {s.summary()}: no usable rows")

    def as_dataset(s: _Split) -> Dataset:
        return Dataset.from_dict({"prompt": s.prompts, "answer": s.answers}, features=_FEATURES)

    task = TaskData(train=as_dataset(splits[0]), eval=as_dataset(splits[1]))
    for s in splits[2:]:
        task[f"eval/{s.name}"] = as_dataset(s)
    task.report = {
        s.name: {"rows": s.total, "used": len(s.prompts), **{f"skipped_{k}": len(v) for k, v in s.skipped.items()},
                 **{f"warning_{k}": v for k, v in s.warnings.items()}}
        for s in splits
    }  # fmt: skip
    if verbose:
        print(f"first prompt (train):\n{splits[0].prompts[0]}\n-- reference answer: {splits[0].answers[0]}", flush=True)
    return task

"""Config of the verifiable task (`task.*`): the data, its schema, the held-out sets and the prompt template."""

from __future__ import annotations

from dataclasses import dataclass

from qrl_megatron.config_fields import ConfigError, check_choice, check_positive, check_range, doc

__all__ = ["SCHEMAS", "EvalSetConfig", "PRESETS", "PromptConfig", "TaskConfig"]

# task.name values that read a dataset in a published schema (arithmetic is synthetic, files maps columns)
SCHEMAS = ("gsm8k", "math", "dapo_math", "deepscaler", "aime", "files")
PRESETS = ("none", "boxed", "qerl", "dapo")


@dataclass
class PromptConfig:
    template: str = doc("auto", "auto (chat if the tokenizer has a chat template, else raw), chat, or raw")
    preset: str = doc("none", "answer-format preset: none, boxed (\\boxed{}), qerl (<think>/<answer> tags), dapo")
    system: str = doc("", "system prompt (replaces the preset's); chat: a system message, raw: a first paragraph")
    suffix: str = doc("", "instruction appended to each question (replaces the preset's)")

    def validate(self, prefix: str = "task.prompt") -> None:
        check_choice(f"{prefix}.template", self.template, ("auto", "chat", "raw"))
        check_choice(f"{prefix}.preset", self.preset, PRESETS)


@dataclass
class EvalSetConfig:
    name: str = doc("", "the set's name in metrics and eval.json (eval/<name>/...)")
    schema: str = doc("", "its schema (a task.name value; empty: task.name)")
    data_files: str = doc("", "local .json/.jsonl/.parquet file(s); globs and commas allowed")
    dataset: str = doc("", "or a save_to_disk folder or a hub id read from the local HF cache")
    dataset_config: str = doc("", "hub config name (e.g. main for openai/gsm8k)")
    split: str = doc("test", "split of task.eval_sets[].dataset")
    limit: int = doc(0, "evaluate at most this many rows (0: all)")


@dataclass
class TaskConfig:
    name: str = doc(
        "arithmetic",
        "verifiable task: arithmetic (synthetic), gsm8k, math, dapo_math, deepscaler, aime, or files (column mapping)",
    )
    operations: str = doc("+", "arithmetic operators to draw from, a subset of '+-*'")
    min_digits: int = doc(1, "fewest digits per operand")
    max_digits: int = doc(2, "most digits per operand")
    num_train: int = doc(4000, "arithmetic: training problems")
    num_eval: int = doc(200, "held-out problems: arithmetic's count; other tasks without an eval source: last N rows")
    data_files: str = doc("", "local .json/.jsonl/.parquet training file(s); globs and commas allowed")
    eval_files: str = doc(
        "", "local held-out file(s); default: task.dataset's eval split or the last task.num_eval rows"
    )
    dataset: str = doc("", "a save_to_disk folder or a hub id read from the local HF cache (e.g. openai/gsm8k)")
    dataset_config: str = doc("", "hub config name (e.g. main for openai/gsm8k)")
    train_split: str = doc("train", "split of task.dataset to train on")
    eval_split: str = doc("test", "split of task.dataset to evaluate on ('' : the last task.num_eval training rows)")
    limit_train: int = doc(0, "use at most this many training rows (0: all)")
    eval_sets: list[EvalSetConfig] = doc(
        text="extra held-out sets besides the main 'eval' one, each reported under its own name",
        factory=list,
    )
    prompt_key: str = doc("prompt", "files: column of the question (dotted for nested, e.g. extra.question)")
    answer_key: str = doc("answer", "files: column of the reference answer (dotted, e.g. reward_model.ground_truth)")
    max_bad_fraction: float = doc(0.1, "stop when more than this fraction of a split's rows is unusable")
    max_prompt_tokens: int = doc(0, "skip prompts longer than this (0: model positions - rollout.max_new_tokens)")
    prompt: PromptConfig = doc(text="prompt template", factory=PromptConfig)

    def validate(self, prefix: str = "task") -> None:
        check_choice(f"{prefix}.name", self.name, ("arithmetic", *SCHEMAS))
        bad = set(self.operations) - set("+-*")
        if not self.operations or bad:
            raise ConfigError(f"{prefix}.operations={self.operations!r} must be a non-empty subset of '+-*'")
        check_range(f"{prefix}.min_digits", self.min_digits, 1, 6)
        check_range(f"{prefix}.max_digits", self.max_digits, self.min_digits, 6)
        check_positive(f"{prefix}.num_train", self.num_train)
        check_positive(f"{prefix}.num_eval", self.num_eval)
        check_positive(f"{prefix}.limit_train", self.limit_train, allow_zero=True)
        check_range(f"{prefix}.max_bad_fraction", self.max_bad_fraction, 0.0, 1.0)
        check_positive(f"{prefix}.max_prompt_tokens", self.max_prompt_tokens, allow_zero=True)
        if self.name != "arithmetic" and not (self.data_files or self.dataset):
            raise ConfigError(
                f"{prefix}.data_files (local files) or {prefix}.dataset (save_to_disk folder or hub id) must name the "
                f"data when {prefix}.name={self.name}"
            )
        if self.data_files and self.dataset:
            raise ConfigError(f"set one of {prefix}.data_files and {prefix}.dataset, not both")
        names = set()
        for i, eval_set in enumerate(self.eval_sets):
            key = f"{prefix}.eval_sets[{i}]"
            if not eval_set.name or not eval_set.name.replace("_", "").replace("-", "").isalnum():
                raise ConfigError(f"{key}.name={eval_set.name!r} must be a non-empty word (letters, digits, _ or -)")
            if eval_set.name in names or eval_set.name == "eval":
                raise ConfigError(f"{key}.name={eval_set.name!r} is used twice (or is 'eval', the main set's)")
            names.add(eval_set.name)
            if eval_set.schema:
                check_choice(f"{key}.schema", eval_set.schema, SCHEMAS)
            if bool(eval_set.data_files) == bool(eval_set.dataset):
                raise ConfigError(f"{key}: set exactly one of data_files and dataset")
            check_positive(f"{key}.limit", eval_set.limit, allow_zero=True)
        self.prompt.validate(f"{prefix}.prompt")

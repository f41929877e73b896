"""The synthetic verifiable task: integer arithmetic with an exact answer.

Prompts look like `37+58=` and the reference answer is `95`. Problems are drawn deterministically from the seed;
the held-out split is disjoint from the training split by construction (problems are unique and split once).
"""

from __future__ import annotations

import random
from typing import Any

from datasets import DatasetDict

from qrl_megatron.config_fields import ConfigError
from qrl_megatron.data.config import TaskConfig


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


def load_task(cfg: TaskConfig, seed: int, **kwargs: Any) -> DatasetDict:
    """The task's splits (`qrl_megatron.data.loader.load_task`, which also serves the dataset tasks)."""
    from qrl_megatron.data.loader import load_task as load

    return load(cfg, seed, **kwargs)

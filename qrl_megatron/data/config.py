"""Config of the verifiable task (`task.*`)."""

from __future__ import annotations

from dataclasses import dataclass

from qrl_megatron.config_fields import ConfigError, check_choice, check_positive, check_range, doc

__all__ = ["TaskConfig"]


@dataclass
class TaskConfig:
    name: str = doc("arithmetic", "verifiable task: 'arithmetic' (synthetic) or 'files' (task.data_files)")
    operations: str = doc("+", "arithmetic operators to draw from, a subset of '+-*'")
    min_digits: int = doc(1, "fewest digits per operand")
    max_digits: int = doc(2, "most digits per operand")
    num_train: int = doc(4000, "training problems")
    num_eval: int = doc(200, "held-out evaluation problems (disjoint from training)")
    data_files: str = doc("", "task=files: a local .json/.jsonl/.parquet file with 'prompt' and 'answer' columns")
    eval_files: str = doc("", "task=files: optional held-out file; default: the last task.num_eval rows")

    def validate(self, prefix: str = "task") -> None:
        check_choice(f"{prefix}.name", self.name, ("arithmetic", "files"))
        bad = set(self.operations) - set("+-*")
        if not self.operations or bad:
            raise ConfigError(f"{prefix}.operations={self.operations!r} must be a non-empty subset of '+-*'")
        check_range(f"{prefix}.min_digits", self.min_digits, 1, 6)
        check_range(f"{prefix}.max_digits", self.max_digits, self.min_digits, 6)
        check_positive(f"{prefix}.num_train", self.num_train)
        check_positive(f"{prefix}.num_eval", self.num_eval)
        if self.name == "files" and not self.data_files:
            raise ConfigError(f"{prefix}.data_files must name a file when {prefix}.name=files")

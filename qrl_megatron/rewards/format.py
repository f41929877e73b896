"""Format rewards: does the completion follow the answer format its prompt preset asked for?"""

from __future__ import annotations

import re

__all__ = ["format_reward"]

_PATTERNS = {
    # QeRL: reasoning in <think>, then the final answer in <answer>, nothing after
    "qerl": re.compile(r"^\s*<think>.*?</think>\s*<answer>.+?</answer>\s*$", re.DOTALL),
    # DAPO: the last line is "Answer: ..."
    "dapo": re.compile(r"(?:^|\n)\s*Answer\s*:\s*\S[^\n]*\s*$"),
    "boxed": re.compile(r"\\boxed\{.+\}"),
}


def format_reward(completion: str, style: str) -> float:
    """1.0 when `completion` has the `style` format (qerl, dapo, boxed), else 0.0; style none always scores 1."""
    if style == "none":
        return 1.0
    return float(bool(_PATTERNS[style].search(completion)))

"""Verifier for exact-answer tasks: the completion must be exactly the integer answer (then end of sequence)."""

from __future__ import annotations

import re

_INTEGER = re.compile(r"-?\d+")


def extract_answer(completion: str) -> str | None:
    """The answer the completion commits to: the whole stripped text if it is an integer, else None."""
    text = completion.strip()
    return text if _INTEGER.fullmatch(text) else None


def exact_answer_reward(completion: str, answer: str, finished: bool = True) -> float:
    """1.0 for a finished completion that is exactly the answer; 0.0 otherwise (a truncated one never scores).

    Integer answers compare as numbers ("05" == "5"); any other answer (from a user's dataset) compares as
    stripped text, so a non-numeric reference never crashes the verifier.
    """
    if not finished:
        return 0.0
    reference = str(answer).strip()
    predicted = extract_answer(completion)
    if predicted is not None and _INTEGER.fullmatch(reference):
        return float(int(predicted) == int(reference))
    return float(completion.strip() == reference)

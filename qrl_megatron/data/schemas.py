"""Published dataset schemas -> (question or chat messages, reference answer), one row at a time.

A row that cannot be used returns a `Skip` naming the reason (counted by the loader, never dropped silently).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Example", "Skip", "extract_row", "last_boxed", "lookup"]


@dataclass
class Example:
    question: str  # the user's question ('' when `messages` carries the whole chat)
    answer: str
    messages: list[dict[str, str]] | None = None  # a published chat-list prompt (verl / DAPO-Math-17k)


@dataclass
class Skip:
    reason: str  # missing_prompt, missing_answer, unparseable_answer, ...


_MISSING = object()


def lookup(row: dict[str, Any], key: str) -> Any:
    """row['a']['b'] for key 'a.b' (a flat column literally named 'a.b' wins); a missing part -> _MISSING."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces matched; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i].strip() or None
    return None  # unbalanced braces


def _gsm8k_answer(solution: str) -> str | None:
    if "####" not in solution:
        return None
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return answer or None


def _text(value: Any) -> str | None:
    if value is _MISSING or value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # parquet/json can store AIME answers as floats
    text = str(value).strip()
    return text or None


def _messages(value: Any) -> list[dict[str, str]] | None:
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return [{"role": str(m.get("role", "user")), "content": str(m["content"])} for m in value]
    return None


def extract_row(
    schema: str, row: dict[str, Any], prompt_key: str = "prompt", answer_key: str = "answer"
) -> Example | Skip:
    """One row of `schema` (a task.name) as an Example, or the reason it cannot be used."""
    if schema == "gsm8k":
        question, solution = _text(lookup(row, "question")), _text(lookup(row, "answer"))
        if question is None:
            return Skip("missing_prompt")
        if solution is None:
            return Skip("missing_answer")
        answer = _gsm8k_answer(solution)
        return Example(question, answer) if answer else Skip("unparseable_answer")
    if schema in ("math", "deepscaler", "aime"):
        question = _text(lookup(row, "problem"))
        if question is None:
            return Skip("missing_prompt")
        answer = _text(lookup(row, "answer"))  # MATH-500 / DeepScaleR / AIME give it; the original MATH does not
        if answer is None:
            solution = _text(lookup(row, "solution"))
            if solution is None:
                return Skip("missing_answer")
            answer = last_boxed(solution)
            if answer is None:
                return Skip("unparseable_answer")
        return Example(question, answer)
    if schema in ("dapo_math", "files"):
        prompt_key, answer_key = (
            ("prompt", "reward_model.ground_truth") if schema == "dapo_math" else (prompt_key, answer_key)
        )
        prompt = lookup(row, prompt_key)
        answer = _text(lookup(row, answer_key))
        messages = _messages(prompt)
        question = None if messages else _text(prompt)
        if messages is None and question is None:
            return Skip("missing_prompt")
        if answer is None:
            return Skip("missing_answer")
        return Example(question or "", answer, messages)
    raise ValueError(f"unknown schema {schema!r}")


def required_columns(schema: str, prompt_key: str, answer_key: str) -> list[str]:
    """Top-level columns a file of `schema` must have (a file without them is a config error, not bad rows)."""
    return {
        "gsm8k": ["question", "answer"],
        "math": ["problem"],
        "deepscaler": ["problem"],
        "aime": ["problem", "answer"],
        "dapo_math": ["prompt", "reward_model"],
        "files": [prompt_key.split(".")[0], answer_key.split(".")[0]],
    }[schema]

"""The math verifier: find the answer a completion commits to, then check it against the reference with math-verify.

In-process and without a time limit: `qrl_megatron.rewards.pool` runs these functions in worker processes with a
hard per-call deadline (math-verify's own SIGALRM timeouts only fire in a main thread, and not inside a long C call
of sympy), and `qrl_megatron.rewards.math_reward` is the public entry point that goes through such a pool.

Where the answer is looked for, first match wins (the conventions of the datasets and prompt presets we ship):
`<answer>...</answer>` (QeRL), `\\boxed{...}` (MATH, DeepScaleR, "put the final answer within \\boxed{}"),
a `#### n` line (GSM8K), an `Answer: ...` line (DAPO); otherwise the last number or expression of the text.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from qrl_megatron.data.schemas import last_boxed

__all__ = ["answer_span", "ground_truth_parses", "parse_ground_truth", "parse_prediction", "verify_math"]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_LINE = re.compile(r"(?im)^\s*\**answer\**\s*[:：]\s*(.+?)\s*$")
_NUMBER_WITH_COMMAS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def answer_span(completion: str) -> tuple[str, str]:
    """(where, text): the part of the completion that holds the answer and which convention found it.

    `where` is one of answer_tag, boxed, hashes, answer_line, whole; `text` is what math-verify will parse.
    """
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        return "answer_tag", tags[-1].strip()
    if "\\boxed" in completion or "\\fbox" in completion:
        return "boxed", completion
    hashes = _HASHES.findall(completion)
    if hashes:
        return "hashes", hashes[-1].strip()
    lines = _ANSWER_LINE.findall(completion)
    if lines:
        return "answer_line", lines[-1].strip()
    return "whole", completion


def _strip_number(text: str) -> str:
    """'1,234' -> '1234' and a trailing period dropped: GSM8K writes thousands with commas, which LaTeX reads as a
    tuple; only an exact thousands pattern is rewritten, so '(1,2)' or '1,2,3' stay sets and tuples."""
    text = text.strip().rstrip(".").strip()
    if text.startswith("$") and text.endswith("$") and len(text) > 1:
        inner = text.strip("$").strip()
        if _NUMBER_WITH_COMMAS.match(inner):
            return inner.replace(",", "")
    return text.replace(",", "") if _NUMBER_WITH_COMMAS.match(text) else text


@lru_cache(maxsize=1)
def _configs() -> tuple[Any, Any, Any]:
    # imported on first use: math-verify pulls sympy and antlr4 (about a second), which only the workers need
    import math_verify.grader
    import math_verify.parser
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # we turn math-verify's timeouts off on purpose (see the module doc): silence its one-time warning about it
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True  # type: ignore[attr-defined]
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True  # type: ignore[attr-defined]

    latex_boxed = [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=True)]
    latex_then_expr = [LatexExtractionConfig(try_extract_without_anchor=True), ExprExtractionConfig()]
    expr = [ExprExtractionConfig()]
    return latex_boxed, latex_then_expr, expr


def _parse(text: str, configs: Any) -> list[Any]:
    from math_verify import parse

    # timeouts off: they rely on SIGALRM (main thread only); the pool enforces the deadline instead
    return list(parse(text, configs, parsing_timeout=None))  # type: ignore[arg-type]


def _parse_span(text: str) -> list[Any]:
    """A bare answer ('\\frac{1}{2}', '18', '[1, 2]'): read as LaTeX inside $...$ first, then as a plain expression."""
    latex_boxed, latex_then_expr, expr = _configs()
    text = _strip_number(text)
    if not text:
        return []
    if "\\boxed" in text:
        return _parse(text, latex_boxed)
    if not text.startswith("$"):
        parsed = _parse(f"${text}$", latex_then_expr)
        if parsed:
            return parsed
    return _parse(text, latex_then_expr) or _parse(text, expr)


def parse_ground_truth(ground_truth: str) -> list[Any]:
    """The reference answer parsed by math-verify ([] when it cannot be read: the loader skips such rows)."""
    return _parse_span(str(ground_truth))


def parse_prediction(completion: str) -> list[Any]:
    where, text = answer_span(completion)
    if where == "boxed":  # the last \boxed{} is the final answer (math-verify alone may pick an earlier one)
        last = last_boxed(text)
        return _parse(f"$\\boxed{{{last}}}$" if last else text, _configs()[0])
    if where == "whole":
        # no marker: the last number or expression the text ends with (math-verify's own unanchored search)
        return _parse(text, _configs()[1])
    return _parse_span(text)


def verify_math(completion: str, ground_truth: str) -> float:
    """1.0 when the completion's answer equals the reference mathematically, else 0.0 (no time limit: see module)."""
    from math_verify import verify

    try:
        gold = parse_ground_truth(ground_truth)
        predicted = parse_prediction(completion) if gold else []
        return float(bool(predicted) and verify(gold, predicted, timeout_seconds=None))
    except Exception:  # sympy raises on odd input (division by zero, bad LaTeX): an unreadable answer scores 0
        return 0.0


def ground_truth_parses(_completion: str, ground_truth: str) -> float:
    """1.0 when math-verify reads `ground_truth` as math (the loader's check, run in the reward pool for its
    deadline); its string-only fallback (what it returns for '\\frac{') does not count."""
    try:
        return float(any(not isinstance(x, str) for x in parse_ground_truth(ground_truth)))
    except Exception:
        return 0.0

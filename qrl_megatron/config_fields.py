"""The building blocks of every component's config dataclass: documented fields and checks that name the key.

A leaf module (it imports nothing of ours), so a component can define its config next to its code and the root
(`qrl_megatron.config`) can import it without cycles.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, field
from typing import Any


class ConfigError(ValueError):
    """A bad config key or value; the message names the dotted key and the fix."""


def doc(default: Any = MISSING, text: str = "", factory: Any = MISSING) -> Any:
    """A dataclass field with a one-line doc."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def closest_suggestion(name: str, options: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or ''."""
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def check_choice(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}"
            + closest_suggestion(str(value), [str(a) for a in allowed])
        )


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def check_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key}={value} must lie in [{low}, {high}]")

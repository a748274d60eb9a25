"""Exceptions and the small validation helpers every config uses.

Every error names the bad value and what would have been accepted, so that the
CLI can print it as one line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration value is unknown or out of range."""


def choose(kind: str, name: str, choices: Iterable[str]) -> str:
    """Return ``name`` if it is one of ``choices``, else raise a ConfigError listing them."""
    options = sorted(choices)
    if name not in options:
        raise ConfigError(f"unknown {kind} {name!r}; choose from: {', '.join(options)}")
    return name


def positive_int(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field} must be an integer >= 1, got {value!r}")
    return value


def nonnegative_int(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{field} must be an integer >= 0, got {value!r}")
    return value


def positive_float(field: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{field} must be a finite number > 0, got {value!r}")
    return float(value)


def nonnegative_float(field: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(f"{field} must be a finite number >= 0, got {value!r}")
    return float(value)


def float_in(field: str, value: object, low: float, high: float, *, low_open: bool = False,
             high_open: bool = False) -> float:
    """Check ``low <= value <= high`` (with optional open ends) and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{field} must be a finite number, got {value!r}")
    v = float(value)
    below = v <= low if low_open else v < low
    above = v >= high if high_open else v > high
    if below or above:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(f"{field} must lie in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return v

"""The one argument checker: each function returns the value as its type or raises ``ArgumentError`` naming the
argument.

Strings are accepted where a number is asked for (settings typed on a command line arrive as text), bools
never are (``True`` is not the integer 1 here)::

    k = check_positive_int("k", k)                  # "k must be a positive integer, got 0"
    damping = check_non_negative("damping", "1e-3")  # 0.001
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

from gradindex.errors import ArgumentError

__all__ = [
    "check_choice",
    "check_flag",
    "check_fraction",
    "check_int_at_least",
    "check_non_negative",
    "check_non_negative_int",
    "check_number",
    "check_positive",
    "check_positive_int",
]


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        pass
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def check_int_at_least(name: str, value: Any, low: int, what: str) -> int:
    """``value`` as an int when it is an integer ``>= low`` (``what`` says so in the message: "a positive integer")."""
    number = _as_int(value)
    if number is None or number < low:
        raise ArgumentError(name, f"{name} must be {what}, got {value!r}")
    return number


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int when it is an integer > 0 (a whole float or a numeric string too, never a bool)."""
    return check_int_at_least(name, value, 1, "a positive integer")


def check_non_negative_int(name: str, value: Any) -> int:
    """``value`` as an int when it is an integer >= 0."""
    return check_int_at_least(name, value, 0, "a non-negative integer")


def check_number(name: str, value: Any) -> float:
    """``value`` as a finite float (a numeric string too, never a bool)."""
    if isinstance(value, bool):
        raise ArgumentError(name, f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ArgumentError(name, f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ArgumentError(name, f"{name} must be finite, got {value!r}")
    return number


def check_positive(name: str, value: Any) -> float:
    """``value`` as a float when it is a finite number > 0."""
    if isinstance(value, bool) or not _is_number(value) or not 0 < float(value) < math.inf:
        raise ArgumentError(name, f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: Any) -> float:
    """``value`` as a float when it is a finite number >= 0."""
    if isinstance(value, bool) or not _is_number(value) or not 0 <= float(value) < math.inf:
        raise ArgumentError(name, f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any, *, low_open: bool, high_open: bool) -> float:
    """``value`` as a float in [0, 1], (0, 1), [0, 1) or (0, 1] as the open ends say."""
    if isinstance(value, bool) or not _is_number(value):
        raise ArgumentError(name, f"{name} must be a number, got {value!r}")
    number = float(value)
    low_ok = number > 0 if low_open else number >= 0
    high_ok = number < 1 if high_open else number <= 1
    if not (low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ArgumentError(name, f"{name} must be in {interval}, got {value!r}")
    return number


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` when it is one of ``choices``."""
    if value not in choices:
        raise ArgumentError(name, f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool: a bool, or true/yes/1/on and false/no/0/off as text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
        return False
    raise ArgumentError(name, f"{name} must be true or false, got {value!r}")


def _is_number(value: Any) -> bool:
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True

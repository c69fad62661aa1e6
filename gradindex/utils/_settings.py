"""Settings declared once, with their help: a frozen dataclass per stage whose fields carry what they accept.

Each field is made with ``setting(...)``: its default, one line of help, and its choices or bounds. The dataclass's
``__post_init__`` calls ``check_settings(self)``, which checks every field with the one argument checker (an
``ArgumentError`` naming the field), and the command line builds its options from the same fields (their flags,
types, choices, defaults and help), so a choice or a bound is typed in exactly one place::

    @dataclass(frozen=True, kw_only=True)
    class IndexConfig:
        k: int = setting(10, "neighbours whose recall is measured", minimum=1, integer=True)
        target_recall: float = setting(0.95, "recall the default nprobe must reach", above=0, maximum=1)

        def __post_init__(self) -> None:
            check_settings(self)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradindex.errors import ArgumentError
from gradindex.utils._checks import check_choice, check_flag, check_int_at_least, check_number

__all__ = ["Setting", "check_settings", "setting", "setting_of", "settings_of"]

_MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class Setting:
    """What one settings field accepts, and its help (a field's ``metadata["setting"]``).

    ``choices`` are the allowed values (a mapping gives each one's meaning); ``minimum``/``maximum`` are inclusive
    bounds and ``above``/``below`` exclusive ones; ``integer`` asks for an int; ``flag`` for a bool (``"true"`` as text
    too); ``optional`` lets None through (the default is then computed, as ``default_text`` says); ``cli`` is False for
    fields the command line does not offer.
    """

    help: str
    choices: Mapping[str, str] | Sequence[str] | None = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    integer: bool = False
    flag: bool = False
    optional: bool = False
    default_text: str | None = None
    metavar: str | None = None
    cli: bool = True

    def check(self, name: str, value: Any) -> Any:
        """``value`` as this setting accepts it (ints for integers), or an ``ArgumentError`` naming ``name``."""
        if value is None and self.optional:
            return None
        if self.flag:
            return check_flag(name, value)
        if self.choices is not None:
            return check_choice(name, value, list(self.choices))
        if not (isinstance(value, bool) or self.integer or self._bounded()):
            return value
        if self.integer:
            low = self.minimum if self.minimum is not None else (self.above + 1 if self.above is not None else None)
            words = "an integer" if low is None else _integer_words(int(low))
            number = check_int_at_least(name, value, -(2**63) if low is None else int(low), words)
        elif self._bounded():
            number = _as_number(name, value)  # NaN and infinities fail the bounds, with the bounds' message
        else:
            number = check_number(name, value)
        self._check_bounds(name, number, value)
        return number

    def _bounded(self) -> bool:
        return any(bound is not None for bound in (self.minimum, self.maximum, self.above, self.below))

    def _check_bounds(self, name: str, number: float, value: Any) -> None:
        low_ok = math.isfinite(number) and (self.minimum is None or number >= self.minimum)
        low_ok = low_ok and (self.above is None or number > self.above)
        high_ok = (self.maximum is None or number <= self.maximum) and (self.below is None or number < self.below)
        if low_ok and high_ok:
            return
        if self.maximum is None and self.below is None and not self.integer:
            words = "a positive number" if self.above == 0 else "a non-negative number" if self.minimum == 0 else None
            if words:
                raise ArgumentError(name, f"{name} must be {words}, got {value!r}")
        if self.integer and not math.isfinite(number):
            raise ArgumentError(name, f"{name} must be {_integer_words(int(self.minimum or 0))}, got {value!r}")
        if self.integer and self.maximum is None and self.below is None:
            return  # check_int_at_least said so already
        low = f"[{self.minimum}" if self.minimum is not None else f"({self.above}" if self.above is not None else "(-∞"
        high = f"{self.maximum}]" if self.maximum is not None else f"{self.below})" if self.below is not None else "∞)"
        raise ArgumentError(name, f"{name} must be in {low}, {high}, got {value!r}")


def _as_number(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ArgumentError(name, f"{name} must be a number, got {value!r}") from None


def _integer_words(low: int) -> str:
    return "a positive integer" if low == 1 else "a non-negative integer" if low == 0 else f"an integer >= {low}"


def setting(default: Any = _MISSING, help: str = "", *, default_factory: Any = _MISSING, **accepts: Any) -> Any:
    """A dataclass field with its help and what it accepts (``Setting``'s fields: choices, minimum, integer, ...)."""
    if isinstance(default, bool):
        accepts.setdefault("flag", True)
    metadata = {"setting": Setting(help=help, **accepts)}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def settings_of(cls: Any) -> dict[str, tuple[dataclasses.Field, Setting]]:
    """Every field of a settings dataclass that was made with ``setting``: ``{name: (field, Setting)}``."""
    fields = dataclasses.fields(cls)
    return {item.name: (item, item.metadata["setting"]) for item in fields if "setting" in item.metadata}


def setting_of(cls: Any, name: str) -> tuple[dataclasses.Field, Setting]:
    """The field ``name`` of a settings dataclass and its ``Setting``."""
    found = settings_of(cls)
    if name not in found:
        raise KeyError(f"{cls.__name__} has no setting {name!r}")
    return found[name]


def check_settings(instance: Any) -> None:
    """Check every ``setting`` field of a (frozen) settings dataclass, storing the checked values (``"3"`` -> 3)."""
    for name, (_, spec) in settings_of(type(instance)).items():
        value = getattr(instance, name)
        checked = spec.check(name, value)
        if checked is not value:
            object.__setattr__(instance, name, checked)

"""The value checks every layer shares: whole numbers and finite numbers in a range (bools refused)."""
from __future__ import annotations

import math

from vitprune.errors import VitpruneError


def is_whole(value: object, minimum: int | None = None) -> bool:
    """An int (not a bool), at least `minimum` when given."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def is_finite_number(value: object) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_whole(value: object, name: str, minimum: int | None = None) -> None:
    """A whole number (>= `minimum` when given), or a VitpruneError naming `name`."""
    if not is_whole(value, minimum):
        rule = "a whole number" if minimum is None else f"a whole number >= {minimum}"
        raise VitpruneError(f"{name} must be {rule}, got {value!r}", param=name)


def check_finite(value: object, name: str, *, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False, rule: str = "") -> None:
    """A finite number between `low` and `high` (each end closed unless `*_open`), or a
    VitpruneError naming `name`; `rule` says the range in words."""
    ok = is_finite_number(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise VitpruneError(f"{name} must be {rule or 'a finite number'}, got {value!r}", param=name)

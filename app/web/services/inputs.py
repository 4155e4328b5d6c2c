"""Parsing the app's numeric fields: a bad value is refused with one line, never coerced.

Fields arrive as text (see :func:`app.web.components.number_input`) or as numbers from a slider;
each parser names the field, the value and the accepted range.
"""

from __future__ import annotations

import math

from workbench.errors import InputError


def _number(value, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise InputError(f"{name} {value!r} is not a number")
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} {str(value).strip()!r} is not a number: type digits, e.g. 2") from None
    if not math.isfinite(number):
        raise InputError(f"{name} {value!r} is not a finite number")
    return number


def parse_int(value, name: str, lo: int, hi: int | None = None, default: int | None = None) -> int:
    """An integer in ``[lo, hi]`` (``hi`` None: no upper bound); empty gives ``default``.

    Raises:
        InputError: empty without a default, not a number, fractional, or out of range.
    """
    number = _number(value, name)
    if number is None:
        if default is None:
            raise InputError(f"{name} is empty: type a whole number"
                             + (f" between {lo} and {hi}" if hi is not None else f" ≥ {lo}"))
        return default
    if not number.is_integer():
        raise InputError(f"{name} {value} is not a whole number: use an integer")
    number = int(number)
    if number < lo or (hi is not None and number > hi):
        allowed = f"between {lo} and {hi}" if hi is not None else f"≥ {lo}"
        raise InputError(f"{name} {number} is out of range: use a whole number {allowed}")
    return number


def parse_float(value, name: str, lo: float, hi: float, default: float | None = None) -> float:
    """A number in ``[lo, hi]``; empty gives ``default``.

    Raises:
        InputError: empty without a default, not a number, or out of range.
    """
    number = _number(value, name)
    if number is None:
        if default is None:
            raise InputError(f"{name} is empty: type a number between {lo:g} and {hi:g}")
        return default
    if not lo <= number <= hi:
        raise InputError(f"{name} {number:g} is out of range: use a number between {lo:g} and {hi:g}")
    return number

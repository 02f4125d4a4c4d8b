"""Checks of the settings and arguments users pass, shared by every module, so that a bad value gets one message
wherever it enters."""

from __future__ import annotations

from numbers import Integral


def check_int(name: str, value: object, minimum: int, owner: str = "") -> int:
    """``value`` as an ``int`` (numpy's ints too, not bools) of at least ``minimum``, else a TypeError or ValueError
    naming ``name`` (after ``owner: `` where given, e.g. a policy's class)."""
    where = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{where}{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{where}{name} must be an int >= {minimum}, got {value}")
    return int(value)

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


def check_bits(bits: object, choices: tuple[int, ...], optional: bool = False) -> int | None:
    """``bits`` as an ``int`` among ``choices`` (numpy's ints too, not bools), or None where ``optional`` (full
    precision), else a TypeError or ValueError saying what to pass."""
    if bits is None and optional:
        return None
    what = f"None (full precision) or an int, one of {choices}" if optional else f"an int, one of {choices}"
    if isinstance(bits, bool) or not isinstance(bits, Integral):
        raise TypeError(f"bits must be {what}, got {type(bits).__name__} {bits!r}")
    if int(bits) not in choices:
        raise ValueError(f"bits must be {what}, got {bits}: codes are 2, 4 or 8 bits wide")
    return int(bits)

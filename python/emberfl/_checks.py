"""Argument checks shared by the Python wrappers of the Rust core.

The Rust binding takes counts, slot indices and thread counts as unsigned machine
integers; handed ``1.5``, ``"3"``, ``True`` or ``-1`` it raises PyO3's ``TypeError`` or
``OverflowError``, which name neither the argument nor what was expected. The wrappers
check their arguments here first, so a researcher gets an emberfl error instead:
``num_slots must be a positive integer, got 1.5``.

Integers are accepted as anything :func:`operator.index` takes (``int``, NumPy and
PyTorch integer scalars), except booleans.
"""

from __future__ import annotations

import math
import operator
from typing import SupportsIndex, cast

import torch

from emberfl.errors import EmberflError, InvalidArgumentError, SlotIndexError

__all__ = [
    "MAX_INDEX",
    "MAX_THREADS",
    "U32_MAX",
    "U64_MAX",
    "as_int",
    "check_int",
    "check_real",
    "check_slot",
    "check_threads",
]

MAX_INDEX = (1 << 63) - 1
"""The largest count or index a wrapper passes on (the binding's ``usize`` and Python's
``Py_ssize_t`` both hold it)."""
MAX_THREADS = 1024
"""The most Rust threads one call may use (``MAX_THREADS`` in ``rust/core/src/pool.rs``)."""
U32_MAX = (1 << 32) - 1
"""The largest unsigned 32-bit integer."""
U64_MAX = (1 << 64) - 1
"""The largest unsigned 64-bit integer."""


def _bound(value: int) -> str:
    """Write ``2**k-1`` for the large powers of two minus one, else the number."""
    if value >= U32_MAX and (value + 1) & value == 0:
        return f"2**{value.bit_length()}-1"
    if value <= -(1 << 31) and (-value) & (-value - 1) == 0:
        return f"-2**{(-value).bit_length() - 1}"
    return str(value)


def _kind(low: int, high: int, *, show_high: bool) -> str:
    """Describe the integers in ``low..high`` (the default upper bound only if asked)."""
    if high != MAX_INDEX or show_high:
        return f"an integer in {_bound(low)}..{_bound(high)}"
    if low == 0:
        return "a non-negative integer"
    if low == 1:
        return "a positive integer"
    return f"an integer >= {low}"


def _is_bool(value: object) -> bool:
    """Whether ``value`` is a Python, NumPy or PyTorch boolean."""
    return isinstance(value, bool) or "bool" in str(getattr(value, "dtype", ""))


def _as_int(value: object) -> int | None:
    """Return ``operator.index(value)``, or ``None`` for a boolean or a non-integer."""
    if _is_bool(value):
        return None
    try:
        return operator.index(cast(SupportsIndex, value))
    except TypeError:
        return None


def as_int(
    value: object,
    name: str,
    *,
    kind: str = "an integer",
    error: type[EmberflError] = InvalidArgumentError,
) -> int:
    """Return ``value`` as an ``int`` if it is an integer of any size (the range is the
    caller's to check, with its own exception).

    Args:
        value: The argument.
        name: Its name, for the message.
        kind: What it must be, for the message.
        error: The exception to raise.

    Returns:
        The integer.

    Raises:
        InvalidArgumentError: (or ``error``) ``value`` is not an integer.
    """
    number = value if type(value) is int else _as_int(value)
    if number is None:
        raise error(f"{name} must be {kind}, got {value!r}")
    return number


def check_int(
    value: object,
    name: str,
    *,
    low: int = 0,
    high: int = MAX_INDEX,
    error: type[EmberflError] = InvalidArgumentError,
) -> int:
    """Return ``value`` as an ``int`` if it is an integer in ``low..high`` (inclusive).

    Args:
        value: The argument.
        name: Its name, for the message (``"num_slots"``).
        low: The smallest valid value.
        high: The largest valid value.
        error: The exception to raise (a ``ValueError`` subclass of emberfl's).

    Returns:
        The integer.

    Raises:
        InvalidArgumentError: (or ``error``) ``value`` is not an integer (a float, a
            string, a boolean) or is out of range; the message names ``name`` and the
            value, e.g. ``"num_slots must be a positive integer, got 1.5"``.
    """
    number = value if type(value) is int else _as_int(value)
    if number is None:
        raise error(f"{name} must be {_kind(low, high, show_high=False)}, got {value!r}")
    if not low <= number <= high:
        kind = _kind(low, high, show_high=number > high)
        raise error(f"{name} must be {kind}, got {number}")
    return number


def check_slot(
    value: object, num_slots: int, *, name: str = "slot index", kind: str = "an integer"
) -> int:
    """Return ``value`` as a slot index of an arena of ``num_slots`` slots.

    Args:
        value: The index.
        num_slots: Slots in the arena.
        name: The argument's name, for the message when it is not an integer.
        kind: What the argument must be, for that message.

    Returns:
        The index, ``0 <= index < num_slots``.

    Raises:
        InvalidArgumentError: ``value`` is not an integer (``1.5``, ``"3"``, ``True``).
        SlotIndexError: It is out of range (a negative index included).
    """
    number = as_int(value, name, kind=kind)
    if not 0 <= number < num_slots:
        which = "" if name == "slot index" else f"{name}: "
        raise SlotIndexError(
            f"{which}slot {number} is out of range: the arena has {num_slots} slots "
            f"(0..{num_slots - 1})"
        )
    return number


def check_threads(num_threads: object, name: str = "num_threads") -> int:
    """Return a valid Rust thread count (``None``: PyTorch's intra-op thread count).

    Args:
        num_threads: The argument, or ``None``.
        name: Its name, for the message.

    Returns:
        The count, ``1..MAX_THREADS``.

    Raises:
        InvalidArgumentError: Not ``None`` nor an integer in ``1..MAX_THREADS``.
    """
    if num_threads is None:
        return min(torch.get_num_threads(), MAX_THREADS)
    return check_int(num_threads, name, low=1, high=MAX_THREADS)


def check_real(
    value: object,
    name: str,
    *,
    finite: bool = False,
    low: float | None = None,
    below: float | None = None,
    error: type[EmberflError] = InvalidArgumentError,
) -> float:
    """Return ``value`` as a ``float`` if it is a real number (not a boolean or a string).

    Anything ``float()`` converts without parsing text is a number: ``int``, ``float``,
    NumPy scalars, one-element tensors.

    Args:
        value: The argument.
        name: Its name, for the message (``"weight"``).
        finite: Also reject NaN and infinities.
        low: The smallest valid value, if any.
        below: The valid values are smaller than this, if given.
        error: The exception to raise.

    Returns:
        The number.

    Raises:
        InvalidArgumentError: (or ``error``) ``value`` is not a real number, is not
            finite when ``finite`` is set, or is outside ``[low, below)``.
    """
    number: float | None = None
    if type(value) is float:
        number = value
    elif not _is_bool(value) and hasattr(type(value), "__float__"):  # not str: it has none
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):  # e.g. a tensor of several elements
            number = None
    if number is None:
        raise error(f"{name} must be a number, got {value!r}")
    if finite and not math.isfinite(number):
        raise error(f"{name} must be a finite number, got {value!r}")
    if (low is not None and not number >= low) or (below is not None and not number < below):
        lo = "(-inf" if low is None else f"[{low:g}"
        hi = "inf)" if below is None else f"{below:g})"
        raise error(f"{name} must be a number in {lo}, {hi}, got {value!r}")
    return number

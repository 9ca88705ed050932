"""Naming a non-finite value: which tensor of the layout, which index inside it, what value.

The Rust kernels detect NaN and infinity as they read their inputs; these helpers run only
after one has raised, to find the first offending element again with
:func:`torch.isfinite` and to describe it in terms a researcher knows (``layer
'conv1.weight' [index 12] is nan``) rather than as a flat offset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

__all__ = ["Entry", "first_non_finite", "has_non_finite", "located"]


class Entry(Protocol):
    """One named tensor of a flat layout (:class:`~emberfl.arena.LayoutEntry`,
    :class:`~emberfl.algorithms.base.LayoutItem`)."""

    @property
    def name(self) -> str:
        """The ``state_dict`` key."""
        ...

    @property
    def offset(self) -> int:
        """Its first element in the flat vector."""
        ...

    @property
    def numel(self) -> int:
        """Its number of elements."""
        ...


def has_non_finite(flat: torch.Tensor) -> bool:
    """Whether a float tensor holds NaN or infinity.

    One reduction pass: a sum is finite only if every element is (a NaN or an infinity
    makes it NaN or infinite), so a finite sum settles it; only a non-finite sum, which
    finite elements can also give by overflowing, needs the element-wise check.

    Args:
        flat: A floating-point tensor.

    Returns:
        ``True`` if some element is NaN or infinite.
    """
    if math.isfinite(float(flat.sum())):
        return False
    return not bool(torch.isfinite(flat).all())


def first_non_finite(x: torch.Tensor) -> tuple[int, float] | None:
    """Return ``(flat index, value)`` of the first NaN or infinity of ``x``, if any.

    Args:
        x: A floating-point tensor (read as flat, in memory order of ``reshape(-1)``).

    Returns:
        The first offending element, or ``None`` if every element is finite.
    """
    flat = x.detach().reshape(-1)
    bad = ~torch.isfinite(flat)
    if not bool(bad.any()):
        return None
    index = int(torch.argmax(bad.to(torch.uint8)))  # argmax returns the first maximum
    return index, float(flat[index])


def located(index: int, layout: Sequence[Entry] | None, *, kind: str = "layer") -> str:
    """Describe flat element ``index``: ``"layer 'fc.weight' [index 12]"``.

    Args:
        index: A flat index into a vector laid out by ``layout``.
        layout: The vector's tensors, or ``None`` when it has no names.
        kind: What a tensor is called in the message (``"layer"``, ``"tensor"``).

    Returns:
        The tensor's name and the index inside that tensor, or ``"index N"`` when
        ``layout`` is ``None`` or does not cover ``index``.
    """
    for entry in layout or ():
        if entry.offset <= index < entry.offset + entry.numel:
            return f"{kind} {entry.name!r} [index {index - entry.offset}]"
    return f"index {index}"

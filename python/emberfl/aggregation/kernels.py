"""Deterministic kernels over arena slots (Rust, parallel, GIL released).

Every kernel gives bitwise-identical results for any ``num_threads``: work is split into
fixed blocks and every sum is taken in a fixed order in float64. ``num_threads`` defaults to
``torch.get_num_threads()`` so Rust and PyTorch do not oversubscribe the cores.

Every kernel raises :class:`~emberfl.errors.NonFiniteError` for an input slot holding NaN
or infinity, naming the slot, the tensor and the index inside it: the means and the
order statistics detect it as they read; :func:`norms` and :func:`pairwise_sq_dists`
check their small results, so a clipping or Krum-style rule built on them cannot act on a
NaN. Slot indices, thread counts and weights are checked before the Rust call
(:class:`~emberfl.errors.InvalidArgumentError`, :class:`~emberfl.errors.SlotIndexError`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from emberfl import _core
from emberfl._checks import check_real, check_slot, check_threads
from emberfl.aggregation._non_finite import first_non_finite, located
from emberfl.arena import ParamArena
from emberfl.errors import (
    InvalidArgumentError,
    InvalidWeightsError,
    NonFiniteError,
    TensorMismatchError,
)

__all__ = [
    "median",
    "norms",
    "pairwise_sq_dists",
    "sq_dists_to",
    "trimmed_mean",
    "weighted_mean",
]

Out = int | torch.Tensor
Slots = Sequence[int] | torch.Tensor | npt.NDArray[np.integer]
"""Slot indices: a sequence of integers, or an integer tensor or array."""


def _slots(arena: ParamArena, slots: Slots) -> list[int]:
    if isinstance(slots, str | bytes):
        raise InvalidArgumentError(f"slots must be a sequence of slot indices, got {slots!r}")
    items = slots.tolist() if isinstance(slots, torch.Tensor | np.ndarray) else slots
    try:
        values = list(items)
    except TypeError:
        raise InvalidArgumentError(
            f"slots must be a sequence of slot indices, got {type(slots).__name__}"
        ) from None
    n = arena.num_slots
    return [check_slot(s, n, name=f"slots[{i}]") for i, s in enumerate(values)]


def _out(arena: ParamArena, out: Out) -> int | npt.NDArray[np.float32]:
    if isinstance(out, torch.Tensor) and (out.dim() > 0 or out.is_floating_point()):
        if out.dtype != torch.float32 or out.device.type != "cpu":
            raise TensorMismatchError(
                f"out must be a float32 CPU tensor, got {out.dtype} on {out.device}"
            )
        if out.dim() != 1 or out.numel() != arena.dim or not out.is_contiguous():
            raise TensorMismatchError(
                f"out must be a contiguous 1-D tensor of {arena.dim} elements, got shape "
                f"{tuple(out.shape)}"
            )
        offset = out.data_ptr() - arena.core.data_address
        if 0 <= offset < arena.core.nbytes:
            if offset % (4 * arena.dim):
                raise TensorMismatchError("out views the arena but is not aligned with a slot")
            return offset // (4 * arena.dim)
        return out.detach().numpy()
    return check_slot(out, arena.num_slots, name="out", kind="a slot index or a float32 tensor")


def _non_finite_slot(arena: ParamArena, slots: Slots, rows_of: str = "") -> NonFiniteError | None:
    """The error naming the first of ``slots`` that holds NaN or infinity (failing path).

    ``rows_of``: the result whose rows follow ``slots`` (named in the message).
    """
    for position, slot in enumerate(slots):
        found = first_non_finite(arena.slot(slot))
        if found is not None:
            index, value = found
            row = f" (row {position} of {rows_of})" if rows_of else ""
            return NonFiniteError(
                f"slot {slot}{row} holds a non-finite value: "
                f"{located(index, arena.layout, kind='tensor')} is {value} (parameter "
                f"{index} of the slot)"
            )
    return None


def _named(arena: ParamArena, slots: Slots, err: NonFiniteError) -> NonFiniteError:
    return _non_finite_slot(arena, slots) or err


def weighted_mean(
    arena: ParamArena,
    slots: Slots,
    weights: Sequence[float] | torch.Tensor | npt.NDArray[np.floating],
    out: Out,
    *,
    num_threads: int | None = None,
) -> None:
    """Write ``sum_k w_k * slot_k / sum_k w_k`` into ``out`` (FedAvg's aggregation).

    Args:
        arena: The arena holding the inputs.
        slots: Input slots, combined in this order.
        weights: One non-negative weight per slot (e.g. client dataset sizes); at least one
            must be positive. Slots with weight zero are skipped.
        out: A slot index (it may be one of the inputs) or a float32 CPU tensor of ``dim``
            elements. Left untouched if an error is raised.
        num_threads: Rust threads; default ``torch.get_num_threads()``.

    Raises:
        InvalidWeightsError: NaN, negative, infinite or all-zero weights, weights that are
            not numbers (``"3"``, ``True``), or a wrong count.
        NonFiniteError: An input slot holds NaN or inf (the message names the slot, the
            tensor and the index inside it).
        SlotIndexError: A slot index out of range.
        InvalidArgumentError: An empty slot list, or a slot index or thread count that is
            not an integer.
    """
    items = weights.tolist() if isinstance(weights, torch.Tensor | np.ndarray) else weights
    try:
        values = list(items)
    except TypeError:
        raise InvalidWeightsError(
            f"weights must be a sequence of numbers, got {type(weights).__name__}"
        ) from None
    w = [check_real(x, f"weights[{i}]", error=InvalidWeightsError) for i, x in enumerate(values)]
    s = _slots(arena, slots)
    try:
        _core.weighted_mean(
            arena.core, s, w, _out(arena, out), num_threads=check_threads(num_threads)
        )
    except NonFiniteError as err:
        used = [slot for slot, weight in zip(s, w, strict=False) if weight != 0.0]
        raise _named(arena, used, err) from None


def median(arena: ParamArena, slots: Slots, out: Out, *, num_threads: int | None = None) -> None:
    """Write the coordinate-wise median of ``slots`` into ``out``.

    For an even number of slots each coordinate is the mean of the two middle values.

    Args:
        arena: The arena holding the inputs.
        slots: Input slots.
        out: A slot index or a float32 CPU tensor of ``dim`` elements.
        num_threads: Rust threads; default ``torch.get_num_threads()``.

    Raises:
        NonFiniteError: An input slot holds NaN or inf (the message names the slot, the
            tensor and the index inside it).
        SlotIndexError: A slot index out of range.
        InvalidArgumentError: An empty slot list, or a slot index or thread count that is
            not an integer.
    """
    s = _slots(arena, slots)
    try:
        _core.median(arena.core, s, _out(arena, out), num_threads=check_threads(num_threads))
    except NonFiniteError as err:
        raise _named(arena, s, err) from None


def trimmed_mean(
    arena: ParamArena,
    slots: Slots,
    out: Out,
    beta: float,
    *,
    num_threads: int | None = None,
) -> None:
    """Write the coordinate-wise ``beta``-trimmed mean of ``slots`` into ``out``.

    Drops the ``floor(beta * K)`` smallest and largest values of each coordinate (as
    ``scipy.stats.trim_mean``) and averages the rest.

    Args:
        arena: The arena holding the inputs.
        slots: Input slots (K of them).
        out: A slot index or a float32 CPU tensor of ``dim`` elements.
        beta: Fraction trimmed at each end, ``0 <= beta < 0.5``.
        num_threads: Rust threads; default ``torch.get_num_threads()``.

    Raises:
        InvalidArgumentError: ``beta`` not a number, out of range or trimming every value;
            an empty slot list; a slot index or thread count that is not an integer.
        NonFiniteError: An input slot holds NaN or inf (the message names the slot, the
            tensor and the index inside it).
        SlotIndexError: A slot index out of range.
    """
    s = _slots(arena, slots)
    b = check_real(beta, "beta", low=0.0, below=0.5)
    try:
        _core.trimmed_mean(
            arena.core, s, _out(arena, out), b, num_threads=check_threads(num_threads)
        )
    except NonFiniteError as err:
        raise _named(arena, s, err) from None


def norms(arena: ParamArena, slots: Slots, *, num_threads: int | None = None) -> torch.Tensor:
    """Return the L2 norm of each slot as a float64 tensor (for norm clipping).

    The norms are summed in float64, where no float32 input can overflow, so a norm is
    finite exactly when its slot is; the (small) result is checked, not the slots.

    Args:
        arena: The arena.
        slots: The slots.
        num_threads: Rust threads; default ``torch.get_num_threads()``.

    Returns:
        A ``(len(slots),)`` float64 tensor.

    Raises:
        NonFiniteError: A slot holds NaN or infinity (the message names the slot, the
            tensor and the index inside it), so no norm clipping can act on a NaN.
        SlotIndexError: A slot index out of range.
        InvalidArgumentError: An empty slot list, or a slot index or thread count that is
            not an integer.
    """
    s = _slots(arena, slots)
    result = torch.from_numpy(_core.norms(arena.core, s, num_threads=check_threads(num_threads)))
    if not bool(torch.isfinite(result).all()):
        bad = [slot for slot, v in zip(s, result.tolist(), strict=True) if not np.isfinite(v)]
        raise _non_finite_slot(arena, bad) or NonFiniteError(
            f"the norm of slot {bad[0]} is not finite"
        )
    return result


def pairwise_sq_dists(
    arena: ParamArena, slots: Slots, *, num_threads: int | None = None
) -> torch.Tensor:
    """Return the squared Euclidean distances between all pairs of slots (for Krum).

    A NaN or infinity in a slot makes every distance from it NaN or infinite (the
    distances are summed in float64, where no float32 difference overflows, and
    ``inf - inf`` is NaN), so checking the ``K x K`` result finds any non-finite input;
    with a single slot, which has no distance to compute, the slot itself is checked.

    Args:
        arena: The arena.
        slots: The K slots.
        num_threads: Rust threads; default ``torch.get_num_threads()``.

    Returns:
        A symmetric ``(K, K)`` float64 tensor with a zero diagonal.

    Raises:
        NonFiniteError: A slot holds NaN or infinity (the message names the slot, its
            row of the matrix, the tensor and the index inside it), so a Krum-style
            selection cannot silently pick or skip it.
        SlotIndexError: A slot index out of range.
        InvalidArgumentError: An empty slot list, or a slot index or thread count that is
            not an integer.
    """
    s = _slots(arena, slots)
    flat = _core.pairwise_sq_dists(arena.core, s, num_threads=check_threads(num_threads))
    result = torch.from_numpy(flat).view(len(s), len(s))
    if len(s) == 1 or not bool(torch.isfinite(result).all()):
        error = _non_finite_slot(arena, s, "the distance matrix")
        if error is not None:
            raise error
        if len(s) > 1:
            raise NonFiniteError("a pairwise distance is not finite, although every slot is")
    return result


def sq_dists_to(
    arena: ParamArena, slots: Slots, point: torch.Tensor, *, num_threads: int | None = None
) -> torch.Tensor:
    """Return the squared Euclidean distance from each slot to ``point`` (for the geometric
    median).

    Args:
        arena: The arena.
        slots: The slots.
        point: A float32 CPU tensor of ``dim`` elements.
        num_threads: Rust threads; default ``torch.get_num_threads()``.

    Returns:
        A ``(len(slots),)`` float64 tensor.

    Raises:
        NonFiniteError: A slot or the point holds NaN or infinity.
        TensorMismatchError: ``point`` is not a float32 CPU tensor of ``dim`` elements.
        SlotIndexError: A slot index out of range.
        InvalidArgumentError: An empty slot list, or a slot index or thread count that is
            not an integer.
    """
    s = _slots(arena, slots)
    if point.dtype != torch.float32 or point.device.type != "cpu" or point.numel() != arena.dim:
        raise TensorMismatchError(
            f"point must be a float32 CPU tensor of {arena.dim} elements, got {point.dtype} "
            f"of shape {tuple(point.shape)} on {point.device}"
        )
    array = point.detach().contiguous().reshape(-1).numpy()
    flat = _core.sq_dists_to(arena.core, s, array, num_threads=check_threads(num_threads))
    result = torch.from_numpy(flat)
    if not bool(torch.isfinite(result).all()):
        error = _non_finite_slot(arena, s)
        raise error or NonFiniteError("the point holds a non-finite value")
    return result

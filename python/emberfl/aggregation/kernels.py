"""Deterministic kernels over arena slots (Rust, parallel, GIL released).

Every kernel gives bitwise-identical results for any ``num_threads``: work is split into
fixed blocks and every sum is taken in a fixed order in float64. ``num_threads`` defaults to
``torch.get_num_threads()`` so Rust and PyTorch do not oversubscribe the cores.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from emberfl import _core
from emberfl.arena import ParamArena
from emberfl.errors import InvalidWeightsError, NonFiniteError, TensorMismatchError

__all__ = ["median", "norms", "pairwise_sq_dists", "trimmed_mean", "weighted_mean"]

Out = int | torch.Tensor


def _threads(num_threads: int | None) -> int:
    return torch.get_num_threads() if num_threads is None else int(num_threads)


def _slots(slots: Sequence[int] | torch.Tensor | npt.NDArray[np.integer]) -> list[int]:
    return [int(s) for s in (slots.tolist() if hasattr(slots, "tolist") else slots)]


def _out(arena: ParamArena, out: Out) -> int | npt.NDArray[np.float32]:
    if isinstance(out, torch.Tensor):
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
    if isinstance(out, bool) or not isinstance(out, int):
        raise TypeError(f"out must be a slot index or a tensor, got {type(out).__name__}")
    return out


def _named(arena: ParamArena, err: NonFiniteError) -> NonFiniteError:
    match = re.search(r"parameter index (\d+)", str(err))
    if match is None:
        return err
    name = arena.name_of(int(match.group(1)))
    return NonFiniteError(f"{err} (in tensor {name!r})")


def weighted_mean(
    arena: ParamArena,
    slots: Sequence[int],
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
        InvalidWeightsError: NaN, negative, infinite or all-zero weights, or a wrong count.
        NonFiniteError: An input slot holds NaN or inf (the message names slot and tensor).
        SlotIndexError: A slot index out of range.
        InvalidArgumentError: An empty slot list.
    """
    w = weights.tolist() if hasattr(weights, "tolist") else list(weights)
    try:
        w = [float(x) for x in w]
    except (TypeError, ValueError) as exc:
        raise InvalidWeightsError(f"weights must be numbers: {exc}") from None
    try:
        _core.weighted_mean(
            arena.core, _slots(slots), w, _out(arena, out), num_threads=_threads(num_threads)
        )
    except NonFiniteError as err:
        raise _named(arena, err) from None


def median(
    arena: ParamArena, slots: Sequence[int], out: Out, *, num_threads: int | None = None
) -> None:
    """Write the coordinate-wise median of ``slots`` into ``out``.

    For an even number of slots each coordinate is the mean of the two middle values.

    Args:
        arena: The arena holding the inputs.
        slots: Input slots.
        out: A slot index or a float32 CPU tensor of ``dim`` elements.
        num_threads: Rust threads; default ``torch.get_num_threads()``.

    Raises:
        NonFiniteError: An input slot holds NaN or inf.
    """
    try:
        _core.median(arena.core, _slots(slots), _out(arena, out), num_threads=_threads(num_threads))
    except NonFiniteError as err:
        raise _named(arena, err) from None


def trimmed_mean(
    arena: ParamArena,
    slots: Sequence[int],
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
        InvalidArgumentError: ``beta`` out of range or trimming every value.
        NonFiniteError: An input slot holds NaN or inf.
    """
    try:
        _core.trimmed_mean(
            arena.core,
            _slots(slots),
            _out(arena, out),
            float(beta),
            num_threads=_threads(num_threads),
        )
    except NonFiniteError as err:
        raise _named(arena, err) from None


def norms(
    arena: ParamArena, slots: Sequence[int], *, num_threads: int | None = None
) -> torch.Tensor:
    """Return the L2 norm of each slot as a float64 tensor (for norm clipping).

    Args:
        arena: The arena.
        slots: The slots.
        num_threads: Rust threads; default ``torch.get_num_threads()``.

    Returns:
        A ``(len(slots),)`` float64 tensor.
    """
    return torch.from_numpy(
        _core.norms(arena.core, _slots(slots), num_threads=_threads(num_threads))
    )


def pairwise_sq_dists(
    arena: ParamArena, slots: Sequence[int], *, num_threads: int | None = None
) -> torch.Tensor:
    """Return the squared Euclidean distances between all pairs of slots (for Krum).

    Args:
        arena: The arena.
        slots: The K slots.
        num_threads: Rust threads; default ``torch.get_num_threads()``.

    Returns:
        A symmetric ``(K, K)`` float64 tensor with a zero diagonal.
    """
    s = _slots(slots)
    flat = _core.pairwise_sq_dists(arena.core, s, num_threads=_threads(num_threads))
    return torch.from_numpy(flat).view(len(s), len(s))

"""How the server combines a round's updates: the streaming mean, or a rule over all of them.

The default, :class:`Mean`, is the weighted mean of the updates, folded in as each client's
update arrives (:class:`~emberfl.aggregation.WeightedSum`), so a round holds no update
beyond those in flight. Rules that need every update at once (coordinate-wise
:class:`Median`, :class:`TrimmedMean`, and the robust rules built on them) say so with
``needs_all_updates``; the executor then keeps the round's updates in an
:class:`UpdateSet`: one arena slot per client, in memory, or in a file when memory is short.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from emberfl.aggregation import kernels
from emberfl.arena import LayoutEntry, ParamArena
from emberfl.errors import InvalidArgumentError, NonFiniteError, SharedMemoryError

__all__ = ["Aggregator", "Mean", "Median", "TrimmedMean", "UpdateSet"]

MEMORY_FRACTION = 0.5
"""An :class:`UpdateSet` larger than this fraction of the available memory goes to a file."""


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class UpdateSet:
    """A round's updates of one stream, one arena slot each, in client-list order.

    The arena is a memfd when it fits in :data:`MEMORY_FRACTION` of the available memory,
    otherwise a file in ``spill_dir`` (removed on :meth:`close`).

    Attributes:
        name: The stream (e.g. ``"delta"``).
        weights: The updates' aggregation weights, in order.
        spilled: Whether the updates live in a file rather than in memory.
    """

    def __init__(
        self,
        count: int,
        dim: int,
        *,
        name: str = "delta",
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Reserve room for ``count`` updates of ``dim`` floats.

        Args:
            count: Updates in the round (>= 1).
            dim: Floats per update.
            name: The stream, for messages.
            spill_dir: Folder for the file when memory is short (default: the system's
                temporary folder).

        Raises:
            SharedMemoryError: Neither memory nor ``spill_dir`` has room; nothing is left
                behind.
        """
        if count < 1:
            raise InvalidArgumentError(f"an update set needs at least one update, got {count}")
        self.name = name
        self.weights: list[float] = []
        layout = (LayoutEntry(name, (int(dim),), 0, int(dim), "torch.float32"),)
        need = count * dim * 4
        available = _mem_available()
        folder = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())
        self.spilled = available is not None and need > MEMORY_FRACTION * available
        try:
            if self.spilled:
                self.arena = ParamArena.from_layout(
                    layout, count, backing="shm", shm_dir=str(folder)
                )
            else:
                self.arena = ParamArena.from_layout(layout, count)
        except SharedMemoryError as exc:
            gib = need / 2**30
            raise SharedMemoryError(
                f"the aggregator needs all {count} updates of {name!r} at once ({count} x "
                f"{dim * 4 / 2**20:.1f} MiB = {gib:.2f} GiB), and neither memory nor "
                f"{folder} has room ({exc}); sample fewer clients per round, use the "
                "streaming mean, or pass a spill folder with more free space"
            ) from None

    @property
    def count(self) -> int:
        """Updates stored so far."""
        return len(self.weights)

    @property
    def capacity(self) -> int:
        """Updates the set has room for."""
        return self.arena.num_slots

    def add(self, x: torch.Tensor, weight: float, *, source: str) -> None:
        """Store the next update.

        Args:
            x: ``dim`` float32 values.
            weight: Its aggregation weight.
            source: Who sent it, for messages (``"client 17"``).

        Raises:
            NonFiniteError: ``x`` holds NaN or infinity (nothing is stored).
        """
        if self.count >= self.capacity:
            raise InvalidArgumentError(f"the update set is full ({self.capacity} updates)")
        flat = x.detach().reshape(-1)
        if not bool(torch.isfinite(flat).all()):
            index = int((~torch.isfinite(flat)).nonzero()[0, 0])
            raise NonFiniteError(
                f"{source} sent a non-finite {self.name!r}: {float(flat[index])} at index "
                f"{index}; it was not aggregated"
            )
        if not math.isfinite(weight) or weight < 0:
            raise InvalidArgumentError(f"{source}: weight {weight} must be finite and >= 0")
        self.arena.slot(self.count).copy_(flat)
        self.weights.append(float(weight))

    def close(self) -> None:
        """Release the memory (or remove the file)."""
        with contextlib.suppress(Exception):
            self.arena.close()

    def __enter__(self) -> UpdateSet:
        """Return the set."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Call :meth:`close`."""
        self.close()


class Aggregator(ABC):
    """A rule that turns a round's updates of the main stream into one update.

    Attributes:
        name: A short name (``"mean"``, ``"median"``, ...).
        needs_all_updates: ``False``: the executor streams updates into a weighted sum
            (:class:`Mean` only). ``True``: :meth:`combine` sees all of them at once.
    """

    name: str = "aggregator"
    needs_all_updates: bool = True

    @abstractmethod
    def combine(self, updates: UpdateSet, out: torch.Tensor, *, num_threads: int | None) -> None:
        """Write the combined update into ``out``.

        Args:
            updates: The round's updates.
            out: A float32 tensor of ``dim`` elements.
            num_threads: Rust threads (``None``: PyTorch's count).
        """


class Mean(Aggregator):
    """The weighted mean ``sum_k w_k x_k / sum_k w_k``, streamed (FedAvg's rule)."""

    name = "mean"
    needs_all_updates = False

    def combine(self, updates: UpdateSet, out: torch.Tensor, *, num_threads: int | None) -> None:
        """Write the weighted mean of ``updates`` (used only when they were all kept)."""
        slots = list(range(updates.count))
        kernels.weighted_mean(updates.arena, slots, updates.weights, out, num_threads=num_threads)


class Median(Aggregator):
    """Coordinate-wise median (unweighted; the mean of the two middle values for an even count)."""

    name = "median"

    def combine(self, updates: UpdateSet, out: torch.Tensor, *, num_threads: int | None) -> None:
        """Write the coordinate-wise median of ``updates``."""
        kernels.median(updates.arena, list(range(updates.count)), out, num_threads=num_threads)


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean: drop the ``floor(beta * m)`` largest and smallest values.

    Attributes:
        beta: Fraction trimmed at each end, ``0 <= beta < 0.5``.
    """

    name = "trimmed-mean"

    def __init__(self, beta: float = 0.1) -> None:
        """Create the rule.

        Args:
            beta: Fraction trimmed at each end.

        Raises:
            InvalidArgumentError: ``beta`` outside ``[0, 0.5)``.
        """
        if not 0 <= beta < 0.5:
            raise InvalidArgumentError(f"beta={beta} is out of range: use 0 <= beta < 0.5")
        self.beta = float(beta)

    def combine(self, updates: UpdateSet, out: torch.Tensor, *, num_threads: int | None) -> None:
        """Write the coordinate-wise trimmed mean of ``updates``."""
        kernels.trimmed_mean(
            updates.arena, list(range(updates.count)), out, self.beta, num_threads=num_threads
        )

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
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch

from emberfl._checks import check_int, check_real
from emberfl.aggregation import kernels
from emberfl.aggregation._non_finite import Entry, has_non_finite
from emberfl.aggregation.streaming import non_finite_update
from emberfl.arena import LayoutEntry, ParamArena
from emberfl.errors import InvalidArgumentError, SharedMemoryError

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
        layout: Sequence[Entry] | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Reserve room for ``count`` updates of ``dim`` floats.

        Args:
            count: Updates in the round (>= 1).
            dim: Floats per update (>= 1).
            name: The stream, for messages.
            layout: The named tensors of an update (``ModelLayout.items``), so that a
                non-finite value is reported by layer and index inside the layer.
            spill_dir: Folder for the file when memory is short (default: the system's
                temporary folder).

        Raises:
            InvalidArgumentError: ``count`` or ``dim`` is not a positive integer.
            SharedMemoryError: Neither memory nor ``spill_dir`` has room; nothing is left
                behind.
        """
        count = check_int(count, "count (updates in the set)", low=1)
        dim = check_int(dim, "dim", low=1)
        self.name = name
        self.weights: list[float] = []
        self._layout = layout
        slot_layout = (LayoutEntry(name, (dim,), 0, dim, "torch.float32"),)
        need = count * dim * 4
        available = _mem_available()
        folder = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())
        self.spilled = available is not None and need > MEMORY_FRACTION * available
        try:
            if self.spilled:
                self.arena = ParamArena.from_layout(
                    slot_layout, count, backing="shm", shm_dir=str(folder)
                )
            else:
                self.arena = ParamArena.from_layout(slot_layout, count)
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
            NonFiniteError: ``x`` holds NaN or infinity, or a value float32 cannot hold
                (nothing is stored); the message names the layer and the index inside it.
            InvalidArgumentError: A weight that is not a finite number >= 0, or a full set.
        """
        if self.count >= self.capacity:
            raise InvalidArgumentError(f"the update set is full ({self.capacity} updates)")
        w = check_real(weight, f"{source}: the weight of {self.name!r}", finite=True, low=0.0)
        row = self.arena.slot(self.count)
        row.copy_(x.detach().reshape(-1))
        # Checked after the copy, as float32: a float64 value beyond float32's range is
        # infinite here. The slot only counts once the weight is appended.
        if has_non_finite(row):
            error = non_finite_update(source, self.name, row, self._layout)
            if error is not None:
                raise error
        self.weights.append(w)

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
        handles_empty: Whether :meth:`combine` takes a round without updates (otherwise
            such a round's combined update is zero).
    """

    name: str = "aggregator"
    needs_all_updates: bool = True
    handles_empty: bool = False

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Return the rule's state that carries over between rounds (default: none)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:  # noqa: B027
        """Restore :meth:`state_tensors` (default: nothing to restore)."""

    def begin_round(self, seed: int, round: int) -> None:  # noqa: B027 - optional hook
        """Note the experiment seed and the round about to be combined (default: nothing;
        a rule that draws random numbers takes them from this round's streams).

        Args:
            seed: The experiment seed.
            round: The round (0-based).
        """

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
            InvalidArgumentError: ``beta`` is not a number, or is outside ``[0, 0.5)``.
        """
        self.beta = check_real(beta, "beta", low=0.0, below=0.5)

    def combine(self, updates: UpdateSet, out: torch.Tensor, *, num_threads: int | None) -> None:
        """Write the coordinate-wise trimmed mean of ``updates``."""
        kernels.trimmed_mean(
            updates.arena, list(range(updates.count)), out, self.beta, num_threads=num_threads
        )

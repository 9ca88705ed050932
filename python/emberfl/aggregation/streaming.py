"""Streaming weighted sums: fold each client's update in as it arrives.

A :class:`WeightedSum` keeps ``sum_k w_k x_k`` in float64 (a Rust accumulator) and the total
weight; the division happens once, in :meth:`WeightedSum.mean`. Updates are added one at a
time, in the order :meth:`WeightedSum.add` is called, so the result depends on that order
only, never on the thread count: emberfl's executors add updates in the order of the round's
client list, whatever order the clients finish in. A round therefore needs one float64
vector per stream, not one vector per client.

An update holding NaN or infinity is refused (:class:`~emberfl.errors.NonFiniteError`,
naming the sender, the stream, the layer, the index inside the layer and the value) and
leaves the sum as it was. The Rust accumulator checks every value as it adds; the message
is worked out only when it has refused one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from emberfl import _core
from emberfl._checks import check_int, check_real, check_threads
from emberfl.aggregation._non_finite import Entry, first_non_finite, located
from emberfl.errors import InvalidWeightsError, NonFiniteError, TensorMismatchError

__all__ = ["WeightedSum", "non_finite_update"]


def non_finite_update(
    source: str,
    stream: str,
    x: torch.Tensor,
    layout: Sequence[Entry] | None = None,
    describe: Callable[[int], str] | None = None,
) -> NonFiniteError | None:
    """Return the error for an update that holds NaN or infinity (``None`` if it does not).

    Meant for the failing path only: it scans ``x`` with :func:`torch.isfinite`.

    Args:
        source: Who sent the update (``"client 7"``).
        stream: The uplink stream (``"delta"``).
        x: The update.
        layout: The tensors of the flat update, to name the layer and the index inside it.
        describe: Without ``layout``: turns a flat index into a tensor name.

    Returns:
        ``client 7 sent a non-finite update: stream 'delta', layer 'conv1.weight'
        [index 12] is nan; ...``, or ``None`` if every value is finite.
    """
    found = first_non_finite(x)
    if found is None:
        return None
    index, value = found
    where = located(index, layout)
    if layout is None and describe is not None:
        where = f"layer {describe(index)!r} [flat index {index}]"
    return NonFiniteError(
        f"{source} sent a non-finite update: stream {stream!r}, {where} is {value}; it was "
        "not aggregated (a diverging client: lower the learning rate, or clip updates)"
    )


class WeightedSum:
    """``sum_k w_k x_k`` and ``sum_k w_k`` over float32 vectors of one length.

    Example:
        >>> import torch
        >>> s = WeightedSum(3)
        >>> s.add(torch.tensor([1.0, 2.0, 3.0]), 1.0)
        >>> s.add(torch.tensor([4.0, 5.0, 6.0]), 2.0)
        >>> s.count, s.weight, s.mean().tolist()
        (2, 3.0, [3.0, 4.0, 5.0])

    Attributes:
        name: What the sum is of (for error messages), e.g. ``"delta"``.
    """

    def __init__(
        self,
        dim: int,
        *,
        name: str = "update",
        layout: Sequence[Entry] | None = None,
        describe: Callable[[int], str] | None = None,
        num_threads: int | None = None,
    ) -> None:
        """Create an empty sum.

        Args:
            dim: Elements per vector (>= 1).
            name: What the vectors are (the uplink stream), for error messages.
            layout: The named tensors of a vector (``ModelLayout.items``, an arena's
                ``layout``), so that a non-finite value is reported by layer and index
                inside the layer.
            describe: Without ``layout``: turns a flat index into the name of the tensor
                it belongs to (e.g. ``"fc1.weight"``), for error messages.
            num_threads: Rust threads; default ``torch.get_num_threads()`` at each call.

        Raises:
            InvalidArgumentError: ``dim`` or ``num_threads`` is not a positive integer (in
                range).
        """
        self._acc = _core.Accumulator(check_int(dim, "dim", low=1))
        self.name = name
        self._layout = layout
        self._describe = describe
        self._num_threads = None if num_threads is None else check_threads(num_threads)

    @property
    def dim(self) -> int:
        """Elements per vector."""
        return self._acc.dim

    @property
    def count(self) -> int:
        """Vectors added so far."""
        return self._acc.count

    @property
    def weight(self) -> float:
        """Sum of their weights."""
        return self._acc.weight

    def add(self, x: torch.Tensor, weight: float, *, source: str | None = None) -> None:
        """Add ``weight * x``.

        Args:
            x: A float32 CPU tensor of :attr:`dim` elements (any shape; a view of shared
                memory is read in place).
            weight: Its weight (finite, >= 0).
            source: Who sent ``x``, for error messages (e.g. ``"client 17"``).

        Raises:
            NonFiniteError: ``x`` holds NaN or infinity; nothing is added.
            InvalidWeightsError: A NaN, infinite or negative weight, or one that is not a
                number (``"3"``, ``True``); nothing is added.
            TensorMismatchError: ``x`` has the wrong size, dtype or device.
        """
        who = source or f"{self.name} {self.count}"
        if not isinstance(x, torch.Tensor):
            raise TensorMismatchError(
                f"{who}: {self.name} must be a tensor, got {type(x).__name__}"
            )
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() != self.dim:
            raise TensorMismatchError(
                f"{who} sent {self.name!r} as a {x.dtype} tensor of shape {tuple(x.shape)} on "
                f"{x.device}; expected {self.dim} float32 values on the CPU"
            )
        w = check_real(weight, f"{who}: the weight of {self.name!r}", error=InvalidWeightsError)
        flat = x.detach().reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        try:
            self._acc.add(flat.numpy(), w, num_threads=check_threads(self._num_threads))
        except NonFiniteError as err:
            named = non_finite_update(who, self.name, flat, self._layout, self._describe)
            raise (named or NonFiniteError(f"{who}: stream {self.name!r}: {err}")) from None

    def mean(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return ``float32(sum / weight)``.

        Args:
            out: A contiguous float32 CPU tensor of :attr:`dim` elements to write into.

        Returns:
            ``out``, or a new tensor.

        Raises:
            InvalidWeightsError: If the weights sum to zero.
        """
        target = self._target(out)
        self._acc.mean(target.numpy(), num_threads=check_threads(self._num_threads))
        return target

    def sum(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return ``float32(sum)``.

        Args:
            out: A contiguous float32 CPU tensor of :attr:`dim` elements to write into.

        Returns:
            ``out``, or a new tensor.
        """
        target = self._target(out)
        self._acc.sum(target.numpy(), num_threads=check_threads(self._num_threads))
        return target

    def sum64(self) -> torch.Tensor:
        """Return a float64 copy of the running sum."""
        return torch.from_numpy(self._acc.sum64())

    def merge(self, other: WeightedSum) -> None:
        """Add ``other``'s sum, weight and count (its vectors count as added after these).

        Args:
            other: A sum of the same length.
        """
        self._acc.merge(other._acc, num_threads=check_threads(self._num_threads))

    def reset(self) -> None:
        """Forget every vector."""
        self._acc.reset()

    def _target(self, out: torch.Tensor | None) -> torch.Tensor:
        if out is None:
            return torch.empty(self.dim, dtype=torch.float32)
        if (
            out.dtype != torch.float32
            or out.device.type != "cpu"
            or out.numel() != self.dim
            or not out.is_contiguous()
        ):
            raise TensorMismatchError(
                f"out must be a contiguous float32 CPU tensor of {self.dim} elements, got "
                f"{out.dtype} of shape {tuple(out.shape)}"
            )
        return out.view(-1)

    def __repr__(self) -> str:
        """Describe the sum."""
        return f"WeightedSum({self.name!r}, dim={self.dim}, count={self.count})"

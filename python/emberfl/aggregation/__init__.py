"""Aggregation: deterministic kernels, streaming weighted sums and the server's rules.

* :mod:`~emberfl.aggregation.kernels` — Rust kernels over arena slots (weighted mean,
  median, trimmed mean, norms, pairwise distances, distances to a point), bitwise identical
  for any thread count.
* :class:`WeightedSum` — a float64 running sum that client updates are folded into, in
  client-list order, as they arrive.
* :class:`Aggregator` — the server's rule over a round's updates: :class:`Mean` (streamed)
  or rules that need every update at once (:class:`Median`, :class:`TrimmedMean` and the
  Byzantine-robust rules of :mod:`~emberfl.aggregation.robust`: :class:`Krum`,
  :class:`MultiKrum`, :class:`Bulyan`, :class:`GeometricMedian`, :class:`ClippedMean`),
  kept in an :class:`UpdateSet`. :data:`AGGREGATORS` names them for the CLI.

Example:
    >>> import torch
    >>> from emberfl.arena import ParamArena
    >>> from emberfl.aggregation import weighted_mean
    >>> arena = ParamArena.from_model({"w": torch.zeros(3)}, num_slots=3)
    >>> arena.slot(0).fill_(1.0); arena.slot(1).fill_(4.0)  # doctest: +ELLIPSIS
    tensor(...)
    tensor(...)
    >>> weighted_mean(arena, [0, 1], [2.0, 1.0], out=2)
    >>> arena.slot(2).tolist()
    [2.0, 2.0, 2.0]
"""

from __future__ import annotations

from emberfl.aggregation.aggregators import Aggregator, Mean, Median, TrimmedMean, UpdateSet
from emberfl.aggregation.kernels import (
    median,
    norms,
    pairwise_sq_dists,
    sq_dists_to,
    trimmed_mean,
    weighted_mean,
)
from emberfl.aggregation.robust import Bulyan, ClippedMean, GeometricMedian, Krum, MultiKrum
from emberfl.aggregation.streaming import WeightedSum

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (Mean, Median, TrimmedMean, Krum, MultiKrum, Bulyan, GeometricMedian, ClippedMean)
}
"""The server's rules by name (``--aggregator``)."""

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "Bulyan",
    "ClippedMean",
    "GeometricMedian",
    "Krum",
    "MultiKrum",
    "Mean",
    "Median",
    "TrimmedMean",
    "UpdateSet",
    "WeightedSum",
    "median",
    "norms",
    "pairwise_sq_dists",
    "sq_dists_to",
    "trimmed_mean",
    "weighted_mean",
]

"""Aggregation: deterministic kernels, streaming weighted sums and the server's rules.

* :mod:`~emberfl.aggregation.kernels` — Rust kernels over arena slots (weighted mean,
  median, trimmed mean, norms, pairwise distances), bitwise identical for any thread count.
* :class:`WeightedSum` — a float64 running sum that client updates are folded into, in
  client-list order, as they arrive.
* :class:`Aggregator` — the server's rule over a round's updates: :class:`Mean` (streamed)
  or rules that need every update at once (:class:`Median`, :class:`TrimmedMean`), kept in
  an :class:`UpdateSet`.

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
    trimmed_mean,
    weighted_mean,
)
from emberfl.aggregation.streaming import WeightedSum

__all__ = [
    "Aggregator",
    "Mean",
    "Median",
    "TrimmedMean",
    "UpdateSet",
    "WeightedSum",
    "median",
    "norms",
    "pairwise_sq_dists",
    "trimmed_mean",
    "weighted_mean",
]

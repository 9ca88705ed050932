"""Reproducibility: BlazeFL's seeding helpers plus emberfl's per-client generator suites.

* :func:`setup_reproducibility`, :func:`seed_everything`, :class:`RandomStateSnapshot`,
  :class:`RNGSuite`, :func:`create_rng_suite` — BlazeFL 3.0's API.
* :func:`client_rng_suite` — a client's generators as a pure function of
  ``(seed, cid, round)``, the same in every thread or process.
"""

from __future__ import annotations

from emberfl.reproducibility.client_rng import client_rng_suite
from emberfl.reproducibility.snapshot import (
    RandomStateSnapshot,
    RNGSuite,
    create_rng_suite,
    seed_everything,
    setup_reproducibility,
)

__all__ = [
    "RNGSuite",
    "RandomStateSnapshot",
    "client_rng_suite",
    "create_rng_suite",
    "seed_everything",
    "setup_reproducibility",
]

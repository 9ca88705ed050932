"""BlazeFL 2.x's ``blazefl.reproducibility.generator`` module path, kept for ported imports.

The names live in :mod:`emberfl.reproducibility.snapshot` (BlazeFL 3.0 keeps them in
``blazefl.reproducibility``); import them from :mod:`emberfl.reproducibility` in new code.
"""

from __future__ import annotations

from emberfl.reproducibility.snapshot import RNGSuite, create_rng_suite, setup_reproducibility

__all__ = ["RNGSuite", "create_rng_suite", "setup_reproducibility"]

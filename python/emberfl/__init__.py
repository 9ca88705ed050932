"""emberfl: fast, deterministic federated-learning simulation for PyTorch.

The heavy lifting (counter-based RNG streams, the shared-memory parameter arena and the
aggregation kernels) lives in the Rust extension ``emberfl._core``; the protocols a
researcher subclasses are small Python classes in :mod:`emberfl.core`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

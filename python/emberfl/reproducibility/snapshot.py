"""BlazeFL's reproducibility helpers: seeding, isolated generator suites, state snapshots.

:func:`seed_everything` and :meth:`RandomStateSnapshot.restore` deliberately change the
*global* random state; they are for your script to call. emberfl itself never calls them —
the framework only ever draws from generators it owns (see :func:`client_rng_suite`).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from emberfl._checks import U32_MAX, U64_MAX, check_int

__all__ = [
    "RNGSuite",
    "RandomStateSnapshot",
    "create_rng_suite",
    "seed_everything",
    "setup_reproducibility",
]


def setup_reproducibility(seed: int) -> None:
    """Configure the process for deterministic runs (no random state is seeded).

    Sets ``PYTHONHASHSEED`` (inherited by worker processes started afterwards) and makes
    cuDNN choose deterministic algorithms.

    Args:
        seed: The value for ``PYTHONHASHSEED`` (``0..2**32-1``, the values Python accepts).

    Raises:
        InvalidArgumentError: ``seed`` is not an integer in ``0..2**32-1``.
    """
    seed = check_int(seed, "seed", high=U32_MAX)
    os.environ["PYTHONHASHSEED"] = str(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's *global* generators (and call
    :func:`setup_reproducibility`).

    Args:
        seed: The seed (``0..2**32-1``, what NumPy's global generator accepts).

    Raises:
        InvalidArgumentError: ``seed`` is not an integer in ``0..2**32-1``.
    """
    seed = check_int(seed, "seed", high=U32_MAX)
    setup_reproducibility(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@dataclass
class RandomStateSnapshot:
    """The global random state of Python, NumPy and PyTorch at one moment.

    Attributes:
        environ: ``PYTHONHASHSEED`` (empty if unset).
        python: :func:`random.getstate`.
        numpy: NumPy's legacy global state.
        torch_cpu: PyTorch's CPU generator state.
        torch_cpu_seed: PyTorch's CPU initial seed.
        torch_cuda: The current CUDA generator's state, if CUDA is available.
        torch_cuda_seed: Its initial seed, if CUDA is available.
    """

    environ: str
    python: tuple[Any, ...]
    numpy: tuple[str, npt.NDArray[np.uint32], int, int, float]
    torch_cpu: torch.Tensor
    torch_cpu_seed: int
    torch_cuda: torch.Tensor | None
    torch_cuda_seed: int | None

    @classmethod
    def capture(cls) -> RandomStateSnapshot:
        """Capture the current global random state.

        Returns:
            The snapshot.
        """
        numpy_state = np.random.get_state(legacy=True)
        if not isinstance(numpy_state, tuple):  # pragma: no cover - legacy=True is a tuple
            raise TypeError("numpy returned a non-legacy random state")
        snapshot = cls(
            environ=os.environ.get("PYTHONHASHSEED", ""),
            python=random.getstate(),
            numpy=numpy_state,
            torch_cpu=torch.get_rng_state(),
            torch_cpu_seed=torch.initial_seed(),
            torch_cuda=None,
            torch_cuda_seed=None,
        )
        if torch.cuda.is_available():
            snapshot.torch_cuda = torch.cuda.get_rng_state()
            snapshot.torch_cuda_seed = torch.cuda.initial_seed()
        return snapshot

    @staticmethod
    def restore(snapshot: RandomStateSnapshot) -> None:
        """Make the global random state what ``snapshot`` recorded.

        Args:
            snapshot: A snapshot from :meth:`capture`.
        """
        if snapshot.environ:
            os.environ["PYTHONHASHSEED"] = snapshot.environ
        else:
            os.environ.pop("PYTHONHASHSEED", None)
        random.setstate(snapshot.python)
        np.random.set_state(snapshot.numpy)
        torch.manual_seed(snapshot.torch_cpu_seed)
        torch.set_rng_state(snapshot.torch_cpu)
        if snapshot.torch_cuda is not None and snapshot.torch_cuda_seed is not None:
            torch.cuda.manual_seed(snapshot.torch_cuda_seed)
            torch.cuda.set_rng_state(snapshot.torch_cuda)


@dataclass
class RNGSuite:
    """Independent generators for Python, NumPy and PyTorch, none of them global.

    Attributes:
        python: A :class:`random.Random`.
        numpy: A :class:`numpy.random.Generator`.
        torch_cpu: A CPU :class:`torch.Generator`.
        torch_cuda: A CUDA :class:`torch.Generator`, or ``None`` without CUDA.
    """

    python: random.Random
    numpy: np.random.Generator
    torch_cpu: torch.Generator
    torch_cuda: torch.Generator | None = None


def create_rng_suite(seed: int) -> RNGSuite:
    """Build an :class:`RNGSuite` with every generator seeded with ``seed`` (BlazeFL's rule).

    For per-client generators that do not depend on which thread or process runs the
    client, use :func:`emberfl.reproducibility.client_rng_suite`.

    Args:
        seed: The seed (unsigned 64-bit).

    Returns:
        The suite.

    Raises:
        InvalidArgumentError: ``seed`` is not an integer in ``0..2**64-1``.
    """
    seed = check_int(seed, "seed", high=U64_MAX)
    torch_cuda = None
    if torch.cuda.is_available():
        torch_cuda = torch.Generator(device="cuda").manual_seed(seed)
    return RNGSuite(
        python=random.Random(seed),
        numpy=np.random.default_rng(seed),
        torch_cpu=torch.Generator(device="cpu").manual_seed(seed),
        torch_cuda=torch_cuda,
    )

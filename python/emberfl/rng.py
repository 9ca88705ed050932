"""Counter-based random-number streams (Philox4x64-10).

Every random decision emberfl makes is drawn from a stream identified by
``(seed, purpose, client, round)``. A stream is a Philox4x64-10 generator keyed by
``[seed, purpose]`` whose counter starts at ``[0, client, round, 0]``; its raw output is
bit-identical to ``numpy.random.Philox(key=[seed, purpose], counter=[0, client, round, 0])``.
Because the state is a pure function of these four numbers, a client's randomness does not
depend on which thread or process trains it, nor on the order clients run in.
"""

from __future__ import annotations

import enum

import numpy as np

from emberfl._core import Stream, philox4x32_10, philox4x64_10

__all__ = ["Purpose", "Stream", "numpy_generator", "philox4x32_10", "philox4x64_10", "stream"]


class Purpose(enum.IntEnum):
    """Well-known ``purpose`` values, so independent uses of one seed never collide."""

    GENERIC = 0
    PARTITION = 1
    CLIENT_SAMPLING = 2
    CLIENT_TRAINING = 3
    MODEL_INIT = 4
    SYNTHETIC_DATA = 5
    EVALUATION = 6
    SUBSAMPLE = 7
    DROPOUT = 8


_U64 = (1 << 64) - 1


def _check_u64(name: str, value: int) -> int:
    value = int(value)
    if not 0 <= value <= _U64:
        raise ValueError(f"{name}={value} is out of range: it must fit in an unsigned 64-bit int")
    return value


def stream(seed: int, *, purpose: int = 0, client: int = 0, round: int = 0) -> Stream:
    """Return the stream ``(seed, purpose, client, round)``.

    Args:
        seed: The experiment seed (unsigned 64-bit).
        purpose: What the numbers are for; see :class:`Purpose`.
        client: Client id.
        round: Communication round.

    Returns:
        A fresh :class:`Stream` at the start of its sequence.

    Example:
        >>> import numpy as np
        >>> s = stream(42, purpose=Purpose.PARTITION, client=3)
        >>> ref = np.random.Philox(key=[42, 1], counter=[0, 3, 0, 0])
        >>> bool((s.random_raw(8) == ref.random_raw(8)).all())
        True
    """
    return Stream(
        _check_u64("seed", seed),
        purpose=_check_u64("purpose", purpose),
        client=_check_u64("client", client),
        round=_check_u64("round", round),
    )


def numpy_generator(
    seed: int, *, purpose: int = 0, client: int = 0, round: int = 0
) -> np.random.Generator:
    """Return a :class:`numpy.random.Generator` on the stream ``(seed, purpose, client, round)``.

    Its bits are the same as those of :func:`stream` with the same arguments, so numpy's
    distributions (Dirichlet, lognormal, ...) can be drawn from an emberfl stream.

    Args:
        seed: The experiment seed (unsigned 64-bit).
        purpose: What the numbers are for; see :class:`Purpose`.
        client: Client id.
        round: Communication round.

    Returns:
        A fresh generator; it never touches numpy's global random state.
    """
    key = np.array([_check_u64("seed", seed), _check_u64("purpose", purpose)], dtype=np.uint64)
    counter = np.array(
        [0, _check_u64("client", client), _check_u64("round", round), 0], dtype=np.uint64
    )
    return np.random.Generator(np.random.Philox(key=key, counter=counter))

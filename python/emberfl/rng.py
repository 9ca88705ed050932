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
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from emberfl import _core
from emberfl._checks import MAX_INDEX, U32_MAX, U64_MAX, check_int
from emberfl.errors import InvalidArgumentError

__all__ = ["Purpose", "Stream", "numpy_generator", "philox4x32_10", "philox4x64_10", "stream"]

StreamState = tuple[int, int, int, int, int, int, int, bool, int]
"""``Stream.state()``: key (2 words), counter (4 words), buffer position, whether a
32-bit half word is pending, and that half word."""

Words = Sequence[int] | npt.NDArray[np.integer]
"""Words of a Philox counter or key: a sequence of integers or an integer array."""

_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


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
    CLIENT_TEST_SPLIT = 9
    LOCAL_WORK = 10
    MALICIOUS = 11
    ATTACK = 12
    DP_NOISE = 13
    COMPRESSION = 14
    CLIENT_SPEED = 15
    DP_SGD_NOISE = 16
    FEATURE_NOISE = 17


def _check_u64(name: str, value: int) -> int:
    return check_int(value, name, high=U64_MAX)


def _count(name: str, value: int) -> int:
    return check_int(value, name, high=MAX_INDEX)


def _words(name: str, value: Words, count: int, high: int) -> list[int]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        raise InvalidArgumentError(f"{name} must be {count} integers, got {value!r}")
    words = list(value)
    if len(words) != count:
        raise InvalidArgumentError(f"{name} must be {count} integers, got {len(words)}")
    return [check_int(w, f"{name}[{i}]", high=high) for i, w in enumerate(words)]


def philox4x64_10(counter: Words, key: Words) -> list[int]:
    """Return the Philox4x64-10 block of ``counter`` under ``key`` (4 unsigned 64-bit words).

    Args:
        counter: 4 unsigned 64-bit words.
        key: 2 unsigned 64-bit words.

    Returns:
        The 4 output words.

    Raises:
        InvalidArgumentError: A word count other than 4 and 2, or a word that is not an
            unsigned 64-bit integer.
    """
    return _core.philox4x64_10(
        _words("counter", counter, 4, U64_MAX), _words("key", key, 2, U64_MAX)
    )


def philox4x32_10(counter: Words, key: Words) -> list[int]:
    """Return the Philox4x32-10 block of ``counter`` under ``key`` (4 unsigned 32-bit words).

    Args:
        counter: 4 unsigned 32-bit words.
        key: 2 unsigned 32-bit words.

    Returns:
        The 4 output words.

    Raises:
        InvalidArgumentError: A word count other than 4 and 2, or a word that is not an
            unsigned 32-bit integer.
    """
    return _core.philox4x32_10(
        _words("counter", counter, 4, U32_MAX), _words("key", key, 2, U32_MAX)
    )


class Stream:
    """A Philox4x64-10 stream keyed by ``[seed, purpose]``, counter ``[0, client, round, 0]``.

    A thin wrapper of the Rust stream that checks its arguments; make one with
    :func:`stream`. Pickling or :meth:`copy` keeps the position in the sequence.
    """

    __slots__ = ("_stream",)

    def __init__(self, seed: int, *, purpose: int = 0, client: int = 0, round: int = 0) -> None:
        """Create the stream ``(seed, purpose, client, round)`` at the start of its sequence.

        Args:
            seed: The experiment seed (unsigned 64-bit).
            purpose: What the numbers are for; see :class:`Purpose`.
            client: Client id (unsigned 64-bit).
            round: Communication round (unsigned 64-bit).

        Raises:
            InvalidArgumentError: An argument that is not an unsigned 64-bit integer.
        """
        self._stream = _core.Stream(
            _check_u64("seed", seed),
            purpose=_check_u64("purpose", purpose),
            client=_check_u64("client", client),
            round=_check_u64("round", round),
        )

    @classmethod
    def _wrap(cls, core: _core.Stream) -> Stream:
        obj = cls.__new__(cls)
        obj._stream = core
        return obj

    def random_raw(self, n: int) -> npt.NDArray[np.uint64]:
        """Return the next ``n`` raw 64-bit words (as ``numpy.random.Philox.random_raw``)."""
        return self._stream.random_raw(_count("n", n))

    def random(self, n: int) -> npt.NDArray[np.float64]:
        """Return ``n`` doubles uniform in ``[0, 1)``."""
        return self._stream.random(_count("n", n))

    def normal(self, n: int) -> npt.NDArray[np.float64]:
        """Return ``n`` standard normal doubles."""
        return self._stream.normal(_count("n", n))

    def integers(self, low: int, high: int, n: int) -> npt.NDArray[np.int64]:
        """Return ``n`` integers uniform in ``[low, high)``.

        Raises:
            InvalidArgumentError: Bounds that are not 64-bit integers with ``low < high``,
                or a count that is not a non-negative integer.
        """
        lo = check_int(low, "low", low=_I64_MIN, high=_I64_MAX)
        hi = check_int(high, "high", low=_I64_MIN, high=_I64_MAX)
        if lo >= hi:
            raise InvalidArgumentError(f"integers: low={lo} must be smaller than high={hi}")
        return self._stream.integers(lo, hi, _count("n", n))

    def permutation(self, n: int) -> npt.NDArray[np.int64]:
        """Return a random permutation of ``0..n``."""
        return self._stream.permutation(_count("n", n))

    def choice(self, n: int, k: int) -> npt.NDArray[np.int64]:
        """Return ``k`` distinct values of ``0..n`` in random order.

        Raises:
            InvalidArgumentError: Counts that are not non-negative integers, or ``k > n``.
        """
        population, size = _count("n", n), _count("k", k)
        if size > population:
            raise InvalidArgumentError(
                f"choice: cannot pick k={size} distinct values out of n={population}"
            )
        return self._stream.choice(population, size)

    def torch_seed(self) -> int:
        """Return a 64-bit seed for ``torch.Generator.manual_seed``."""
        return self._stream.torch_seed()

    def state(self) -> StreamState:
        """Return the full state, as a tuple :meth:`from_state` accepts."""
        return self._stream.state()

    @staticmethod
    def from_state(state: StreamState) -> Stream:
        """Rebuild a stream from :meth:`state`.

        Raises:
            InvalidArgumentError: Not a state tuple (9 fields of the right ranges).
        """
        if not isinstance(state, tuple | list) or len(state) != 9:
            raise InvalidArgumentError(f"a stream state is a tuple of 9 fields, got {state!r}")
        words = [check_int(w, f"state[{i}]", high=U64_MAX) for i, w in enumerate(state[:6])]
        position = check_int(state[6], "state[6] (buffer position)", high=4)
        if not isinstance(state[7], bool | np.bool_):
            raise InvalidArgumentError(f"state[7] must be a boolean, got {state[7]!r}")
        half = check_int(state[8], "state[8]", high=U32_MAX)
        k0, k1, c0, c1, c2, c3 = words
        return Stream._wrap(
            _core.Stream.from_state((k0, k1, c0, c1, c2, c3, position, bool(state[7]), half))
        )

    def copy(self) -> Stream:
        """Return an independent copy at the same position."""
        return Stream._wrap(self._stream.copy())

    def __reduce__(self) -> tuple[Any, tuple[StreamState]]:
        """Pickle as the state."""
        return (Stream.from_state, (self.state(),))

    def __repr__(self) -> str:
        """Describe the key and the counter."""
        return repr(self._stream)


def stream(seed: int, *, purpose: int = 0, client: int = 0, round: int = 0) -> Stream:
    """Return the stream ``(seed, purpose, client, round)``.

    Args:
        seed: The experiment seed (unsigned 64-bit).
        purpose: What the numbers are for; see :class:`Purpose`.
        client: Client id.
        round: Communication round.

    Returns:
        A fresh :class:`Stream` at the start of its sequence.

    Raises:
        InvalidArgumentError: An argument that is not an unsigned 64-bit integer.

    Example:
        >>> import numpy as np
        >>> s = stream(42, purpose=Purpose.PARTITION, client=3)
        >>> ref = np.random.Philox(key=[42, 1], counter=[0, 3, 0, 0])
        >>> bool((s.random_raw(8) == ref.random_raw(8)).all())
        True
    """
    return Stream(seed, purpose=purpose, client=client, round=round)


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

    Raises:
        InvalidArgumentError: An argument that is not an unsigned 64-bit integer.
    """
    key = np.array([_check_u64("seed", seed), _check_u64("purpose", purpose)], dtype=np.uint64)
    counter = np.array(
        [0, _check_u64("client", client), _check_u64("round", round), 0], dtype=np.uint64
    )
    return np.random.Generator(np.random.Philox(key=key, counter=counter))

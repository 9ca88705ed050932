"""The exceptions emberfl raises.

Every error derives from :class:`EmberflError` and, where one fits, from the builtin a
Python programmer would expect (``ValueError``, ``IndexError``, ``OSError``), so both
``except emberfl.errors.EmberflError`` and ``except ValueError`` work.
"""

from __future__ import annotations

__all__ = [
    "ArenaError",
    "CheckpointError",
    "ClientError",
    "ClientTimeoutError",
    "ConfigError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "EmberflError",
    "InvalidArgumentError",
    "InvalidWeightsError",
    "LayoutMismatchError",
    "NonFiniteError",
    "PartitionError",
    "PayloadWriteError",
    "RankLostError",
    "ServerTimeoutError",
    "SharedMemoryError",
    "SlotIndexError",
    "StaleHandleError",
    "TensorMismatchError",
    "WorkerDiedError",
]


class EmberflError(Exception):
    """Base class of every error raised by emberfl."""


class InvalidArgumentError(EmberflError, ValueError):
    """An argument outside its valid range (empty slot list, bad thread count, ...)."""


class ArenaError(EmberflError):
    """A misuse of a :class:`~emberfl.arena.ParamArena`."""


class SlotIndexError(ArenaError, IndexError):
    """A slot index outside ``0 <= i < num_slots``."""


class LayoutMismatchError(ArenaError, ValueError):
    """A model or state dict whose tensors do not match the arena's layout."""


class TensorMismatchError(ArenaError, ValueError):
    """A tensor with the wrong dtype, shape, device or memory layout."""


class InvalidWeightsError(EmberflError, ValueError):
    """Aggregation weights that are NaN, negative, all zero or of the wrong length."""


class NonFiniteError(EmberflError, ValueError):
    """A NaN or infinite value found in a client update."""


class SharedMemoryError(EmberflError, OSError):
    """Shared memory could not be created, reserved or mapped."""


class StaleHandleError(SharedMemoryError):
    """An arena handle whose memory no longer exists or belongs to another arena."""


class PartitionError(EmberflError, ValueError):
    """A data partition that cannot be made (too few samples, alpha <= 0, ...)."""


class DatasetNotFoundError(EmberflError, FileNotFoundError):
    """A data set that is not present under the given data root."""


class DatasetFormatError(EmberflError, ValueError):
    """A data set file that is truncated, corrupt or not in its format (the message names it)."""


class LengthMismatchError(EmberflError, ValueError, AssertionError):
    """Sequences that must have the same length do not (a ``ValueError``; also an
    ``AssertionError``, which BlazeFL 2.x raised there)."""


class ConfigError(EmberflError, ValueError):
    """An invalid run configuration (unknown option value, bad combination, ...)."""


class CheckpointError(EmberflError, ValueError):
    """A corrupt checkpoint, or one that does not match the run's configuration."""


class ClientError(EmberflError, RuntimeError):
    """A client's local training raised; carries the client id and the worker's traceback."""

    def __init__(self, cid: int, message: str, worker_traceback: str = "") -> None:
        """Create the error.

        Args:
            cid: The client whose training failed.
            message: What went wrong.
            worker_traceback: The formatted traceback from the worker, if any.
        """
        text = f"client {cid}: {message}"
        self.summary = text.splitlines()[0] if text else text
        if worker_traceback:
            text += f"\n\nworker traceback:\n{worker_traceback}"
        super().__init__(text)
        self.cid = cid
        self.worker_traceback = worker_traceback


class RankLostError(EmberflError, RuntimeError):
    """Another rank of a ``torch.distributed`` job died, hung or cut the connection."""


class WorkerDiedError(EmberflError, RuntimeError):
    """A worker process exited (killed by a signal, out of memory, ...) mid-round."""


class ClientTimeoutError(ClientError):
    """A client trained longer than the configured ``client_timeout``.

    Attributes:
        elapsed: Seconds the client had been training when it was stopped.
        timeout: The limit, in seconds.
        running: Every client still training when the limit was hit (this one included).
    """

    def __init__(
        self, cid: int, elapsed: float, timeout: float, running: tuple[int, ...] = (), how: str = ""
    ) -> None:
        """Create the error.

        Args:
            cid: The client that ran out of time.
            elapsed: Seconds it had been training.
            timeout: The limit, in seconds.
            running: Every client still training at that moment.
            how: What was done about it (``"its worker process was killed"``).
        """
        others = [c for c in running if c != cid]
        text = f"still training after {elapsed:.1f} s (client_timeout={timeout:g} s)"
        if others:
            text += f"; clients {', '.join(map(str, others))} were running too"
        if how:
            text += f"; {how}"
        super().__init__(cid, text)
        self.elapsed = elapsed
        self.timeout = timeout
        self.running = running


class ServerTimeoutError(EmberflError, TimeoutError):
    """The server's aggregation and update took longer than ``server_timeout``.

    Attributes:
        round: The round (1-based) whose update was interrupted.
        elapsed: Seconds it had been running.
        timeout: The limit, in seconds.
    """

    def __init__(self, round_: int, elapsed: float, timeout: float) -> None:
        """Create the error.

        Args:
            round_: The round (1-based).
            elapsed: Seconds the aggregation and update had been running.
            timeout: The limit, in seconds.
        """
        super().__init__(
            f"round {round_}: the aggregation and server update were still running after "
            f"{elapsed:.1f} s (server_timeout={timeout:g} s) and were interrupted; the server "
            "state may be partly updated, so restore a checkpoint to go on"
        )
        self.round = round_
        self.elapsed = elapsed
        self.timeout = timeout


class PayloadWriteError(ClientError):
    """A client wrote into the round's broadcast, which every client of the round shares."""

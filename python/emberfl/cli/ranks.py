"""``emberfl run`` under ``torchrun``: joining the job, and what the ranks must agree on.

``torchrun`` (and Slurm's ``srun`` or a Kubernetes operator running it) starts one
``emberfl run`` per rank with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
in the environment. :func:`join` initialises ``torch.distributed`` from them (gloo: the
results travel as CPU tensors); :func:`agree` refuses to start when the ranks were given
different configurations or data; :func:`share` hands rank 0's choice (the run directory)
to the others.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from emberfl.errors import ConfigError, EmberflError, RankLostError

__all__ = [
    "COLLECTIVE_TIMEOUT_S",
    "DEFAULT_RANK_TIMEOUT_S",
    "Ranks",
    "Watchdog",
    "agree",
    "digest",
    "join",
    "on_leader",
    "share",
]

COLLECTIVE_TIMEOUT_S = 6 * 3600.0
"""How long one collective may wait (a backstop: a round can be long; liveness is the
:class:`Watchdog`'s job)."""
DEFAULT_RANK_TIMEOUT_S = 30.0
"""How long a rank may go without a heartbeat before the others stop (``--rank-timeout``)."""

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job.

    Attributes:
        rank: Its rank.
        world_size: The number of ranks.
        local_rank: Its rank on this node.
        owns_group: Whether :func:`join` initialised ``torch.distributed`` (and so closes it).
    """

    rank: int
    world_size: int
    local_rank: int
    owns_group: bool

    @property
    def leader(self) -> bool:
        """Whether this is rank 0, which writes the run directory."""
        return self.rank == 0

    def close(self) -> None:
        """Leave the job (if :func:`join` joined it)."""
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def join(timeout_s: float = COLLECTIVE_TIMEOUT_S) -> Ranks | None:
    """Join the ``torchrun`` job this process belongs to, if any.

    Args:
        timeout_s: How long a collective may wait for the other ranks.

    Returns:
        The ranks, or ``None`` when not started by ``torchrun`` (no ``RANK`` and
        ``WORLD_SIZE`` in the environment).

    Raises:
        ConfigError: If the environment is inconsistent or the rendezvous fails.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    import torch.distributed as dist

    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}")
    owns = False
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                "gloo", timeout=datetime.timedelta(seconds=timeout_s), rank=rank, world_size=world
            )
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"rank {rank} could not join the torchrun job: {exc}") from None
        owns = True
    return Ranks(rank=rank, world_size=world, local_rank=local, owns_group=owns)


def digest(*parts: Any) -> str:
    """A short hash of ``parts``' ``repr`` and bytes (tensors hash their contents)."""
    h = hashlib.sha256()
    for part in parts:
        if hasattr(part, "numpy"):
            array = part.detach().cpu().contiguous().numpy()
            h.update(repr((array.dtype.str, array.shape)).encode())
            h.update(array.tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:16]


def agree(ranks: Ranks, what: str, value: str) -> None:
    """Refuse to go on unless every rank has the same ``value`` (on every rank).

    Raises:
        ConfigError: Naming the ranks that differ from rank 0.
    """
    import torch.distributed as dist

    values: list[Any] = [None] * ranks.world_size
    try:
        dist.all_gather_object(values, value)
    except RuntimeError as exc:
        from emberfl.executors.distributed import backend_reason

        reason = backend_reason(exc)
        raise RankLostError(f"lost another rank while comparing the {what}: {reason}") from None
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise ConfigError(
            f"the ranks were started with different {what}: rank(s) "
            f"{', '.join(map(str, differ))} differ from rank 0; start every rank with the "
            "same command line and files"
        )


def share(ranks: Ranks, value: T) -> T:
    """Return rank 0's ``value`` on every rank."""
    import torch.distributed as dist

    box: list[Any] = [value if ranks.leader else None]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as exc:
        from emberfl.executors.distributed import backend_reason

        reason = backend_reason(exc)
        raise RankLostError(f"lost rank 0 before the run started: {reason}") from None
    result: T = box[0]
    return result


class Watchdog:
    """Heartbeats through the job's store, and a stop when another rank falls silent.

    Every rank bumps its counter in the ``torch.distributed`` store every
    ``timeout_s / 10`` seconds (at most 1 s) from a daemon thread, and watches the others'.
    A rank whose counter has not moved for ``timeout_s`` is hung or dead (a stopped
    process, a lost machine): the main thread may be blocked inside a collective that
    cannot be interrupted, so the watchdog prints one line naming that rank and ends this
    process (exit status 1). Shared memory needs no cleanup (memfd arenas vanish with the
    process; process-mode workers exit with their parent); the last checkpoint stays.
    A rank that finished says so and is no longer watched.
    """

    def __init__(self, ranks: Ranks, timeout_s: float, *, resume_hint: str = "") -> None:
        """Start the heartbeat thread."""
        import threading

        import torch.distributed as dist

        self.ranks = ranks
        self.timeout_s = float(timeout_s)
        self.resume_hint = resume_hint
        self._store = dist.distributed_c10d._get_default_store()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="emberfl-watchdog", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import time

        me = self.ranks.rank
        interval = min(1.0, self.timeout_s / 10)
        seen: dict[int, tuple[bytes, float]] = {}
        beat = 0
        try:
            while not self._stop.wait(0 if beat == 0 else interval):
                beat += 1
                self._store.set(f"emberfl/beat/{me}", str(beat))
                now = time.monotonic()
                for r in range(self.ranks.world_size):
                    if r == me or self._store.check([f"emberfl/done/{r}"]):
                        continue
                    key = f"emberfl/beat/{r}"
                    value = self._store.get(key) if self._store.check([key]) else b""
                    last = seen.get(r)
                    if last is None or last[0] != value:
                        seen[r] = (value, now)
                    elif now - last[1] > self.timeout_s:
                        self._lost(r, now - last[1])
        except Exception:  # the store went away: the job is ending; collectives will say so
            return

    def _lost(self, rank: int, silent: float) -> None:
        import os
        import sys

        hint = f"; {self.resume_hint}" if self.resume_hint else ""
        print(
            f"emberfl: error: rank {rank} stopped responding (no heartbeat for {silent:.0f} s: "
            f"hung or dead); rank {self.ranks.rank} stops too{hint}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    def finish(self) -> None:
        """Say this rank is done (the others stop watching it) and stop the thread."""
        self._stop.set()
        with contextlib.suppress(Exception):  # the job is ending anyway
            self._store.set(f"emberfl/done/{self.ranks.rank}", "1")
        self._thread.join(timeout=5)


def on_leader(ranks: Ranks | None, step: Callable[[], None]) -> None:
    """Run ``step`` on rank 0 only and make every rank fail the way it failed.

    Without ranks it just runs ``step``. Otherwise rank 0 runs it and tells the others
    how it went, so that a step only rank 0 takes (writing the run directory) fails every
    rank with rank 0's reason, not with a lost connection.

    Raises:
        ConfigError: On the other ranks, with rank 0's message, if its step raised an
            emberfl error or ``OSError`` (rank 0 re-raises its own exception).
    """
    if ranks is None:
        step()
        return
    import torch.distributed as dist

    outcome: list[Any] = [None]
    failure: BaseException | None = None
    if ranks.leader:
        try:
            step()
        except (EmberflError, OSError) as exc:
            failure = exc
            outcome[0] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    try:
        dist.broadcast_object_list(outcome, src=0)
    except RuntimeError as exc:
        if failure is not None:
            raise failure from None
        from emberfl.executors.distributed import backend_reason

        raise RankLostError(f"lost rank 0 before the run started: {backend_reason(exc)}") from None
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise ConfigError(f"rank 0 could not start the run: {outcome[0]}")

"""Per-client state that lives across rounds: one arena slot per client, allocated on first use.

Algorithms such as SCAFFOLD (control variates), FedDyn (gradient estimates), Ditto
(personal models) and error-feedback compression keep state on every client. A
:class:`ClientStateStore` holds it for the executor: each client that has ever trained owns
one slot (all of the algorithm's entries, packed), in shared-memory arenas of
``segment_slots`` slots each that are created only when a client first needs one. A
population of 10,000 clients of which 100 train per round therefore holds state for the
clients that trained so far, not for 10,000.

The slots are zero-copy views: a serial or thread executor hands them to the client as they
are, and a worker process attaches to the same arenas (:func:`attach_state`) and reads and
writes them in place. ``backing="file"`` puts the arenas in memory-mapped files in a
folder of your choice instead of memory, for populations whose state does not fit in RAM.
:meth:`ClientStateStore.save` / :meth:`ClientStateStore.load` write and read the state of
every client that has any (one safetensors file), so checkpoints carry it and a resumed run
continues bit for bit.

Example:
    >>> store = ClientStateStore({"c": 4})
    >>> views = store.views(17)  # zeros the first time
    >>> views["c"] += 1.0
    >>> store.mark_written(17)
    >>> store.views(17)["c"].tolist(), len(store), store.allocated_bytes >= 16
    ([1.0, 1.0, 1.0, 1.0], 1, True)
    >>> store.close()
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from emberfl._checks import as_int, check_int
from emberfl.arena import ArenaHandle, LayoutEntry, ParamArena
from emberfl.atomic import atomic_write_bytes, read_tensor_file
from emberfl.errors import CheckpointError, ConfigError, TensorMismatchError

__all__ = ["ClientStateStore", "StateLocation", "attach_state"]

StateBacking = Literal["memory", "file"]

SEGMENT_BYTES = 64 << 20
"""Target size of one arena of the store (fewer, larger arenas for small states)."""
MAX_SEGMENT_SLOTS = 4096
"""The most clients in one arena."""


@dataclass(frozen=True)
class StateLocation:
    """Where one client's state lives, for a worker process (picklable).

    Attributes:
        handle: The arena's handle.
        slot: The client's slot in it.
    """

    handle: ArenaHandle
    slot: int


def _entries(spec: Mapping[str, int]) -> tuple[LayoutEntry, ...]:
    entries = []
    offset = 0
    for name, size in spec.items():
        numel = check_int(
            size, f"the size of client state entry {name!r}", low=1, error=ConfigError
        )
        entries.append(LayoutEntry(name, (numel,), offset, numel, "torch.float32"))
        offset += numel
    if not entries:
        raise ConfigError("a client state store needs at least one entry")
    return tuple(entries)


def _views(arena: ParamArena, slot: int) -> dict[str, torch.Tensor]:
    row = arena.slot(slot)
    return {e.name: row[e.offset : e.offset + e.numel] for e in arena.layout}


class ClientStateStore:
    """One slot of per-client state per client, in lazily created shared-memory arenas.

    Attributes:
        spec: ``name -> number of float32 elements`` of one client's state.
        backing: ``"memory"`` (memfd arenas) or ``"file"`` (files in ``directory``).
        directory: The folder of a file-backed store.
    """

    def __init__(
        self,
        spec: Mapping[str, int],
        *,
        backing: StateBacking = "memory",
        directory: str | os.PathLike[str] | None = None,
        segment_slots: int | None = None,
    ) -> None:
        """Create an empty store (nothing is allocated yet).

        Args:
            spec: ``name -> elements`` of each state entry.
            backing: Where the arenas live.
            directory: The folder of a ``"file"`` store (it must exist).
            segment_slots: Clients per arena (default: as many as fit in 64 MiB, at most
                4096, at least 1).

        Raises:
            ConfigError: An empty or invalid spec (a size that is not a positive integer),
                an unknown backing, a missing folder, or a ``segment_slots`` that is not a
                positive integer.
        """
        self._layout = _entries(spec)
        self.spec = {e.name: e.numel for e in self._layout}
        self.dim = sum(e.numel for e in self._layout)
        if backing not in ("memory", "file"):
            raise ConfigError(f"unknown state backing {backing!r}: use 'memory' or 'file'")
        if backing == "file" and (directory is None or not Path(directory).is_dir()):
            raise ConfigError(
                f"a file-backed client state store needs an existing folder, got {directory!r}"
            )
        self.backing: StateBacking = backing
        self.directory = None if directory is None else str(directory)
        if segment_slots is None:
            segment_slots = max(1, min(MAX_SEGMENT_SLOTS, SEGMENT_BYTES // (4 * self.dim)))
        self.segment_slots = check_int(segment_slots, "segment_slots", low=1, error=ConfigError)
        self._segments: list[ParamArena] = []
        self._where: dict[int, tuple[int, int]] = {}
        self._written: set[int] = set()

    # -- lookup ---------------------------------------------------------------------------
    def __contains__(self, cid: object) -> bool:
        """Whether client ``cid`` has a slot."""
        return cid in self._where

    def __len__(self) -> int:
        """Clients with a slot."""
        return len(self._where)

    def __iter__(self) -> Iterator[int]:
        """The clients with a slot, in increasing order."""
        return iter(sorted(self._where))

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the arenas created so far."""
        return sum(a.num_slots * a.dim * 4 for a in self._segments)

    def is_written(self, cid: int) -> bool:
        """Whether client ``cid``'s state was ever committed (:meth:`mark_written`)."""
        return cid in self._written

    def mark_written(self, cid: int) -> None:
        """Record that client ``cid``'s state holds a result (it is saved by :meth:`save`).

        Raises:
            ConfigError: ``cid`` is not a non-negative integer.
            KeyError: The client has no slot.
        """
        cid = check_int(cid, "client id", error=ConfigError)
        if cid not in self._where:
            raise KeyError(f"client {cid} has no state slot")
        self._written.add(cid)

    def _slot(self, cid: int) -> tuple[int, int]:
        cid = check_int(cid, "client id", error=ConfigError)
        where = self._where.get(cid)
        if where is not None:
            return where
        index = len(self._where)
        segment, slot = divmod(index, self.segment_slots)
        if segment == len(self._segments):
            if self.backing == "file":
                arena = ParamArena.from_layout(
                    self._layout, self.segment_slots, backing="shm", shm_dir=self.directory
                )
            else:
                arena = ParamArena.from_layout(self._layout, self.segment_slots)
            self._segments.append(arena)
        self._where[cid] = (segment, slot)
        return segment, slot

    def views(self, cid: int) -> dict[str, torch.Tensor]:
        """Return client ``cid``'s state as writable views (a zero slot is made if needed).

        Args:
            cid: The client.

        Returns:
            ``name -> (elements,)`` float32 views of shared memory.

        Raises:
            ConfigError: ``cid`` is not a non-negative integer.
        """
        segment, slot = self._slot(cid)
        return _views(self._segments[segment], slot)

    def location(self, cid: int) -> StateLocation:
        """Return where client ``cid``'s slot is, for a worker process (made if needed).

        Args:
            cid: The client.

        Returns:
            A picklable location; see :func:`attach_state`.

        Raises:
            ConfigError: ``cid`` is not a non-negative integer.
        """
        segment, slot = self._slot(cid)
        return StateLocation(self._segments[segment].handle, slot)

    # -- persistence ------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Return the state of every written client as tensors (for a checkpoint).

        Returns:
            ``{"cids": int64 (n,), NAME: float32 (n, elements) ...}`` in client order.
        """
        cids = sorted(self._written)
        out: dict[str, torch.Tensor] = {"cids": torch.tensor(cids, dtype=torch.int64)}
        for e in self._layout:
            values = torch.empty((len(cids), e.numel), dtype=torch.float32)
            for row, cid in enumerate(cids):
                values[row].copy_(self.views(cid)[e.name])
            out[e.name] = values
        return out

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace the store's contents by :meth:`state_tensors` output.

        Args:
            tensors: ``cids`` and one ``(n, elements)`` tensor per entry.

        Raises:
            CheckpointError: Entries or shapes that do not match the spec.
        """
        names = set(tensors) - {"cids"}
        if "cids" not in tensors or names != set(self.spec):
            raise CheckpointError(
                f"the saved client state has entries {sorted(names)}, the algorithm's are "
                f"{sorted(self.spec)}"
            )
        cids = [int(c) for c in tensors["cids"].tolist()]
        if len(set(cids)) != len(cids) or any(c < 0 for c in cids):
            raise CheckpointError("the saved client state lists a client twice or a negative id")
        for name, numel in self.spec.items():
            t = tensors[name]
            if t.dtype != torch.float32 or tuple(t.shape) != (len(cids), numel):
                raise CheckpointError(
                    f"saved client state {name!r} has shape {tuple(t.shape)} ({t.dtype}); "
                    f"expected ({len(cids)}, {numel}) float32"
                )
        self.clear()
        for row, cid in enumerate(cids):
            views = self.views(cid)
            for name in self.spec:
                views[name].copy_(tensors[name][row])
            self._written.add(cid)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write every written client's state to a safetensors file (atomically).

        Args:
            path: The file.
        """
        from safetensors.torch import save

        atomic_write_bytes(path, save(self.state_tensors()))

    def load(self, path: str | os.PathLike[str]) -> None:
        """Replace the store's contents by a file written by :meth:`save`.

        Args:
            path: The file.

        Raises:
            CheckpointError: A missing, corrupt or mismatching file.
        """
        self.load_state_tensors(read_tensor_file(path))

    # -- lifetime ---------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget every client and release the arenas."""
        for arena in self._segments:
            with contextlib.suppress(Exception):
                arena.close()
        self._segments.clear()
        self._where.clear()
        self._written.clear()

    def close(self) -> None:
        """Release the arenas (views already taken stay valid). Idempotent."""
        self.clear()

    def __enter__(self) -> ClientStateStore:
        """Return the store."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Call :meth:`close`."""
        self.close()

    def __repr__(self) -> str:
        """Describe the store."""
        return (
            f"ClientStateStore({self.spec}, clients={len(self)}, "
            f"arenas={len(self._segments)}, {self.backing})"
        )


# Arenas attached in this (worker) process, by their token.
_ATTACHED: dict[tuple[Any, ...], ParamArena] = {}


def attach_state(location: StateLocation) -> dict[str, torch.Tensor]:
    """Return a client's state views inside a worker process (attaching once per arena).

    Args:
        location: :meth:`ClientStateStore.location` of the client, sent by the parent.

    Returns:
        ``name -> (elements,)`` writable views of the parent's shared memory.

    Raises:
        TensorMismatchError: The slot is outside the arena.
        InvalidArgumentError: The slot is not an integer.
    """
    slot = as_int(location.slot, "the client state slot")
    key = location.handle.raw
    arena = _ATTACHED.get(key)
    if arena is None:
        arena = ParamArena.attach(location.handle)
        _ATTACHED[key] = arena
    if not 0 <= slot < arena.num_slots:
        raise TensorMismatchError(
            f"client state slot {slot} is outside its arena of {arena.num_slots} slots"
        )
    return _views(arena, slot)

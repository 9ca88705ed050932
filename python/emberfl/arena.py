"""The shared-memory parameter arena.

A :class:`ParamArena` is one contiguous float32 buffer of ``num_slots`` x ``dim`` parameters,
laid out after a model's ``state_dict()``. Each slot holds one model's worth of parameters:
the global model, a client's update, a momentum buffer. Slots are zero-copy torch views, the
memory is shared across processes (attach with :meth:`ParamArena.attach`), and the Rust
aggregation kernels in :mod:`emberfl.aggregation` read it in place.

Only floating-point entries of the state dict are stored (parameters and buffers such as
BatchNorm's running statistics, cast to float32). Integer buffers, e.g. BatchNorm's
``num_batches_tracked``, are listed in :attr:`ParamArena.skipped` and left untouched by
:meth:`ParamArena.load`: averaging a counter across clients has no meaning.

Example:
    >>> import torch
    >>> from emberfl.arena import ParamArena
    >>> model = torch.nn.Linear(3, 2)
    >>> with ParamArena.from_model(model, num_slots=4) as arena:
    ...     arena.store(0, model)
    ...     bool(torch.equal(arena.state_dict(0)["weight"], model.weight.detach()))
    True
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import torch

from emberfl import _core
from emberfl._checks import as_int, check_int, check_slot
from emberfl.errors import (
    ArenaError,
    InvalidArgumentError,
    LayoutMismatchError,
    TensorMismatchError,
)

__all__ = ["ArenaHandle", "LayoutEntry", "ParamArena"]

Backing = Literal["memfd", "shm"]


@dataclass(frozen=True)
class LayoutEntry:
    """Where one tensor of the state dict lives inside a slot.

    Attributes:
        name: The state-dict key.
        shape: The tensor's shape.
        offset: Index of its first element inside the slot.
        numel: Number of elements.
        dtype: The original dtype (restored by :meth:`ParamArena.load`).
    """

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    dtype: str


@dataclass(frozen=True)
class ArenaHandle:
    """A picklable description of an arena, for :meth:`ParamArena.attach` in another process.

    Attributes:
        raw: The Rust core's handle (location, token, size).
        layout: The slot layout.
        skipped: State-dict keys that are not stored (integer buffers).
    """

    raw: tuple[str, int, int, str, int, int, int, int]
    layout: tuple[LayoutEntry, ...]
    skipped: tuple[str, ...]


def _layout_of(
    state: Mapping[str, torch.Tensor],
) -> tuple[tuple[LayoutEntry, ...], tuple[str, ...]]:
    entries: list[LayoutEntry] = []
    skipped: list[str] = []
    offset = 0
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TensorMismatchError(f"state dict entry {name!r} is not a tensor")
        if not tensor.is_floating_point():
            skipped.append(name)
            continue
        shape = tuple(int(s) for s in tensor.shape)
        numel = math.prod(shape)
        entries.append(LayoutEntry(name, shape, offset, numel, str(tensor.dtype)))
        offset += numel
    if not entries:
        raise LayoutMismatchError("the model has no floating-point tensors to store")
    return tuple(entries), tuple(skipped)


def _state_of(source: torch.nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(source, torch.nn.Module):
        return source.state_dict()
    return source


def _unlink_in(creator_pid: int, core: _core.Arena) -> None:
    if os.getpid() == creator_pid:
        core.unlink()


class ParamArena:
    """A ``num_slots`` x ``dim`` float32 arena of model parameters in shared memory.

    Create one with :meth:`from_model` (or :meth:`from_layout`), or attach to one made by
    another process with :meth:`attach`. Use it as a context manager or call :meth:`close`;
    the memory itself is freed when the last view or attached process lets go of it.
    """

    def __init__(
        self,
        core: _core.Arena,
        layout: tuple[LayoutEntry, ...],
        skipped: tuple[str, ...],
        *,
        owner: bool,
    ) -> None:
        """Wrap a Rust arena; use :meth:`from_model` or :meth:`attach` instead.

        Args:
            core: The Rust arena.
            layout: The slot layout.
            skipped: State-dict keys not stored.
            owner: Whether this process created the arena (and unlinks a named one).
        """
        dim = sum(e.numel for e in layout)
        if dim != core.dim:
            raise LayoutMismatchError(
                f"the layout describes {dim} parameters but the arena has {core.dim} per slot"
            )
        self._core: _core.Arena | None = core
        self._layout = layout
        self._skipped = skipped
        self._owner = owner
        self._by_name = {e.name: e for e in layout}
        # A named arena is unlinked when its creator closes it, is garbage-collected, or the
        # interpreter exits normally (weakref.finalize runs at exit too); not by a forked
        # child collecting its inherited copy.
        self._finalizer = (
            weakref.finalize(self, _unlink_in, os.getpid(), core)
            if owner and core.handle()[0] == "shm"
            else None
        )
        flat = torch.frombuffer(core, dtype=torch.float32)
        self._tensor: torch.Tensor = flat.view(core.num_slots, core.dim)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module | Mapping[str, torch.Tensor],
        num_slots: int,
        *,
        backing: Backing = "memfd",
        shm_dir: str | None = None,
    ) -> ParamArena:
        """Create a zero-filled arena whose slots are laid out like ``model.state_dict()``.

        Args:
            model: A module or a state dict; only its floating-point tensors are stored.
            num_slots: Number of slots (>= 1).
            backing: ``"memfd"`` (default; freed by the kernel even after a crash) or
                ``"shm"`` (a named file in ``shm_dir``, default ``/dev/shm``; unlinked by
                :meth:`close`, :meth:`unlink`, or when the arena is garbage-collected).
            shm_dir: Directory of a named arena.

        Returns:
            The new arena.

        Raises:
            SharedMemoryError: Not enough shared memory to reserve the arena.
            LayoutMismatchError: The model has no floating-point tensors.
            InvalidArgumentError: ``num_slots`` is not a positive integer, or an unknown
                ``backing``.
        """
        layout, skipped = _layout_of(_state_of(model))
        return cls.from_layout(layout, num_slots, skipped=skipped, backing=backing, shm_dir=shm_dir)

    @classmethod
    def from_layout(
        cls,
        layout: tuple[LayoutEntry, ...],
        num_slots: int,
        *,
        skipped: tuple[str, ...] = (),
        backing: Backing = "memfd",
        shm_dir: str | None = None,
    ) -> ParamArena:
        """Create a zero-filled arena with an existing layout (e.g. another arena's).

        Args:
            layout: The slot layout.
            num_slots: Number of slots (>= 1).
            skipped: State-dict keys that are not stored.
            backing: ``"memfd"`` or ``"shm"``; see :meth:`from_model`.
            shm_dir: Directory of a named arena.

        Returns:
            The new arena.

        Raises:
            SharedMemoryError: Not enough shared memory to reserve the arena.
            InvalidArgumentError: ``num_slots`` is not a positive integer (``1.5``, ``"3"``,
                ``True``, ``0``), or an unknown ``backing``.
        """
        if backing not in ("memfd", "shm"):
            raise InvalidArgumentError(f"unknown backing {backing!r}: use 'memfd' or 'shm'")
        slots = check_int(num_slots, "num_slots", low=1)
        dim = sum(e.numel for e in layout)
        core = _core.Arena.create(slots, dim, backing=backing, shm_dir=shm_dir)
        return cls(core, layout, skipped, owner=True)

    @classmethod
    def attach(cls, handle: ArenaHandle, *, private: bool = False) -> ParamArena:
        """Map the arena described by ``handle`` (from this or another process).

        Args:
            handle: :attr:`handle` of the arena, possibly pickled across processes.
            private: Map it copy-on-write: writes through this view stay in this view
                (a page is copied when first written) and never reach the arena; pages
                not written here show the arena's current values.

        Returns:
            A view of the same memory: writes on either side are seen by the other
            (``private``: only the arena's writes are seen here, until a page is written).

        Raises:
            StaleHandleError: The arena no longer exists, or the handle belongs to another.
        """
        if not isinstance(handle, ArenaHandle):
            raise TypeError(f"attach() expects an ArenaHandle, got {type(handle).__name__}")
        core = _core.Arena.attach(handle.raw, private=private)
        return cls(core, handle.layout, handle.skipped, owner=False)

    # -- properties -----------------------------------------------------------------------
    @property
    def _live(self) -> _core.Arena:
        if self._core is None:
            raise ArenaError("the arena is closed")
        return self._core

    @property
    def handle(self) -> ArenaHandle:
        """The picklable handle other processes attach with."""
        return ArenaHandle(self._live.handle(), self._layout, self._skipped)

    @property
    def num_slots(self) -> int:
        """Number of slots."""
        return int(self._tensor.shape[0])

    @property
    def dim(self) -> int:
        """Parameters per slot."""
        return int(self._tensor.shape[1])

    @property
    def layout(self) -> tuple[LayoutEntry, ...]:
        """The slot layout, in state-dict order."""
        return self._layout

    @property
    def skipped(self) -> tuple[str, ...]:
        """State-dict keys that are not stored (non-floating buffers)."""
        return self._skipped

    @property
    def tensor(self) -> torch.Tensor:
        """All slots as one ``(num_slots, dim)`` float32 view."""
        self._live  # noqa: B018 - raises if closed
        return self._tensor

    @property
    def core(self) -> _core.Arena:
        """The Rust arena (for :mod:`emberfl.aggregation`)."""
        return self._live

    def name_of(self, index: int) -> str:
        """Return the name of the tensor holding flat parameter ``index`` of a slot.

        Args:
            index: Flat index inside a slot.

        Returns:
            The state-dict key, e.g. ``"conv1.weight"``.

        Raises:
            InvalidArgumentError: ``index`` is not an integer.
            IndexError: It is outside a slot.
        """
        index = as_int(index, "index")
        for e in self._layout:
            if e.offset <= index < e.offset + e.numel:
                return e.name
        raise IndexError(f"parameter index {index} is outside a slot of {self.dim} parameters")

    # -- slot access ----------------------------------------------------------------------
    def _check(self, i: int, name: str = "slot index") -> int:
        self._live  # noqa: B018 - raises if closed
        return check_slot(i, self.num_slots, name=name)

    def slot(self, i: int) -> torch.Tensor:
        """Return slot ``i`` as a flat float32 ``(dim,)`` view (writes go to shared memory).

        Args:
            i: Slot index.

        Returns:
            A zero-copy view.

        Raises:
            InvalidArgumentError: ``i`` is not an integer (numpy and torch integers are).
            SlotIndexError: ``i`` is out of range.
        """
        return self._tensor[self._check(i)]

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Return slot ``i`` as ``name -> view`` with the original shapes (zero-copy).

        Args:
            i: Slot index.

        Returns:
            A dict of float32 views in layout order.
        """
        row = self.slot(i)
        return {e.name: row[e.offset : e.offset + e.numel].view(e.shape) for e in self._layout}

    def store(self, i: int, source: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Copy a model's (or state dict's) floating tensors into slot ``i``.

        Args:
            i: Slot index.
            source: A module or state dict with the arena's layout. Non-floating entries
                listed in :attr:`skipped` are ignored.

        Raises:
            LayoutMismatchError: Missing or unexpected tensors.
            TensorMismatchError: A tensor with the wrong shape or a non-floating dtype.
        """
        row = self.slot(i)
        state = _state_of(source)
        self._check_names(state)
        for e in self._layout:  # validate everything before writing anything
            t = state[e.name]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TensorMismatchError(
                    f"{e.name!r} must be a floating-point tensor of shape {e.shape}, "
                    f"got {getattr(t, 'dtype', type(t).__name__)}"
                )
            if tuple(t.shape) != e.shape:
                raise TensorMismatchError(
                    f"{e.name!r} has shape {tuple(t.shape)}, the arena's layout expects {e.shape}"
                )
        with torch.no_grad():
            for e in self._layout:
                row[e.offset : e.offset + e.numel].copy_(state[e.name].detach().reshape(-1))

    def load(self, i: int, model: torch.nn.Module) -> None:
        """Copy slot ``i`` into ``model``'s tensors (cast to their dtype and device).

        Args:
            i: Slot index.
            model: A module with the arena's layout.

        Raises:
            LayoutMismatchError: The model's tensors do not match the layout.
        """
        row = self.slot(i)
        state = model.state_dict()
        self._check_names(state)
        for e in self._layout:
            if tuple(state[e.name].shape) != e.shape:
                raise TensorMismatchError(
                    f"model tensor {e.name!r} has shape {tuple(state[e.name].shape)}, the "
                    f"arena's layout expects {e.shape}"
                )
        with torch.no_grad():
            for e in self._layout:
                state[e.name].copy_(row[e.offset : e.offset + e.numel].view(e.shape))

    def copy_slot(self, src: int, dst: int) -> None:
        """Copy slot ``src`` into slot ``dst``.

        Args:
            src: Source slot.
            dst: Destination slot.

        Raises:
            InvalidArgumentError: An index that is not an integer.
            SlotIndexError: An index out of range.
        """
        self._live.copy_slot(self._check(src, "src"), self._check(dst, "dst"))

    def _check_names(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = self._by_name.keys()
        missing = [n for n in expected if n not in state]
        if missing:
            raise LayoutMismatchError(
                f"the state dict lacks {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f"; the arena's layout has {len(expected)} tensors"
            )
        extra = [
            n
            for n, t in state.items()
            if n not in self._by_name and isinstance(t, torch.Tensor) and t.is_floating_point()
        ]
        if extra:
            raise LayoutMismatchError(
                f"unexpected tensor {extra[0]!r} is not in the arena's layout"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )

    # -- lifetime -------------------------------------------------------------------------
    def unlink(self) -> None:
        """Remove a named arena's file now (attached processes keep their mapping)."""
        self._live.unlink()

    def close(self) -> None:
        """Release this process's reference; views already taken stay valid.

        A named arena created here is unlinked at once.
        """
        if self._core is not None:
            if self._finalizer is not None:
                self._finalizer()
            self._core = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._core is None

    def __enter__(self) -> ParamArena:
        """Return the arena."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the arena."""
        self.close()

    def __repr__(self) -> str:
        """Describe the arena."""
        state = "closed" if self._core is None else f"{self._core.handle()[0]}"
        return (
            f"ParamArena(num_slots={self.num_slots}, dim={self.dim}, "
            f"tensors={len(self._layout)}, {state})"
        )

"""Carry the tensors of a package through one arena slot (process-pool transport).

Every tensor of a package, whatever its dtype, gets a byte range inside a single flat
``float32`` arena entry; the package itself travels as a small pickled *skeleton* in which
each tensor is a :class:`TensorRef`. A worker rebuilds the package with zero-copy views
into the shared slot, so parameters are never pickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from emberfl.core._tree import iter_tensors, map_matching, map_tensors
from emberfl.errors import TensorMismatchError

__all__ = [
    "PackedEntry",
    "PackedLayout",
    "TensorRef",
    "adopt_tensors",
    "pack",
    "unpack",
    "write_tensors",
]

_ALIGN = 64  # bytes; every entry starts on a cache line, so any dtype can view it
_FLOATS_PER_ALIGN = _ALIGN // 4


@dataclass(frozen=True)
class TensorRef:
    """Placeholder for the tensor stored at ``entries[index]`` of a :class:`PackedLayout`."""

    index: int


@dataclass(frozen=True)
class PackedEntry:
    """Where one tensor of a package lives inside a slot.

    Attributes:
        path: Where the tensor sits in the package (e.g. ``model_parameters``).
        dtype: Its dtype.
        shape: Its shape.
        byte_offset: Start, in bytes from the slot's start (a multiple of 64).
        nbytes: Its size in bytes.
    """

    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    byte_offset: int
    nbytes: int

    def describe(self) -> str:
        """Return ``"path: shape dtype"``."""
        return f"{self.path or '<package>'}: {tuple(self.shape)} {self.dtype}"


@dataclass(frozen=True)
class PackedLayout:
    """The byte layout of a package's tensors in one slot.

    Attributes:
        entries: One entry per tensor, in traversal order.
        num_floats: The slot size in ``float32`` elements (a multiple of 16, at least 16).
    """

    entries: tuple[PackedEntry, ...]
    num_floats: int

    def describe(self) -> str:
        """Return a one-line summary, e.g. ``"model_parameters: (62006,) torch.float32"``."""
        if not self.entries:
            return "<no tensors>"
        return "; ".join(e.describe() for e in self.entries)

    def view(self, slot: torch.Tensor, index: int) -> torch.Tensor:
        """Return a zero-copy typed view of entry ``index`` inside ``slot``.

        Args:
            slot: The flat ``float32`` slot (at least ``num_floats`` long).
            index: The entry.

        Returns:
            A tensor of the entry's dtype and shape sharing ``slot``'s memory.
        """
        entry = self.entries[index]
        raw = slot.view(torch.uint8)[entry.byte_offset : entry.byte_offset + entry.nbytes]
        return raw.view(entry.dtype).view(entry.shape)


def pack(obj: Any) -> tuple[Any, PackedLayout, list[torch.Tensor]]:
    """Split a package into a skeleton, a layout and the tensors to store.

    Args:
        obj: The package.

    Returns:
        ``(skeleton, layout, tensors)``: the package with each tensor replaced by a
        :class:`TensorRef`, where each tensor goes, and the tensors in layout order.
    """
    entries: list[PackedEntry] = []
    tensors: list[torch.Tensor] = []
    offset = 0

    def place(path: str, tensor: torch.Tensor) -> TensorRef:
        nonlocal offset
        nbytes = tensor.numel() * tensor.element_size()
        entries.append(PackedEntry(path, tensor.dtype, tuple(tensor.shape), offset, nbytes))
        tensors.append(tensor)
        offset += -(-nbytes // _ALIGN) * _ALIGN
        return TensorRef(len(entries) - 1)

    skeleton = map_tensors(obj, place)
    num_floats = max(offset // 4, _FLOATS_PER_ALIGN)
    return skeleton, PackedLayout(tuple(entries), num_floats), tensors


def write_tensors(layout: PackedLayout, slot: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy ``tensors`` (in layout order) into ``slot``.

    Args:
        layout: The layout returned by :func:`pack`.
        slot: The flat ``float32`` slot.
        tensors: The tensors returned by :func:`pack`.
    """
    with torch.no_grad():
        for index, tensor in enumerate(tensors):
            layout.view(slot, index).copy_(tensor.detach())


def unpack(skeleton: Any, layout: PackedLayout, slot: torch.Tensor, *, clone: bool) -> Any:
    """Rebuild a package from its skeleton and a slot.

    Args:
        skeleton: The skeleton returned by :func:`pack`.
        layout: Its layout.
        slot: The flat ``float32`` slot holding the tensors.
        clone: Give the package private copies instead of views into ``slot``.

    Returns:
        The package.
    """

    def restore(_path: str, ref: TensorRef) -> torch.Tensor:
        view = layout.view(slot, ref.index)
        return view.clone() if clone else view

    return map_matching(skeleton, lambda node: isinstance(node, TensorRef), restore)


def adopt_tensors(
    obj: Any, layout: PackedLayout, slot: torch.Tensor, *, cid: int, what: str
) -> None:
    """After a worker ran: make sure every tensor of ``obj`` at a layout path is in ``slot``.

    A worker is meant to write into the buffer's tensors in place (``copy_``). If it instead
    replaced a tensor attribute with a new tensor of the right shape and dtype, that tensor
    is copied into the slot; a tensor of another shape or dtype is an error.

    Args:
        obj: The worker's buffer package after the worker returned.
        layout: The buffer's layout.
        slot: The worker's slot.
        cid: The client, for error messages.
        what: What the buffer is, for error messages (e.g. ``"uplink buffer"``).

    Raises:
        TensorMismatchError: If a tensor has the wrong shape or dtype; the message names
            the client, the tensor and the expected layout.
    """
    by_path = {entry.path: i for i, entry in enumerate(layout.entries)}
    for path, tensor in iter_tensors(obj):
        index = by_path.get(path)
        if index is None:
            continue
        view = layout.view(slot, index)
        if tensor.data_ptr() == view.data_ptr() and tensor.shape == view.shape:
            continue
        entry = layout.entries[index]
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise TensorMismatchError(
                f"client {cid} put a tensor of shape {tuple(tensor.shape)} and dtype "
                f"{tensor.dtype} at {path!r} of its {what}; expected shape {entry.shape} "
                f"and dtype {entry.dtype} (layout: {layout.describe()})"
            )
        with torch.no_grad():
            view.copy_(tensor.detach())

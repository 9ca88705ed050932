"""BlazeFL's shared-memory helpers for packages that cross a process boundary.

In BlazeFL a process-pool worker copies its results into tensors that live in shared
memory and returns the package with each such tensor replaced by an :class:`SHMHandle`;
the parent then puts the shared tensors back with :func:`reconstruct_from_shared_memory`.
emberfl keeps these names and this convention (the buffers handed to a worker as
``shm_buffer`` are views into an emberfl arena slot), so BlazeFL workers run unchanged.
"""

from __future__ import annotations

from copy import copy
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from emberfl.core._tree import iter_tensors, map_tensors

__all__ = ["SHMHandle", "process_tensors_in_object", "reconstruct_from_shared_memory"]

T = TypeVar("T")


@dataclass(frozen=True)
class SHMHandle:
    """A placeholder for a tensor whose data is already in the shared buffer."""


def process_tensors_in_object(obj: T, mode: Literal["move", "replace"], max_depth: int = 10) -> T:
    """Walk ``obj`` and process every tensor in it.

    Args:
        obj: A package (dataclass, dict, list, tuple or any object with ``__dict__``).
        mode: ``"move"`` calls :meth:`torch.Tensor.share_memory_` on each tensor, in place,
            and returns ``obj``; ``"replace"`` returns a copy of ``obj`` in which each tensor
            is an :class:`SHMHandle`.
        max_depth: How deep to look, counted as BlazeFL counts: the object is at depth 0,
            an item of a list, tuple or dict one level below its container, and an
            attribute two levels below its object (its ``__dict__`` is a level of its
            own). Tensors at depth ``max_depth`` are still processed; containers there
            are not entered.

    Returns:
        ``obj`` itself (``"move"``) or the copy with handles (``"replace"``).

    Raises:
        ValueError: If ``mode`` is not one of the two above.
    """
    if mode == "move":
        for _, tensor in iter_tensors(obj, max_depth=max_depth, object_depth=2):
            tensor.share_memory_()  # type: ignore[no-untyped-call]
        return obj
    if mode == "replace":
        result: T = map_tensors(
            obj, lambda _path, _t: SHMHandle(), max_depth=max_depth, object_depth=2
        )
        return result
    raise ValueError(f"mode must be 'move' or 'replace', got {mode!r}")


def reconstruct_from_shared_memory(handle_obj: T, shm_obj: T) -> T:
    """Rebuild a package: every :class:`SHMHandle` in ``handle_obj`` takes the value found
    at the same place in ``shm_obj``; everything else comes from ``handle_obj``.

    Parts of ``handle_obj`` without a counterpart in ``shm_obj`` (e.g. a metrics dict where
    the buffer has ``None``) are kept as they are, as long as they hold no handle.

    Args:
        handle_obj: The package returned by a worker, with placeholders.
        shm_obj: The buffer package holding the shared tensors.

    Returns:
        A new package.

    Raises:
        ValueError: If a handle has no counterpart in ``shm_obj``.
    """
    result: T = _Reconstructor().walk(handle_obj, shm_obj, "")
    return result


class _Reconstructor:
    """The recursion of :func:`reconstruct_from_shared_memory` (no closure cycle)."""

    def __init__(self) -> None:
        self.memo: dict[int, Any] = {}

    def walk(self, h: Any, s: Any, path: str) -> Any:
        if isinstance(h, SHMHandle):
            if s is _MISSING:
                raise ValueError(
                    f"the package has an SHMHandle at {path or '<package>'} but its shared "
                    "buffer has nothing there"
                )
            return s
        memo = self.memo
        if isinstance(h, torch.Tensor) or id(h) in memo:
            return memo.get(id(h), h)
        if isinstance(h, list | tuple):
            paired = isinstance(s, list | tuple) and len(s) == len(h)
            items = [
                self.walk(hv, s[i] if paired else _MISSING, f"{path}[{i}]")
                for i, hv in enumerate(h)
            ]
            rebuilt = type(h)(*items) if hasattr(h, "_fields") else type(h)(items)
            memo[id(h)] = rebuilt
            return rebuilt
        if isinstance(h, dict):
            new_dict = copy(h)
            memo[id(h)] = new_dict
            for key, value in h.items():
                counterpart = s.get(key, _MISSING) if isinstance(s, dict) else _MISSING
                new_dict[key] = self.walk(value, counterpart, f"{path}[{key!r}]")
            return new_dict
        if hasattr(h, "__dict__") and not isinstance(h, type):
            new_obj = copy(h)
            memo[id(h)] = new_obj
            s_vars = vars(s) if hasattr(s, "__dict__") and s is not _MISSING else {}
            for key, value in vars(h).items():
                sub = f"{path}.{key}" if path else key
                vars(new_obj)[key] = self.walk(value, s_vars.get(key, _MISSING), sub)
            return new_obj
        return h


class _Missing:
    """Marks a place of the handle package that the buffer does not have."""


_MISSING: Any = _Missing()

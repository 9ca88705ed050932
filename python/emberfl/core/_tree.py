"""Walk the tensors inside an arbitrary package object (dataclass, dict, list, tuple, ...).

Private helper shared by :mod:`emberfl.core.shared_memory` and the process-pool transport.
A tensor's *path* names where it sits, e.g. ``model_parameters`` or ``metrics['loss'][0]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from copy import copy
from typing import Any

import torch

__all__ = ["iter_tensors", "map_matching", "map_tensors"]

_LEAF_TYPES = (str, bytes, bytearray, int, float, complex, bool, type(None))
_STOP_TYPES = (*_LEAF_TYPES, torch.Tensor)


def _join(prefix: str, part: str) -> str:
    if part.startswith("["):
        return prefix + part
    return f"{prefix}.{part}" if prefix else part


def iter_tensors(
    obj: Any, *, max_depth: int = 10, object_depth: int = 1
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(path, tensor)`` for every tensor reachable from ``obj``, depth first.

    Args:
        obj: The object to walk.
        max_depth: Containers nested deeper than this are not entered.
        object_depth: How many levels an object's attributes lie below the object: 1, or 2
            to count its ``__dict__`` as a level of its own (BlazeFL's convention).

    Yields:
        Each tensor with its path, in a deterministic order.
    """
    yield from _iter(obj, "", 0, max_depth, set(), object_depth)


def _iter(
    node: Any, path: str, depth: int, max_depth: int, seen: set[int], object_depth: int = 1
) -> Iterator[tuple[str, torch.Tensor]]:
    # A plain recursive function, not a closure: a self-referencing closure would form a
    # reference cycle and keep (shared-memory) tensors alive until the garbage collector runs.
    if isinstance(node, torch.Tensor):
        yield path, node
        return
    if isinstance(node, _LEAF_TYPES) or depth >= max_depth or id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, list | tuple):
        for i, item in enumerate(node):
            yield from _iter(item, _join(path, f"[{i}]"), depth + 1, max_depth, seen, object_depth)
    elif isinstance(node, dict):
        for key, value in node.items():
            sub = _join(path, f"[{key!r}]")
            yield from _iter(value, sub, depth + 1, max_depth, seen, object_depth)
    elif hasattr(node, "__dict__") and depth + object_depth - 1 < max_depth:
        for key, value in vars(node).items():
            sub = _join(path, key)
            yield from _iter(value, sub, depth + object_depth, max_depth, seen, object_depth)


def map_tensors(
    obj: Any,
    fn: Callable[[str, torch.Tensor], Any],
    *,
    max_depth: int = 10,
    object_depth: int = 1,
) -> Any:
    """Return a copy of ``obj`` in which every tensor ``t`` at path ``p`` is ``fn(p, t)``.

    Containers are copied (shallowly, then rebuilt); everything else is shared with
    ``obj``. Cycles are preserved.

    Args:
        obj: The object to transform.
        fn: Called with each tensor's path and the tensor; returns the replacement.
        max_depth: Containers nested deeper than this are returned unchanged.
        object_depth: See :func:`iter_tensors`.

    Returns:
        The transformed copy.
    """
    return map_matching(
        obj,
        lambda node: isinstance(node, torch.Tensor),
        fn,
        max_depth=max_depth,
        object_depth=object_depth,
    )


def map_matching(
    obj: Any,
    predicate: Callable[[Any], bool],
    fn: Callable[[str, Any], Any],
    *,
    max_depth: int = 10,
    object_depth: int = 1,
) -> Any:
    """Return a copy of ``obj`` in which every node ``n`` with ``predicate(n)`` is replaced.

    Args:
        obj: The object to transform.
        predicate: Selects the nodes to replace (they are not entered).
        fn: Called with each selected node's path and the node; returns the replacement.
        max_depth: Containers nested deeper than this are returned unchanged.
        object_depth: See :func:`iter_tensors`.

    Returns:
        The transformed copy; containers are rebuilt, other objects shared.
    """
    return _Mapper(predicate, fn, max_depth, object_depth).walk(obj, "", 0)


class _Mapper:
    """The recursion of :func:`map_matching` (a class, so no reference cycle is created)."""

    def __init__(
        self,
        predicate: Callable[[Any], bool],
        fn: Callable[[str, Any], Any],
        max_depth: int,
        object_depth: int = 1,
    ) -> None:
        self.predicate = predicate
        self.fn = fn
        self.max_depth = max_depth
        self.object_depth = object_depth
        self.memo: dict[int, Any] = {}

    def walk(self, node: Any, path: str, depth: int) -> Any:
        if self.predicate(node):
            return self.fn(path, node)
        if isinstance(node, _STOP_TYPES) or depth >= self.max_depth:
            return node
        memo = self.memo
        if id(node) in memo:
            return memo[id(node)]
        if isinstance(node, list):
            new_list: list[Any] = []
            memo[id(node)] = new_list
            new_list.extend(
                self.walk(v, _join(path, f"[{i}]"), depth + 1) for i, v in enumerate(node)
            )
            return new_list
        if isinstance(node, tuple):
            items = [self.walk(v, _join(path, f"[{i}]"), depth + 1) for i, v in enumerate(node)]
            rebuilt = type(node)(*items) if hasattr(node, "_fields") else type(node)(items)
            memo[id(node)] = rebuilt
            return rebuilt
        if isinstance(node, dict):
            new_dict = copy(node)
            memo[id(node)] = new_dict
            for key, value in node.items():
                new_dict[key] = self.walk(value, _join(path, f"[{key!r}]"), depth + 1)
            return new_dict
        if hasattr(node, "__dict__") and not isinstance(node, type):
            if depth + self.object_depth - 1 >= self.max_depth:
                return node
            new_obj = copy(node)
            memo[id(node)] = new_obj
            for key, value in vars(node).items():
                vars(new_obj)[key] = self.walk(value, _join(path, key), depth + self.object_depth)
            return new_obj
        return node

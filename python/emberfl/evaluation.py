"""Evaluate a model on a data loader: mean cross-entropy and accuracy, the same for any
thread count.

Every batch's loss sum is computed on its own and the sums are added in batch order, so
evaluating with several threads gives the same bits as with one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader

from emberfl.core.batches import iter_batches

__all__ = ["evaluate", "in_order"]

_R = TypeVar("_R")


def in_order(fn: Callable[[Any], _R], items: Iterable[Any], num_threads: int) -> Iterator[_R]:
    """Yield ``fn(item)`` for every item, in order, computing up to ``num_threads`` at once.

    At most ``2 * num_threads`` items are read ahead of the one being yielded.
    """
    if num_threads == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(num_threads, thread_name_prefix="emberfl-eval") as pool:
        pending: deque[Future[_R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * num_threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def evaluate(
    model: torch.nn.Module,
    loader: DataLoader[Any],
    device: str | torch.device,
    *,
    num_threads: int = 1,
    shard: tuple[int, int] | None = None,
) -> tuple[float, float]:
    """Return ``(mean cross-entropy, accuracy)`` of ``model`` on ``loader``.

    Args:
        model: The model (moved to ``device`` and put in eval mode).
        loader: Yields ``(inputs, labels)``.
        device: Where to evaluate.
        num_threads: Batches evaluated at once, in threads (PyTorch's kernels release the
            GIL); the result does not depend on it.
        shard: ``(rank, world_size)`` of a ``torch.distributed`` job whose ranks all
            call this with the same model and loader: each rank evaluates every
            ``world_size``-th batch and the batches' sums are gathered and added in batch
            order, so every rank gets the bits of an evaluation by one process.

    Returns:
        The mean loss and the accuracy.

    Raises:
        ValueError: If the loader yields no sample or ``num_threads < 1``.
    """
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    model.to(device)
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")

    def one(batch: Any) -> tuple[float, int, int]:
        inputs, labels = batch
        with torch.no_grad():  # per thread: grad mode is thread-local
            inputs, labels = inputs.to(device), labels.to(device)
            outputs = model(inputs)
            loss = float(criterion(outputs, labels).item())
            correct = int((outputs.argmax(dim=1) == labels).sum().item())
        return loss, correct, int(labels.size(0))

    if shard is None:
        sums = list(in_order(one, iter_batches(loader), num_threads))
    else:
        sums = _sharded(one, loader, shard)
    total_loss = 0.0
    total_correct = 0
    total = 0
    for loss, correct, count in sums:
        total_loss += loss
        total_correct += correct
        total += count
    if total == 0:
        raise ValueError("the evaluation data loader must yield at least one sample")
    return total_loss / total, total_correct / total


def _sharded(
    one: Callable[[Any], tuple[float, int, int]], loader: DataLoader[Any], shard: tuple[int, int]
) -> list[tuple[float, int, int]]:
    """Every batch's sums, each batch computed by one rank (batch ``b`` by rank
    ``b % world_size``) and gathered, in batch order, on every rank."""
    import torch.distributed as dist

    rank, world = shard
    mine = [one(batch) for b, batch in enumerate(iter_batches(loader)) if b % world == rank]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    count = sum(len(part) for part in gathered)
    return [gathered[b % world][b // world] for b in range(count)]

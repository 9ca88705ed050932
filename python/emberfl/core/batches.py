"""Iterate a ``DataLoader`` over in-memory tensors without its per-sample overhead.

A single-process ``DataLoader`` over a ``TensorDataset`` with the default collate function
fetches every sample on its own and stacks them again (about 12 ms per 1,000 CIFAR-sized
images here). Its batches are exactly ``tensor[indices]``, so :func:`iter_batches` indexes
the tensors directly (a slice, without a copy, when the loader is sequential). The
batches, their order and the draws from the loader's generator are the loader's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset
from torch.utils.data._utils.collate import default_collate

__all__ = ["iter_batches", "tensor_dataset"]


def tensor_dataset(loader: DataLoader[Any]) -> TensorDataset | None:
    """Return the ``TensorDataset`` behind ``loader`` when its batches are ``tensor[indices]``.

    Args:
        loader: A data loader.

    Returns:
        The data set of a plain, single-process ``DataLoader`` with the default collate
        function over a two-tensor ``TensorDataset`` (inputs, targets); otherwise ``None``.
    """
    dataset = loader.dataset
    if (
        type(loader) is DataLoader
        and isinstance(dataset, TensorDataset)
        and loader.num_workers == 0
        and loader.collate_fn is default_collate
        and loader.batch_sampler is not None
        and len(dataset.tensors) == 2
    ):
        return dataset
    return None


def iter_batches(loader: DataLoader[Any]) -> Iterator[Any]:
    """Yield one pass of ``loader``'s batches (the same tensors, in the same order).

    Args:
        loader: A data loader.

    Yields:
        ``(inputs, targets)`` batches; for a loader :func:`tensor_dataset` does not
        recognise, whatever the loader yields.
    """
    dataset = tensor_dataset(loader)
    if dataset is None:
        yield from loader
        return
    # What DataLoader.__iter__ does with the generator, in the same order: create the
    # sampler iterator, draw the workers' base seed, then draw the permutation lazily.
    indices = iter(loader.batch_sampler)  # type: ignore[arg-type]
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
    sequential = type(loader.batch_sampler) is BatchSampler and (
        type(loader.sampler) is SequentialSampler
    )
    x, y = dataset.tensors
    for batch in indices:
        if sequential and batch:
            start, stop = int(batch[0]), int(batch[-1]) + 1
            yield x[start:stop], y[start:stop]
        else:
            index = torch.as_tensor(batch, dtype=torch.int64)
            yield x.index_select(0, index), y.index_select(0, index)

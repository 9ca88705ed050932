"""Data sets split across clients: the :class:`PartitionedDataset` protocol and
:class:`FilteredDataset`, a subset-with-transforms wrapper used to build partitions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any, Protocol, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

from emberfl.errors import LengthMismatchError

__all__ = ["FilteredDataset", "PartitionedDataset"]

PartitionType = TypeVar("PartitionType", bound=StrEnum, contravariant=True)


class PartitionedDataset(Protocol[PartitionType]):
    """A data set partitioned across clients.

    ``PartitionType`` is a :class:`enum.StrEnum` naming the splits (``"train"``,
    ``"test"``, ...). ``cid=None`` means the server's (global) split. In process-pool mode
    the data set is sent to each worker process once and kept there, so it must be
    picklable.
    """

    def get_dataset(self, type_: PartitionType, cid: int | None) -> Dataset[Any]:
        """Return one client's split.

        Args:
            type_: Which split.
            cid: The client id, or ``None`` for the server's split.

        Returns:
            The data set.
        """
        ...

    def set_dataset(self, type_: PartitionType, cid: int | None, dataset: Dataset[Any]) -> None:
        """Replace one client's split.

        Args:
            type_: Which split.
            cid: The client id, or ``None`` for the server's split.
            dataset: The new data set.
        """
        ...

    def get_dataloader(
        self,
        type_: PartitionType,
        cid: int | None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> DataLoader[Any]:
        """Return a loader over one client's split.

        Args:
            type_: Which split.
            cid: The client id, or ``None`` for the server's split.
            batch_size: The batch size; ``None`` for the implementation's default.
            generator: The generator that drives shuffling; pass the client's
                :func:`emberfl.reproducibility.client_rng_suite` ``torch_cpu`` generator to
                make the order independent of the thread or process running the client.

        Returns:
            The data loader.
        """
        ...


class FilteredDataset(Dataset[Any]):
    """A subset of a data set, with optional transforms.

    Attributes:
        data: The selected samples.
        targets: The selected targets (only present if ``original_targets`` was given).
        transform: Applied to each sample on access.
        target_transform: Applied to each target on access.
    """

    def __init__(
        self,
        indices: Sequence[int],
        original_data: Sequence[Any],
        original_targets: Sequence[Any] | None = None,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
    ) -> None:
        """Select ``indices`` from ``original_data`` (and ``original_targets``).

        Args:
            indices: The positions to keep, in order.
            original_data: The full data.
            original_targets: The full targets, the same length as ``original_data``.
            transform: Applied to each sample on access.
            target_transform: Applied to each target on access.

        Raises:
            LengthMismatchError: If data and targets differ in length (a ``ValueError``
                and an ``AssertionError``).
        """
        if original_targets is not None and len(original_data) != len(original_targets):
            raise LengthMismatchError(
                "original_data and original_targets must have the same length, got "
                f"{len(original_data)} and {len(original_targets)}"
            )
        self.data = [original_data[i] for i in indices]
        if original_targets is not None:
            self.targets = [original_targets[i] for i in indices]
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        """Return the number of selected samples."""
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        """Return sample ``index`` (transformed), paired with its target when there are targets.

        Args:
            index: Position in the subset.

        Returns:
            ``(sample, target)`` if the data set has targets, else ``sample``.
        """
        sample = self.data[index]
        if self.transform is not None:
            sample = self.transform(sample)
        if not hasattr(self, "targets"):
            return sample
        target = self.targets[index]
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target

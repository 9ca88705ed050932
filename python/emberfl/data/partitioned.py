"""An in-memory :class:`~emberfl.core.PartitionedDataset` for FedAvg-style algorithms.

``emberfl run`` and ``examples/quickstart_fedavg`` train on it.

It holds an in-memory :class:`~emberfl.data.FLDataset` and a
:class:`~emberfl.data.Partition` as plain tensors (so process-pool workers receive it
through shared memory) and serves each client's training split without copying it. Batches
are gathered with one indexing operation instead of one ``__getitem__`` per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from emberfl.algorithms.base import Split as FedAvgPartitionType
from emberfl.data import FLDataset, Partition
from emberfl.data.skew import Augment
from emberfl.errors import ConfigError
from emberfl.rng import Purpose, stream

__all__ = ["TensorPartitionedDataset", "TensorSplit"]


class TensorSplit(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A view of some rows of an image and a label tensor.

    Attributes:
        x: All images ``(N, ...)``.
        y: All labels ``(N,)``.
        index: The rows of this split, or ``None`` for all of them.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None) -> None:
        """Create the view.

        Args:
            x: All images.
            y: All labels.
            index: The rows of this split (int64), or ``None`` for all rows.
        """
        self.x = x
        self.y = y
        self.index = index

    def __len__(self) -> int:
        """Return the number of rows in the split."""
        return int(self.y.shape[0] if self.index is None else self.index.shape[0])

    def _rows(self, positions: torch.Tensor) -> torch.Tensor:
        return positions if self.index is None else self.index[positions]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image, label)`` of the split's ``i``-th row."""
        row = int(self._rows(torch.tensor([i]))[0])
        return self.x[row], self.y[row]

    def __getitems__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return a whole batch ``(images, labels)`` at once (used by :class:`DataLoader`)."""
        rows = self._rows(torch.as_tensor(positions, dtype=torch.int64))
        return self.x[rows], self.y[rows]


def _batch_as_is(batch: Any) -> Any:
    # TensorSplit.__getitems__ already returns a collated (images, labels) batch.
    return batch


@dataclass(frozen=True)
class _Augmented:
    """A collate function that augments each batch's images with the loader's generator."""

    augment: Augment
    generator: torch.Generator

    def __call__(self, batch: Any) -> Any:
        images, labels = batch
        return self.augment(images, self.generator), labels


class TensorPartitionedDataset:
    """An :class:`~emberfl.data.FLDataset` split among clients by a partition.

    ``get_dataset(TRAIN, cid)`` is client ``cid``'s share of the training split,
    ``get_dataset(TRAIN, None)`` the whole training split and ``get_dataset(TEST, None)``
    the global test split. With ``client_test_fraction > 0`` each client also holds out
    that fraction of its share as its own test split, ``get_dataset(TEST, cid)`` (what
    personalised algorithms are judged on); otherwise ``get_dataset(TEST, cid)`` is the
    global test split.

    Attributes:
        train_x: Training images.
        train_y: Training labels.
        client_train_y: The labels the clients train on: ``train_y`` unless an attack
            poisoned some (:func:`emberfl.attacks.flip_labels`).
        test_x: Test images.
        test_y: Test labels.
        client_index: One int64 tensor of training rows per client.
        client_test_index: One int64 tensor of held-out rows per client (empty tensors
            when ``client_test_fraction`` is 0).
        client_test_fraction: The held-out fraction of each client's share.
    """

    def __init__(
        self,
        data: FLDataset,
        partition: Partition,
        *,
        client_test_fraction: float = 0.0,
        seed: int = 0,
        augment: Augment | None = None,
    ) -> None:
        """Create the data set.

        Args:
            data: The data set.
            partition: Which training samples each client holds.
            client_test_fraction: The fraction of each client's share held out as its
                test split, in ``[0, 1)``: ``round(fraction * n_k)`` samples, at least one
                for a client of two or more samples and never all of them, chosen by the
                stream ``(seed, CLIENT_TEST_SPLIT, k)``.
            seed: The experiment seed.
            augment: Applied to every client training batch with the generator the
                client's loader shuffles with (:class:`emberfl.data.skew.CropFlip`, or any
                ``(images, generator) -> images``); ``None``: none.

        Raises:
            ConfigError: If the partition does not cover the training split, or the
                fraction is out of range.
        """
        if partition.num_samples != data.num_train:
            raise ConfigError(
                f"the partition covers {partition.num_samples} samples but {data.name} has "
                f"{data.num_train} training samples"
            )
        if isinstance(client_test_fraction, bool) or not 0 <= client_test_fraction < 1:
            raise ConfigError(
                f"client_test_fraction must be in [0, 1), got {client_test_fraction!r}"
            )
        self.train_x = data.train_x
        self.train_y = data.train_y
        self.client_train_y = data.train_y
        self.test_x = data.test_x
        self.test_y = data.test_y
        self.client_test_fraction = float(client_test_fraction)
        self.augment = augment
        self.client_index: list[torch.Tensor] = []
        self.client_test_index: list[torch.Tensor] = []
        for cid, idx in enumerate(partition):
            rows = torch.from_numpy(idx.copy())
            n = int(rows.shape[0])
            held = 0
            if client_test_fraction > 0 and n >= 2:
                held = min(n - 1, max(1, round(client_test_fraction * n)))
            if held == 0:
                self.client_index.append(rows)
                self.client_test_index.append(rows[:0])
                continue
            order = torch.from_numpy(
                stream(seed, purpose=Purpose.CLIENT_TEST_SPLIT, client=cid).permutation(n)
            )
            self.client_test_index.append(rows[order[:held]].sort().values)
            self.client_index.append(rows[order[held:]].sort().values)

    @property
    def has_client_tests(self) -> bool:
        """Whether clients hold test splits of their own."""
        return self.client_test_fraction > 0

    @property
    def num_clients(self) -> int:
        """The number of clients."""
        return len(self.client_index)

    def get_dataset(self, type_: FedAvgPartitionType, cid: int | None) -> TensorSplit:
        """Return a split.

        Args:
            type_: ``TRAIN`` or ``TEST``.
            cid: The client, or ``None`` for the server (the whole split).

        Returns:
            The split.

        Raises:
            ConfigError: For a client id outside ``0..num_clients-1``.
        """
        if cid is not None and not 0 <= cid < self.num_clients:
            raise ConfigError(f"client {cid} does not exist: there are {self.num_clients}")
        if type_ == FedAvgPartitionType.TEST:
            if cid is not None and self.has_client_tests:
                return TensorSplit(self.train_x, self.train_y, self.client_test_index[cid])
            return TensorSplit(self.test_x, self.test_y, None)
        if cid is None:
            return TensorSplit(self.train_x, self.train_y, None)
        return TensorSplit(self.train_x, self.client_train_y, self.client_index[cid])

    def held_out_loader(self, batch_size: int) -> DataLoader[Any]:
        """Return a loader over every client's own test split together (in client order).

        Args:
            batch_size: The batch size.

        Returns:
            A loader yielding ``(images, labels)`` batches (empty without client tests).
        """
        index = torch.cat(self.client_test_index)
        split = TensorSplit(self.train_x, self.train_y, index)
        return DataLoader(split, batch_size=batch_size, collate_fn=_batch_as_is)

    def set_dataset(self, type_: FedAvgPartitionType, cid: int | None, dataset: Any) -> None:
        """Not supported: the splits are fixed by the partition.

        Raises:
            NotImplementedError: Always.
        """
        raise NotImplementedError("TensorPartitionedDataset's splits are fixed by its partition")

    def get_dataloader(
        self,
        type_: FedAvgPartitionType,
        cid: int | None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> DataLoader[Any]:
        """Return a loader over a split; training splits are shuffled by ``generator``.

        Args:
            type_: ``TRAIN`` or ``TEST``.
            cid: The client, or ``None`` for the server.
            batch_size: The batch size (the whole split if ``None``).
            generator: Drives the shuffling of training splits.

        Returns:
            A loader yielding ``(images, labels)`` batches.
        """
        split = self.get_dataset(type_, cid)
        train = type_ == FedAvgPartitionType.TRAIN and cid is not None
        collate: Callable[[Any], Any] = _batch_as_is
        if train and self.augment is not None and generator is not None:
            collate = _Augmented(self.augment, generator)
        return DataLoader(
            split,
            batch_size=batch_size or max(len(split), 1),
            shuffle=train,
            generator=generator,
            collate_fn=collate,
        )

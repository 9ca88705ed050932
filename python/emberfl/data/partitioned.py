"""An in-memory :class:`~emberfl.core.PartitionedDataset` for FedAvg-style algorithms.

``emberfl run`` and ``examples/quickstart_fedavg`` train on it.

It holds an in-memory :class:`~emberfl.data.FLDataset` and a
:class:`~emberfl.data.Partition` as plain tensors (so process-pool workers receive it
through shared memory) and serves each client's training split without copying it. Batches
are gathered with one indexing operation instead of one ``__getitem__`` per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from emberfl.algorithms.base import Split as FedAvgPartitionType
from emberfl.data import FLDataset, Partition
from emberfl.data.skew import Augment
from emberfl.errors import ConfigError
from emberfl.rng import Purpose, stream

__all__ = ["TensorPartitionedDataset", "TensorSplit", "as_model_input", "client_test_rows"]


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
        return as_model_input(self.x[row]), self.y[row]

    def __getitems__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return a whole batch ``(images, labels)`` at once (used by :class:`DataLoader`)."""
        rows = self._rows(torch.as_tensor(positions, dtype=torch.int64))
        return as_model_input(self.x[rows]), self.y[rows]


def as_model_input(x: torch.Tensor) -> torch.Tensor:
    """Return inputs as a model takes them: uint8 images as float32 in ``[0, 1]``.

    Args:
        x: Inputs of an :class:`~emberfl.data.FLDataset` (float32, uint8 or int64 ids).

    Returns:
        ``x / 255`` in float32 for uint8, ``x`` itself otherwise.
    """
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x


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
        client_tests: Sequence[torch.Tensor] | None = None,
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
            client_tests: The rows of the *test* split each client is judged on, for a
                data set whose clients come with their own test samples (LEAF's:
                :func:`client_test_rows`); excludes ``client_test_fraction``.

        Raises:
            ConfigError: If the partition does not cover the training split, the
                fraction is out of range, or ``client_tests`` does not fit.
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
        self.tests_in_test_split = client_tests is not None
        if client_tests is not None:
            if client_test_fraction > 0:
                raise ConfigError(
                    "the clients come with test samples of their own: client_test_fraction "
                    "must be 0"
                )
            if len(client_tests) != partition.num_clients:
                raise ConfigError(
                    f"client_tests has {len(client_tests)} entries for "
                    f"{partition.num_clients} clients"
                )
            n_test = data.num_test
            for rows in client_tests:
                if rows.dtype != torch.int64 or (
                    rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_test)
                ):
                    raise ConfigError(f"client_tests must be int64 rows in 0..{n_test - 1}")
            self.client_index = [torch.from_numpy(idx.copy()) for idx in partition]
            self.client_test_index = [rows.clone() for rows in client_tests]
            return
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
        return self.tests_in_test_split or self.client_test_fraction > 0

    def _client_test_source(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tests_in_test_split:
            return self.test_x, self.test_y
        return self.train_x, self.train_y

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
                return TensorSplit(*self._client_test_source(), self.client_test_index[cid])
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
        split = TensorSplit(*self._client_test_source(), index)
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


def client_test_rows(test_owner: torch.Tensor, num_clients: int) -> list[torch.Tensor]:
    """Return each client's rows of the test split from the owner of every test sample.

    Args:
        test_owner: :attr:`FLDataset.test_owner` (``-1`` or ids ``>= num_clients``: no
            client's).
        num_clients: The number of clients.

    Returns:
        ``num_clients`` sorted int64 row tensors.
    """
    owner = test_owner.to(torch.int64)
    order = torch.argsort(owner, stable=True)
    sizes = torch.bincount(owner[(owner >= 0) & (owner < num_clients)], minlength=num_clients)
    start = int((owner < 0).sum())
    rows = []
    for k in range(num_clients):
        n = int(sizes[k])
        rows.append(order[start : start + n].sort().values)
        start += n
    return rows

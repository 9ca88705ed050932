"""The DS-FL example's data: private client splits, an unlabeled open set and a test split.

:class:`DSFLPartitionedDataset` implements :class:`emberfl.core.PartitionedDataset` over
an in-memory :class:`emberfl.data.FLDataset` (by default the offline ``"digits"`` set):

* a random slice of the training split becomes the **open** set, whose labels are
  thrown away (DS-FL's shared unlabeled data);
* the rest is the **private** data, split non-IID among the clients with
  :func:`emberfl.data.partition` (Dirichlet label skew by default);
* the test split evaluates the server's (and the clients') models.

Every random choice comes from emberfl streams: the open slice from
``(seed, Purpose.PARTITION, round=1)``, the client split from the partitioner's own
``(seed, Purpose.PARTITION)`` stream, and the order of a client's batches from the
generator its trainer passes to :meth:`DSFLPartitionedDataset.get_dataloader`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sized
from enum import StrEnum
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from emberfl.data import FLDataset, partition
from emberfl.errors import ConfigError
from emberfl.reproducibility import client_rng_suite
from emberfl.rng import Purpose, stream

__all__ = ["DSFLPartitionType", "DSFLPartitionedDataset"]

_OPEN_SPLIT_ROUND = 1  # the open slice's stream; round 0 is the partitioner's


class DSFLPartitionType(StrEnum):
    """The splits of :class:`DSFLPartitionedDataset`."""

    TRAIN = "train"
    OPEN = "open"
    TEST = "test"


class DSFLPartitionedDataset:
    """Private per-client training data, a shared unlabeled open set and a test split.

    The whole data set stays in memory as tensors; in process-pool mode emberfl sends it
    to each worker once, its tensors through shared memory.

    Attributes:
        num_classes: The number of classes.
        input_shape: The shape of one image.
        private_x: The private images (all clients together).
        private_y: Their labels.
        client_indices: Positions in ``private_x`` of each client's samples.
        open_x: The open set's images (no labels).
        test_x: The test images.
        test_y: The test labels.
        seed: The experiment seed.
    """

    def __init__(
        self,
        data: FLDataset,
        *,
        num_clients: int,
        open_size: int,
        seed: int,
        partition_method: str = "dirichlet",
        partition_params: Mapping[str, Any] | None = None,
    ) -> None:
        """Split ``data`` into the open set and the clients' private data.

        Args:
            data: The data set, e.g. ``emberfl.data.load_dataset("digits", seed=seed)``.
            num_clients: The number of clients.
            open_size: How many training samples become the unlabeled open set.
            seed: The experiment seed.
            partition_method: An :func:`emberfl.data.partition` method.
            partition_params: Its options; ``{"alpha": 0.5}`` by default (for
                ``"dirichlet"``).

        Raises:
            ConfigError: If ``open_size`` leaves no private data or is not positive.
            PartitionError: If the private data cannot be split as asked.
        """
        n = data.num_train
        if not 0 < open_size < n:
            raise ConfigError(
                f"open_size={open_size} must be between 1 and {n - 1}: the {data.name} "
                f"training split has {n} samples to share between the open set and the clients"
            )
        params = dict(partition_params) if partition_params is not None else {"alpha": 0.5}
        order = torch.from_numpy(
            stream(seed, purpose=Purpose.PARTITION, round=_OPEN_SPLIT_ROUND).permutation(n)
        )
        open_idx = order[:open_size].sort().values
        private_idx = order[open_size:].sort().values
        self.num_classes = data.num_classes
        self.input_shape = data.input_shape
        self.seed = seed
        self.open_x = data.train_x[open_idx].contiguous()
        self.private_x = data.train_x[private_idx].contiguous()
        self.private_y = data.train_y[private_idx].contiguous()
        parts = partition(
            self.private_y.numpy(), num_clients, method=partition_method, seed=seed, **params
        )
        self.client_indices = tuple(torch.from_numpy(idx.copy()) for idx in parts)
        self.test_x = data.test_x
        self.test_y = data.test_y
        self._overrides: dict[tuple[DSFLPartitionType, int | None], Dataset[Any]] = {}

    @property
    def num_clients(self) -> int:
        """The number of clients."""
        return len(self.client_indices)

    @property
    def open_size(self) -> int:
        """The number of samples in the open set."""
        return int(self.open_x.shape[0])

    def client_sizes(self) -> list[int]:
        """Return the number of private samples of every client."""
        return [int(idx.numel()) for idx in self.client_indices]

    def open_images(self, indices: torch.Tensor) -> torch.Tensor:
        """Return the open-set images at ``indices`` (a new tensor), in that order.

        Args:
            indices: Positions in the open set (int64).

        Returns:
            ``(len(indices), *input_shape)`` images.
        """
        return self.open_x[indices.long()]

    def get_dataset(self, type_: DSFLPartitionType, cid: int | None) -> Dataset[Any]:
        """Return one split.

        Args:
            type_: ``TRAIN`` (needs a client id), ``OPEN`` or ``TEST`` (shared by all).
            cid: The client id; ignored for ``OPEN`` and ``TEST``.

        Returns:
            ``TRAIN`` and ``TEST`` yield ``(image, label)``; ``OPEN`` yields ``(image,)``.

        Raises:
            ValueError: For ``TRAIN`` without a valid client id.
        """
        type_ = DSFLPartitionType(type_)
        key = (type_, cid if type_ is DSFLPartitionType.TRAIN else None)
        if key in self._overrides:
            return self._overrides[key]
        if type_ is DSFLPartitionType.OPEN:
            return TensorDataset(self.open_x)
        if type_ is DSFLPartitionType.TEST:
            return TensorDataset(self.test_x, self.test_y)
        if cid is None or not 0 <= cid < self.num_clients:
            raise ValueError(
                f"the train split needs a client id in 0..{self.num_clients - 1}, got {cid}"
            )
        idx = self.client_indices[cid]
        return TensorDataset(self.private_x[idx], self.private_y[idx])

    def set_dataset(self, type_: DSFLPartitionType, cid: int | None, dataset: Dataset[Any]) -> None:
        """Replace one split (e.g. with an augmented copy).

        Call it before a process-pool trainer starts its workers: they keep the copy they
        were sent.

        Args:
            type_: Which split.
            cid: The client id for ``TRAIN``; ignored otherwise.
            dataset: The replacement.
        """
        type_ = DSFLPartitionType(type_)
        self._overrides[(type_, cid if type_ is DSFLPartitionType.TRAIN else None)] = dataset

    def get_dataloader(
        self,
        type_: DSFLPartitionType,
        cid: int | None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> DataLoader[Any]:
        """Return a loader over one split.

        ``TRAIN`` loaders shuffle, with ``generator`` (pass the client's
        :func:`~emberfl.reproducibility.client_rng_suite` ``torch_cpu`` generator); without
        one they use the client's round-0 stream, never PyTorch's global generator.
        ``OPEN`` and ``TEST`` loaders keep the data's order.

        Args:
            type_: Which split.
            cid: The client id (``TRAIN`` only).
            batch_size: Samples per batch; ``None`` for the whole split at once.
            generator: Drives the shuffling of ``TRAIN``.

        Returns:
            The loader.
        """
        type_ = DSFLPartitionType(type_)
        dataset = self.get_dataset(type_, cid)
        if batch_size is None:
            batch_size = max(1, len(dataset)) if isinstance(dataset, Sized) else 1
        if type_ is not DSFLPartitionType.TRAIN:
            # A loader without a generator seeds its iterator from PyTorch's global one,
            # even when it does not shuffle: give it a private generator.
            generator = generator if generator is not None else torch.Generator()
            return DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=generator)
        if generator is None:
            assert cid is not None  # get_dataset checked it
            generator = client_rng_suite(self.seed, cid, 0).torch_cpu
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)

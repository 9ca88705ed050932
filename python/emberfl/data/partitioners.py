"""FedLab's partitioner classes on emberfl's seeded partitioners, so FedLab code ports.

``CIFAR10Partitioner(targets, num_clients, balance=..., partition=..., ...)`` and the
others take FedLab's constructor arguments and give FedLab's interface (``client_dict``,
``part[cid]``, ``len(part)``), but each scheme is one of :mod:`emberfl.data.partition`'s
functions, so a partition is a pure function of ``seed`` and never touches numpy's global
random state (FedLab re-seeds it), and the loops FedLab runs without bound are bounded
(a :class:`~emberfl.errors.PartitionError` says what to change). ``seed=None`` means seed
0: the result is reproducible either way. ``verbose`` is accepted and prints nothing.
The schemes and the functions of :mod:`emberfl.data.partition` they use:

=========================================  ==================================================
FedLab scheme                              emberfl partitioner
=========================================  ==================================================
``balance=None, partition="dirichlet"``    ``dirichlet_partition``
                                           (hetero-dir; ``min_size`` = the number of classes)
``balance=None, partition="shards"``       ``shards_partition``
                                           (``num_shards / num_clients`` shards each)
``balance=True, partition="iid"``          ``iid_partition``
``balance=True, partition="dirichlet"``    ``client_dirichlet_partition``
``balance=False, partition="iid"``         ``iid_lognormal_partition``
                                           (``sigma = unbalance_sgm``)
``balance=False, partition="dirichlet"``   client-inner Dirichlet on log-normal client sizes
``"noniid-#label"`` (Basic, Vision, ...)   ``label_quantity_partition``
``"noniid-labeldir"``                      ``dirichlet_partition``
                                           (``min_size`` 10, as NIID-Bench)
``"unbalance"``                            ``iid_dirichlet_partition``
``"iid"``                                  ``iid_partition``
=========================================  ==================================================

Every sample is assigned to exactly one client (FedLab's shards scheme drops the samples
that do not fill a shard; here the last shards are a sample larger).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from emberfl.atomic import atomic_write_text
from emberfl.data.partition import (
    Partition,
    client_dirichlet_partition,
    dirichlet_partition,
    iid_dirichlet_partition,
    iid_lognormal_partition,
    iid_partition,
    label_quantity_partition,
    lognormal_sizes,
    shards_partition,
)
from emberfl.errors import ConfigError

__all__ = [
    "BasicPartitioner",
    "CIFAR10Partitioner",
    "CIFAR100Partitioner",
    "DataPartitioner",
    "FCUBEPartitioner",
    "FMNISTPartitioner",
    "MNISTPartitioner",
    "SVHNPartitioner",
    "VisionPartitioner",
    "partition_report",
]


class DataPartitioner:
    """The FedLab interface: ``client_dict``, ``part[cid]`` and ``len(part)``.

    Attributes:
        targets: The labels, int64.
        num_clients: The number of clients.
        seed: The seed the partition was drawn with.
        partition_result: The emberfl :class:`~emberfl.data.partition.Partition`.
        client_dict: ``{client id: sample indices}`` (sorted int64 arrays).
    """

    num_classes: ClassVar[int] = 10

    def __init__(self, targets: npt.ArrayLike, num_clients: int, seed: int | None) -> None:
        """Store the labels; subclasses then call :meth:`_perform_partition`."""
        self.targets = np.asarray(targets).astype(np.int64).ravel()
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
        self.num_clients = num_clients
        self.seed = 0 if seed is None else int(seed)
        self.partition_result = self._perform_partition()
        self.client_dict: dict[int, npt.NDArray[np.int64]] = {
            cid: np.asarray(ix) for cid, ix in enumerate(self.partition_result.client_indices)
        }

    def _perform_partition(self) -> Partition:
        raise NotImplementedError

    def __getitem__(self, index: int) -> npt.NDArray[np.int64]:
        """Return client ``index``'s sample indices."""
        return self.client_dict[index]

    def __len__(self) -> int:
        """Return the number of clients."""
        return len(self.client_dict)


class CIFAR10Partitioner(DataPartitioner):
    """FedLab's ``CIFAR10Partitioner`` schemes (see the module table)."""

    num_classes: ClassVar[int] = 10

    def __init__(
        self,
        targets: npt.ArrayLike,
        num_clients: int,
        balance: bool | None = True,
        partition: str = "iid",
        unbalance_sgm: float = 0,
        num_shards: int | None = None,
        dir_alpha: float | None = None,
        verbose: bool = True,
        seed: int | None = None,
    ) -> None:
        """Partition ``targets`` among ``num_clients`` clients.

        Args:
            targets: Every sample's label.
            num_clients: The number of clients.
            balance: ``None`` (hetero-dir or shards), ``True`` (equal sizes) or ``False``
                (log-normal sizes of spread ``unbalance_sgm``).
            partition: ``"iid"``, ``"dirichlet"`` or ``"shards"``.
            unbalance_sgm: The log-normal sizes' sigma (``balance=False``).
            num_shards: The shards in all (``partition="shards"``).
            dir_alpha: The Dirichlet concentration (``partition="dirichlet"``).
            verbose: Accepted for FedLab's signature; nothing is printed.
            seed: The seed (``None``: 0).

        Raises:
            ConfigError: A scheme FedLab does not have, or a missing option.
            PartitionError: The partition cannot be made (the message says why).
        """
        self.balance = balance
        self.partition = partition
        self.unbalance_sgm = float(unbalance_sgm)
        self.num_shards = num_shards
        self.dir_alpha = dir_alpha
        self.verbose = verbose
        super().__init__(targets, num_clients, seed)

    def _perform_partition(self) -> Partition:
        y, n, seed = self.targets, self.num_clients, self.seed
        scheme = (self.balance, self.partition)
        if self.partition == "dirichlet" and self.dir_alpha is None:
            raise ConfigError("partition='dirichlet' needs dir_alpha")
        if scheme == (None, "dirichlet"):
            return dirichlet_partition(
                y, n, alpha=float(self.dir_alpha or 0), seed=seed, min_size=self.num_classes
            )
        if scheme == (None, "shards"):
            if self.num_shards is None or self.num_shards < n or self.num_shards % n:
                raise ConfigError(
                    f"partition='shards' needs num_shards, a multiple of num_clients={n} "
                    f"(got {self.num_shards})"
                )
            return shards_partition(y, n, shards_per_client=self.num_shards // n, seed=seed)
        if scheme == (True, "iid"):
            return iid_partition(y.size, n, seed=seed)
        if scheme == (True, "dirichlet"):
            return client_dirichlet_partition(y, n, alpha=float(self.dir_alpha or 0), seed=seed)
        if scheme == (False, "iid"):
            return iid_lognormal_partition(y.size, n, sigma=self.unbalance_sgm, seed=seed)
        if scheme == (False, "dirichlet"):
            sizes = lognormal_sizes(y.size, n, sigma=self.unbalance_sgm, seed=seed)
            return client_dirichlet_partition(
                y, n, alpha=float(self.dir_alpha or 0), seed=seed, client_sizes=sizes
            )
        raise ConfigError(
            f"{type(self).__name__} has no scheme balance={self.balance!r}, "
            f"partition={self.partition!r}; use balance None with 'dirichlet' or 'shards', "
            "or balance True/False with 'iid' or 'dirichlet'"
        )


class CIFAR100Partitioner(CIFAR10Partitioner):
    """``CIFAR10Partitioner`` for 100 classes."""

    num_classes: ClassVar[int] = 100


class BasicPartitioner(DataPartitioner):
    """FedLab's ``BasicPartitioner`` (NIID-Bench's schemes; see the module table)."""

    num_classes: ClassVar[int] = 2
    _schemes: ClassVar[Sequence[str]] = ("noniid-#label", "noniid-labeldir", "unbalance", "iid")

    def __init__(
        self,
        targets: npt.ArrayLike,
        num_clients: int,
        partition: str = "iid",
        dir_alpha: float | None = None,
        major_classes_num: int | None = 1,
        verbose: bool = True,
        seed: int | None = None,
    ) -> None:
        """Partition ``targets`` among ``num_clients`` clients.

        Args:
            targets: Every sample's label.
            num_clients: The number of clients.
            partition: ``"noniid-#label"``, ``"noniid-labeldir"``, ``"unbalance"`` or
                ``"iid"``.
            dir_alpha: The Dirichlet concentration (``noniid-labeldir``, ``unbalance``).
            major_classes_num: Classes per client (``noniid-#label``).
            verbose: Accepted for FedLab's signature; nothing is printed.
            seed: The seed (``None``: 0).

        Raises:
            ConfigError: An unknown scheme or a missing option.
            PartitionError: The partition cannot be made (the message says why).
        """
        self.partition = partition
        self.dir_alpha = dir_alpha
        self.major_classes_num = major_classes_num
        self.verbose = verbose
        super().__init__(targets, num_clients, seed)

    def _perform_partition(self) -> Partition:
        y, n, seed = self.targets, self.num_clients, self.seed
        if self.partition not in self._schemes:
            raise ConfigError(
                f"{type(self).__name__} has no partition {self.partition!r}; use one of: "
                + ", ".join(self._schemes)
            )
        if self.partition in ("noniid-labeldir", "unbalance") and self.dir_alpha is None:
            raise ConfigError(f"partition={self.partition!r} needs dir_alpha")
        if self.partition == "noniid-#label":
            if self.major_classes_num is None:
                raise ConfigError("partition='noniid-#label' needs major_classes_num")
            return label_quantity_partition(
                y, n, classes_per_client=int(self.major_classes_num), seed=seed
            )
        if self.partition == "noniid-labeldir":
            return dirichlet_partition(y, n, alpha=float(self.dir_alpha or 0), seed=seed)
        if self.partition == "unbalance":
            return iid_dirichlet_partition(y.size, n, alpha=float(self.dir_alpha or 0), seed=seed)
        return iid_partition(y.size, n, seed=seed)


class VisionPartitioner(BasicPartitioner):
    """``BasicPartitioner`` for 10-class image data sets."""

    num_classes: ClassVar[int] = 10

    def __init__(
        self,
        targets: npt.ArrayLike,
        num_clients: int,
        partition: str = "iid",
        dir_alpha: float | None = None,
        major_classes_num: int | None = None,
        verbose: bool = True,
        seed: int | None = None,
    ) -> None:
        """See :class:`BasicPartitioner` (``major_classes_num`` has no default here)."""
        super().__init__(targets, num_clients, partition, dir_alpha, major_classes_num, verbose,
                         seed)  # fmt: skip


class MNISTPartitioner(VisionPartitioner):
    """``VisionPartitioner`` for MNIST."""


class FMNISTPartitioner(VisionPartitioner):
    """``VisionPartitioner`` for Fashion-MNIST."""


class SVHNPartitioner(VisionPartitioner):
    """``VisionPartitioner`` for SVHN."""


class FCUBEPartitioner(DataPartitioner):
    """FedLab's ``FCUBEPartitioner``: FCUBE's points among 4 clients.

    ``partition="synthetic"``: client ``min(o, 7 - o)`` holds octant ``o``'s points (two
    octants symmetric about the origin each, :func:`emberfl.data.fcube`); ``"iid"``: an IID
    split of equal sizes.
    """

    num_classes: ClassVar[int] = 2
    num_clients_fixed: ClassVar[int] = 4

    def __init__(self, data: npt.ArrayLike, partition: str, seed: int | None = None) -> None:
        """Partition the points ``data`` (``(n, 3)``).

        Raises:
            ConfigError: Points that are not 3-D, or a scheme other than ``synthetic`` and
                ``iid``.
        """
        points = np.asarray(data, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 3:
            raise ConfigError(f"FCUBE's points are (n, 3), got shape {points.shape}")
        if partition not in ("synthetic", "iid"):
            raise ConfigError(
                f"FCUBEPartitioner has no partition {partition!r}; use 'synthetic' or 'iid'"
            )
        self.points = points
        self.partition = partition
        super().__init__((points[:, 0] > 0).astype(np.int64), self.num_clients_fixed, seed)

    def _perform_partition(self) -> Partition:
        if self.partition == "iid":
            return iid_partition(len(self.points), self.num_clients, seed=self.seed)
        p = self.points > 0
        octant = 4 * p[:, 0] + 2 * p[:, 1] + p[:, 2]
        return Partition.from_owner(np.minimum(octant, 7 - octant), self.num_clients)


def partition_report(
    targets: npt.ArrayLike,
    data_indices: Mapping[int, Any],
    class_num: int | None = None,
    verbose: bool = True,
    file: str | os.PathLike[str] | None = None,
) -> str:
    """Return (and print, and write) FedLab's partition report: class shares per client.

    The format is FedLab's: a ``Class frequencies:`` line, then CSV with a header
    ``client,class0,...,Amount`` and one row per client, ``Client <id>,<share>,...,<size>``
    with shares to three decimals.

    Args:
        targets: Every sample's label.
        data_indices: ``{client id: sample indices}`` (a partitioner's ``client_dict``).
        class_num: The number of classes (``None``: ``max(targets) + 1``).
        verbose: Print the report.
        file: Also write it to this file (atomically).

    Returns:
        The report's text.
    """
    y = np.asarray(targets).astype(np.int64).ravel()
    classes = int(y.max()) + 1 if class_num is None else int(class_num)
    lines = ["Class frequencies:", ",".join(["client", *(f"class{k}" for k in range(classes))])
             + ",Amount"]  # fmt: skip
    for cid, indices in data_indices.items():
        labels = y[np.asarray(indices, dtype=np.int64)]
        size = len(labels)
        counts = np.bincount(labels, minlength=classes)[:classes]
        shares = counts / size if size else np.zeros(classes)
        lines.append(f"Client {int(cid):4d}," + ",".join(f"{s:.3f}" for s in shares) + f",{size}")
    text = "\n".join(lines) + "\n"
    if verbose:
        print(text, end="")
    if file is not None:
        atomic_write_text(file, text)
    return text

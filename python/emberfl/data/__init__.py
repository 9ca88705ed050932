"""Data for federated simulations: partitioners, offline data sets and partition reports.

* :mod:`emberfl.data.partition`: split a data set among clients (IID, Dirichlet label skew,
  shards, label quantity, ...), deterministically from a seed.
* :mod:`emberfl.data.datasets`: data sets as tensors, two of which need no download
  (``"digits"`` and ``"synthetic-cifar10"``).
* :mod:`emberfl.data.report`: per-client class counts, CSV, heatmap and statistics.

Example:
    >>> from emberfl.data import class_counts, load_dataset, partition, partition_stats
    >>> ds = load_dataset("digits", seed=0)
    >>> parts = partition(ds.train_y, 10, method="dirichlet", seed=0, alpha=0.5)
    >>> stats = partition_stats(class_counts(ds.train_y, parts, ds.num_classes))
    >>> stats["num_samples"] == ds.num_train
    True
"""

from __future__ import annotations

from emberfl.data.datasets import (
    DATASET_NAMES,
    FLDataset,
    fcube,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits_dataset,
    load_fashion_mnist,
    load_mnist,
    synthetic_cifar10,
    synthetic_fedprox,
)
from emberfl.data.partition import (
    PARTITION_METHODS,
    Partition,
    client_dirichlet_partition,
    dirichlet_partition,
    dirichlet_sizes,
    iid_dirichlet_partition,
    iid_lognormal_partition,
    iid_partition,
    label_quantity_partition,
    lognormal_sizes,
    partition,
    shards_partition,
)
from emberfl.data.report import (
    class_counts,
    partition_stats,
    plot_partition_heatmap,
    read_partition_csv,
    write_partition_csv,
)

__all__ = [
    "DATASET_NAMES",
    "PARTITION_METHODS",
    "FLDataset",
    "Partition",
    "class_counts",
    "client_dirichlet_partition",
    "dirichlet_partition",
    "dirichlet_sizes",
    "iid_dirichlet_partition",
    "iid_lognormal_partition",
    "iid_partition",
    "label_quantity_partition",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "lognormal_sizes",
    "partition",
    "partition_stats",
    "plot_partition_heatmap",
    "read_partition_csv",
    "shards_partition",
    "synthetic_cifar10",
    "synthetic_fedprox",
    "fcube",
    "write_partition_csv",
]

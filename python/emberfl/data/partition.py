"""Partitioners: split a data set's samples among federated clients.

Every partitioner is a deterministic function of its arguments and ``seed``: it draws all its
randomness from ``emberfl.rng.numpy_generator(seed, purpose=Purpose.PARTITION)`` and never
touches numpy's (or Python's, or torch's) global random state. Each returns a
:class:`Partition` in which every sample belongs to exactly one client: client sizes add up to
the data set size, nothing is silently dropped, and every bounded search gives up with a
:class:`~emberfl.errors.PartitionError` saying which argument to change.

The methods are those of FedLab and flwr-datasets:

========================  ==========================================  ===========================
``method`` name           function                                    main options
========================  ==========================================  ===========================
``"iid"``                 :func:`iid_partition`                       --
``"iid-lognormal"``       :func:`iid_lognormal_partition`             ``sigma``, ``min_size``
``"iid-dirichlet"``       :func:`iid_dirichlet_partition`             ``alpha``, ``min_size``
``"dirichlet"``           :func:`dirichlet_partition`                 ``alpha``, ``min_size``
``"shards"``              :func:`shards_partition`                    ``shards_per_client``
``"label-quantity"``      :func:`label_quantity_partition`            ``classes_per_client``
``"client-dirichlet"``    :func:`client_dirichlet_partition`          ``alpha``, ``client_sizes``
========================  ==========================================  ===========================

Example:
    >>> import numpy as np
    >>> from emberfl.data.partition import partition
    >>> labels = np.repeat(np.arange(10), 100)
    >>> parts = partition(labels, 20, method="dirichlet", seed=0, alpha=0.5, min_size=10)
    >>> int(parts.sizes.sum()), parts.num_clients
    (1000, 20)
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from emberfl.data._options import check_options, unknown_name
from emberfl.errors import PartitionError
from emberfl.rng import Purpose, numpy_generator

__all__ = [
    "PARTITION_METHODS",
    "IndexArray",
    "Partition",
    "client_dirichlet_partition",
    "dirichlet_partition",
    "dirichlet_sizes",
    "iid_dirichlet_partition",
    "iid_lognormal_partition",
    "iid_partition",
    "label_quantity_partition",
    "lognormal_sizes",
    "partition",
    "shards_partition",
]

IndexArray = npt.NDArray[np.int64]
"""A 1-D array of int64 sample indices (or per-client counts)."""


@dataclass(frozen=True, eq=False)
class Partition:
    """An assignment of every sample of a data set to exactly one client.

    Construction checks the invariant: the index arrays are disjoint and together cover
    ``0..num_samples-1``. Each array is stored sorted ascending and read-only.

    Attributes:
        client_indices: One int64 array of sample indices per client, ascending.
        num_samples: The size of the partitioned data set.

    Raises:
        PartitionError: On construction, if an index is out of range, appears twice, or a
            sample is missing.
    """

    client_indices: tuple[IndexArray, ...]
    num_samples: int

    def __post_init__(self) -> None:
        """Normalise the arrays (int64, sorted, read-only) and check the invariant."""
        arrays: list[IndexArray] = []
        for cid, raw in enumerate(self.client_indices):
            arr = np.asarray(raw)
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise PartitionError(
                    f"client {cid}: indices must be a 1-D integer array, "
                    f"got dtype {arr.dtype} and shape {arr.shape}"
                )
            arr = np.sort(arr.astype(np.int64, copy=False))
            arr.setflags(write=False)
            arrays.append(arr)
        object.__setattr__(self, "client_indices", tuple(arrays))
        n = int(self.num_samples)
        object.__setattr__(self, "num_samples", n)
        flat = np.concatenate(arrays) if arrays else np.empty(0, np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            bad = int(flat[(flat < 0) | (flat >= n)][0])
            raise PartitionError(f"sample index {bad} is outside 0..{n - 1}")
        hits = np.bincount(flat, minlength=n)
        if hits.size and hits.max() > 1:
            dup = int(np.argmax(hits > 1))
            raise PartitionError(f"sample {dup} is assigned to {int(hits[dup])} clients")
        if flat.size != n:
            missing = int(np.argmax(hits == 0))
            raise PartitionError(
                f"sample {missing} is assigned to no client "
                f"({n - flat.size} of {n} samples unassigned)"
            )

    @classmethod
    def from_owner(cls, owner: npt.ArrayLike, num_clients: int) -> Partition:
        """Build a partition from the client id of every sample.

        Args:
            owner: ``owner[i]`` is the client that holds sample ``i``; values in
                ``0..num_clients-1``.
            num_clients: The number of clients (clients no sample names get no samples).

        Returns:
            The partition.

        Raises:
            PartitionError: If ``num_clients < 1`` or an owner id is outside
                ``0..num_clients-1``.
        """
        if num_clients < 1:
            raise PartitionError(f"num_clients must be at least 1, got {num_clients}")
        own = np.asarray(owner).astype(np.int64, copy=False).ravel()
        if own.size and (own.min() < 0 or own.max() >= num_clients):
            raise PartitionError(f"owner ids must lie in 0..{num_clients - 1}")
        order = np.argsort(own, kind="stable").astype(np.int64, copy=False)
        sizes = np.bincount(own, minlength=num_clients)
        parts = np.split(order, np.cumsum(sizes)[:-1])
        return cls(tuple(parts), own.size)

    @property
    def num_clients(self) -> int:
        """The number of clients."""
        return len(self.client_indices)

    @property
    def sizes(self) -> IndexArray:
        """The number of samples of each client (sums to :attr:`num_samples`)."""
        return np.array([a.size for a in self.client_indices], dtype=np.int64)

    def owner(self) -> IndexArray:
        """Return the client id of every sample (the inverse of :meth:`from_owner`)."""
        own = np.empty(self.num_samples, dtype=np.int64)
        for cid, idx in enumerate(self.client_indices):
            own[idx] = cid
        return own

    def __len__(self) -> int:
        """Return the number of clients."""
        return len(self.client_indices)

    def __getitem__(self, cid: int) -> IndexArray:
        """Return the sorted sample indices of client ``cid``."""
        return self.client_indices[cid]

    def __iter__(self) -> Iterator[IndexArray]:
        """Iterate over the clients' index arrays in client order."""
        return iter(self.client_indices)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _as_labels(labels: npt.ArrayLike) -> IndexArray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise PartitionError(f"labels must be a 1-D array of class ids, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise PartitionError(f"labels must be integer class ids, got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if y.size and int(y.min()) < 0:
        raise PartitionError(f"labels must be non-negative class ids, found {int(y.min())}")
    return y


def _num_samples(labels: npt.ArrayLike) -> int:
    shape = np.shape(labels)
    if len(shape) == 0:
        raise PartitionError("labels must be an array with one entry per sample, got a scalar")
    return int(shape[0])


def _check_clients(num_samples: int, num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer):
        raise PartitionError(f"num_clients must be an int, got {type(num_clients).__name__}")
    if num_clients <= 0:
        raise PartitionError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients > num_samples:
        raise PartitionError(
            f"cannot split {num_samples} samples among {num_clients} clients: "
            f"use at most {num_samples} clients"
        )


def _check_positive(name: str, value: float, hint: str) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise PartitionError(f"{name} must be a positive finite number, got {value}; {hint}")
    return v


def _check_min_size(num_samples: int, num_clients: int, min_size: int) -> int:
    m = int(min_size)
    if m < 0:
        raise PartitionError(f"min_size must be >= 0, got {min_size}")
    if m * num_clients > num_samples:
        raise PartitionError(
            f"cannot give each of {num_clients} clients min_size={m} samples out of "
            f"{num_samples}: lower min_size to at most {num_samples // num_clients} "
            f"or use fewer clients"
        )
    return m


_ALPHA_HINT = "smaller alpha means more skew (0.1 is strong, 100 is nearly IID)"


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _rng(seed: int) -> np.random.Generator:
    return numpy_generator(seed, purpose=Purpose.PARTITION)


def _balanced_sizes(total: int, parts: int) -> IndexArray:
    sizes = np.full(parts, total // parts, dtype=np.int64)
    sizes[: total % parts] += 1
    return sizes


def _apportion(total: int, weights: npt.NDArray[np.float64]) -> IndexArray:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    s = float(w.sum())
    if not (math.isfinite(s) and s > 0):
        w, s = np.ones_like(w), float(w.size)
    quota = w * (total / s)
    base = np.floor(quota).astype(np.int64)
    short = total - int(base.sum())
    if short > 0:
        order = np.argsort(-(quota - base), kind="stable")
        base[order[:short]] += 1
    elif short < 0:  # only through float rounding; take from the largest parts
        order = np.argsort(-base, kind="stable")
        base[order[:-short]] -= 1
    return base


def _sizes_from_weights(
    num_samples: int, weights: npt.NDArray[np.float64], min_size: int
) -> IndexArray:
    return min_size + _apportion(num_samples - min_size * weights.size, weights)


def _assign_by_sizes(sizes: IndexArray, rng: np.random.Generator) -> Partition:
    """Give client ``c`` a uniformly random set of ``sizes[c]`` samples."""
    n = int(sizes.sum())
    owner = np.empty(n, dtype=np.int64)
    owner[rng.permutation(n)] = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
    return Partition.from_owner(owner, sizes.size)


def _assign_by_counts(
    class_of: IndexArray, counts: npt.NDArray[np.int64], rng: np.random.Generator
) -> Partition:
    """Give client ``c`` ``counts[c, k]`` random samples of class ``k`` (dense class ids)."""
    num_clients, num_classes = counts.shape
    owner = np.empty(class_of.size, dtype=np.int64)
    by_class = np.argsort(class_of, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(class_of, minlength=num_classes))])
    clients = np.arange(num_clients, dtype=np.int64)
    for k in range(num_classes):
        members = rng.permutation(by_class[bounds[k] : bounds[k + 1]])
        owner[members] = np.repeat(clients, counts[:, k])
    return Partition.from_owner(owner, num_clients)


def _dense_classes(y: IndexArray) -> tuple[IndexArray, IndexArray]:
    """Return (dense class id of every sample, number of samples of each class)."""
    _, class_of = np.unique(y, return_inverse=True)
    class_of = class_of.astype(np.int64, copy=False).ravel()
    return class_of, np.bincount(class_of).astype(np.int64)


# --------------------------------------------------------------------------------------------
# IID
# --------------------------------------------------------------------------------------------


def iid_partition(num_samples: int, num_clients: int, *, seed: int) -> Partition:
    """Split uniformly at random into clients whose sizes differ by at most one.

    Args:
        num_samples: The data set size.
        num_clients: The number of clients.
        seed: The experiment seed.

    Returns:
        The partition.

    Raises:
        PartitionError: If ``num_clients`` is not in ``1..num_samples``.
    """
    _check_clients(num_samples, num_clients)
    return _assign_by_sizes(_balanced_sizes(num_samples, num_clients), _rng(seed))


def _lognormal_sizes(
    rng: np.random.Generator, num_samples: int, num_clients: int, sigma: float, min_size: int
) -> IndexArray:
    _check_clients(num_samples, num_clients)
    s = float(sigma)
    if not (math.isfinite(s) and s >= 0):
        raise PartitionError(
            f"sigma must be a finite number >= 0, got {sigma}; 0 gives equal sizes, "
            f"0.5 to 2 gives increasingly unequal ones"
        )
    m = _check_min_size(num_samples, num_clients, min_size)
    return _sizes_from_weights(num_samples, rng.lognormal(0.0, s, size=num_clients), m)


def _dirichlet_sizes(
    rng: np.random.Generator, num_samples: int, num_clients: int, alpha: float, min_size: int
) -> IndexArray:
    _check_clients(num_samples, num_clients)
    a = _check_positive("alpha", alpha, "smaller alpha means more unequal client sizes")
    m = _check_min_size(num_samples, num_clients, min_size)
    return _sizes_from_weights(num_samples, rng.dirichlet(np.full(num_clients, a)), m)


def lognormal_sizes(
    num_samples: int, num_clients: int, *, sigma: float, seed: int, min_size: int = 1
) -> IndexArray:
    """Draw unbalanced client sizes proportional to ``LogNormal(0, sigma)`` weights.

    Each client first gets ``min_size`` samples; the rest are shared in proportion to the
    weights, rounded so the sizes add up to ``num_samples`` exactly.

    Args:
        num_samples: The data set size.
        num_clients: The number of clients.
        sigma: The lognormal shape; 0 gives equal sizes, larger is more unequal.
        seed: The experiment seed.
        min_size: The smallest client size.

    Returns:
        An int64 array of ``num_clients`` sizes summing to ``num_samples``.

    Raises:
        PartitionError: For a negative ``sigma``, an unreachable ``min_size`` or a bad
            ``num_clients``.
    """
    return _lognormal_sizes(_rng(seed), num_samples, num_clients, sigma, min_size)


def dirichlet_sizes(
    num_samples: int, num_clients: int, *, alpha: float, seed: int, min_size: int = 1
) -> IndexArray:
    """Draw unbalanced client sizes proportional to a ``Dirichlet(alpha)`` over clients.

    Args:
        num_samples: The data set size.
        num_clients: The number of clients.
        alpha: The Dirichlet concentration; smaller is more unequal.
        seed: The experiment seed.
        min_size: The smallest client size.

    Returns:
        An int64 array of ``num_clients`` sizes summing to ``num_samples``.

    Raises:
        PartitionError: For ``alpha <= 0``, an unreachable ``min_size`` or a bad
            ``num_clients``.
    """
    return _dirichlet_sizes(_rng(seed), num_samples, num_clients, alpha, min_size)


def iid_lognormal_partition(
    num_samples: int, num_clients: int, *, sigma: float, seed: int, min_size: int = 1
) -> Partition:
    """Split uniformly at random into clients with lognormal sizes (see :func:`lognormal_sizes`).

    Args:
        num_samples: The data set size.
        num_clients: The number of clients.
        sigma: The lognormal shape; 0 gives equal sizes, larger is more unequal.
        seed: The experiment seed.
        min_size: The smallest client size.

    Returns:
        The partition.

    Raises:
        PartitionError: See :func:`lognormal_sizes`.
    """
    rng = _rng(seed)
    return _assign_by_sizes(_lognormal_sizes(rng, num_samples, num_clients, sigma, min_size), rng)


def iid_dirichlet_partition(
    num_samples: int, num_clients: int, *, alpha: float, seed: int, min_size: int = 1
) -> Partition:
    """Split uniformly at random into clients with Dirichlet sizes (see :func:`dirichlet_sizes`).

    Args:
        num_samples: The data set size.
        num_clients: The number of clients.
        alpha: The Dirichlet concentration over clients; smaller is more unequal.
        seed: The experiment seed.
        min_size: The smallest client size.

    Returns:
        The partition.

    Raises:
        PartitionError: See :func:`dirichlet_sizes`.
    """
    rng = _rng(seed)
    return _assign_by_sizes(_dirichlet_sizes(rng, num_samples, num_clients, alpha, min_size), rng)


# --------------------------------------------------------------------------------------------
# Label skew
# --------------------------------------------------------------------------------------------


def dirichlet_partition(
    labels: npt.ArrayLike,
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_retries: int = 1000,
) -> Partition:
    """Label skew: split each class among the clients in ``Dirichlet(alpha)`` proportions.

    The method of Yurochkin et al. (2019) / Hsu et al. (2019) as in FedLab's ``hetero_dir``:
    class by class, proportions are drawn from ``Dir(alpha)`` over clients, clients already
    holding ``num_samples / num_clients`` samples are skipped, and the class is cut accordingly.
    The whole draw is repeated until every client has ``min_size`` samples, at most
    ``max_retries`` times.

    Args:
        labels: The class id of every sample (non-negative ints).
        num_clients: The number of clients.
        alpha: The concentration; small (0.1) gives few classes per client, large (100)
            nearly IID.
        seed: The experiment seed.
        min_size: The smallest acceptable client size.
        max_retries: How many draws to try before giving up.

    Returns:
        The partition.

    Raises:
        PartitionError: For ``alpha <= 0``, a bad ``num_clients`` or ``min_size``, or when no
            draw met ``min_size`` within ``max_retries`` tries.
    """
    y = _as_labels(labels)
    n = y.size
    _check_clients(n, num_clients)
    a = _check_positive("alpha", alpha, _ALPHA_HINT)
    m = _check_min_size(n, num_clients, min_size)
    if int(max_retries) < 1:
        raise PartitionError(f"max_retries must be at least 1, got {max_retries}")
    class_of, class_sizes = _dense_classes(y)
    rng = _rng(seed)
    quota = n / num_clients
    concentration = np.full(num_clients, a)
    for _ in range(int(max_retries)):
        counts = np.zeros((num_clients, class_sizes.size), dtype=np.int64)
        sizes = np.zeros(num_clients, dtype=np.int64)
        for k, n_k in enumerate(class_sizes.tolist()):
            open_ = sizes < quota
            p = np.where(open_, rng.dirichlet(concentration), 0.0)
            total = float(p.sum())
            if not (math.isfinite(total) and total > 0):
                p, total = open_.astype(np.float64), float(open_.sum())
            cuts = np.minimum((np.cumsum(p / total) * n_k).astype(np.int64), n_k)
            cuts[-1] = n_k
            counts[:, k] = np.diff(cuts, prepend=0)
            sizes += counts[:, k]
        if int(sizes.min()) >= m:
            return _assign_by_counts(class_of, counts, rng)
    raise PartitionError(
        f"dirichlet partition found no split of {n} samples into {num_clients} clients with "
        f"at least min_size={m} samples each in {int(max_retries)} tries at alpha={a}: "
        f"raise alpha, lower min_size or use fewer clients"
    )


def _shard_sizes(class_sizes: IndexArray, num_shards: int) -> IndexArray:
    """Shard sizes along the label-sorted order; class-pure when there are enough shards."""
    num_classes = class_sizes.size
    if num_shards < num_classes:
        return _balanced_sizes(int(class_sizes.sum()), num_shards)
    # Give every class one shard, then each further shard to the class whose shards are
    # currently largest, so shard sizes stay as equal as class-pure shards allow.
    per_class = np.ones(num_classes, dtype=np.int64)
    heap = [(-float(n_k), k) for k, n_k in enumerate(class_sizes.tolist())]
    heapq.heapify(heap)
    for _ in range(num_shards - num_classes):
        _, k = heapq.heappop(heap)
        per_class[k] += 1
        heapq.heappush(heap, (-float(class_sizes[k]) / float(per_class[k]), k))
    return np.concatenate(
        [
            _balanced_sizes(int(n_k), int(s_k))
            for n_k, s_k in zip(class_sizes, per_class, strict=True)
        ]
    )


def shards_partition(
    labels: npt.ArrayLike, num_clients: int, *, shards_per_client: int, seed: int
) -> Partition:
    """Pathological label skew (McMahan et al., 2017): each client gets a few label shards.

    The samples are sorted by label (in random order within a class) and cut into
    ``num_clients * shards_per_client`` shards, which are dealt out at random,
    ``shards_per_client`` to each client. When there are at least as many shards as classes,
    cuts fall on class boundaries (shard sizes differ by as little as that allows), so each
    client holds at most ``shards_per_client`` classes; with fewer shards than classes, the
    shards are equal-size cuts that may span classes. Every sample lands in a shard.

    Args:
        labels: The class id of every sample (non-negative ints).
        num_clients: The number of clients.
        shards_per_client: How many shards each client gets.
        seed: The experiment seed.

    Returns:
        The partition.

    Raises:
        PartitionError: If ``shards_per_client < 1``, there are more shards than samples, or
            ``num_clients`` is bad.
    """
    y = _as_labels(labels)
    n = y.size
    _check_clients(n, num_clients)
    spc = int(shards_per_client)
    if spc < 1:
        raise PartitionError(f"shards_per_client must be at least 1, got {shards_per_client}")
    num_shards = num_clients * spc
    if num_shards > n:
        raise PartitionError(
            f"{num_clients} clients x {spc} shards = {num_shards} shards but only {n} samples: "
            f"use at most {n // num_clients} shards per client or fewer clients"
        )
    class_of, class_sizes = _dense_classes(y)
    rng = _rng(seed)
    shuffled = rng.permutation(n)
    label_sorted = shuffled[np.argsort(class_of[shuffled], kind="stable")]
    shard_owner = np.empty(num_shards, dtype=np.int64)
    shard_owner[rng.permutation(num_shards)] = np.arange(num_shards, dtype=np.int64) // spc
    owner = np.empty(n, dtype=np.int64)
    owner[label_sorted] = np.repeat(shard_owner, _shard_sizes(class_sizes, num_shards))
    return Partition.from_owner(owner, num_clients)


def label_quantity_partition(
    labels: npt.ArrayLike, num_clients: int, *, classes_per_client: int, seed: int
) -> Partition:
    """Quantity-based label skew (Li et al., 2022, ``#C=k``): ``k`` distinct classes per client.

    Each client is given ``classes_per_client`` distinct classes, chosen so that every class
    is owned by as equal a number of clients as possible (ties broken at random). Each class
    is then split evenly and at random among its owners. A client holds exactly ``k`` classes
    unless one of its classes has fewer samples than owners.

    Args:
        labels: The class id of every sample (non-negative ints).
        num_clients: The number of clients.
        classes_per_client: How many distinct classes each client gets.
        seed: The experiment seed.

    Returns:
        The partition.

    Raises:
        PartitionError: If ``classes_per_client`` exceeds the number of classes, the clients
            together cannot cover every class (``num_clients * k < num_classes``), or a client
            would end up with no samples.
    """
    y = _as_labels(labels)
    n = y.size
    _check_clients(n, num_clients)
    k = int(classes_per_client)
    class_of, class_sizes = _dense_classes(y)
    num_classes = class_sizes.size
    if not 1 <= k <= num_classes:
        raise PartitionError(
            f"classes_per_client must be in 1..{num_classes} (the number of classes in the "
            f"labels), got {classes_per_client}"
        )
    if num_clients * k < num_classes:
        raise PartitionError(
            f"{num_clients} clients x {k} classes cannot cover all {num_classes} classes, so "
            f"samples would be dropped: use at least {math.ceil(num_classes / k)} clients "
            f"or raise classes_per_client"
        )
    rng = _rng(seed)
    tiebreak = rng.random((num_clients, num_classes))
    owners_per_class = np.zeros(num_classes, dtype=np.int64)
    owns = np.zeros((num_clients, num_classes), dtype=bool)
    for c in range(num_clients):
        chosen = np.lexsort((tiebreak[c], owners_per_class))[:k]
        owns[c, chosen] = True
        owners_per_class[chosen] += 1
    counts = np.zeros((num_clients, num_classes), dtype=np.int64)
    for j in range(num_classes):
        owners = rng.permutation(np.flatnonzero(owns[:, j]))
        counts[owners, j] = _balanced_sizes(int(class_sizes[j]), owners.size)
    sizes = counts.sum(axis=1)
    if int(sizes.min()) == 0:
        empty = int(np.argmin(sizes))
        raise PartitionError(
            f"label-quantity: client {empty} gets no samples because its classes have fewer "
            f"samples than owners; use fewer clients or raise classes_per_client"
        )
    return _assign_by_counts(class_of, counts, rng)


def client_dirichlet_partition(
    labels: npt.ArrayLike,
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    client_sizes: Sequence[int] | npt.NDArray[np.integer[Any]] | None = None,
) -> Partition:
    """Client-inner Dirichlet skew (FedLab's ``client_inner_dirichlet_partition``).

    Client sizes are fixed (given, or balanced); each client draws its class mix
    ``p_c ~ Dir(alpha)`` and fills its quota with samples of class ``k`` in proportion to
    ``p_c[k]``, renormalised over the classes that still have samples left. Unlike FedLab's
    rejection loop, this runs in at most ``num_classes + 1`` vectorised rounds: each round
    every client requests its remaining quota by a multinomial draw, and an oversubscribed
    class is shared out by a multivariate hypergeometric draw, which exhausts it.

    Args:
        labels: The class id of every sample (non-negative ints).
        num_clients: The number of clients.
        alpha: The concentration of each client's class mix; smaller is more skewed.
        seed: The experiment seed.
        client_sizes: The size of each client, positive and summing to the number of samples
            (e.g. from :func:`lognormal_sizes`); ``None`` for balanced sizes.

    Returns:
        The partition.

    Raises:
        PartitionError: For ``alpha <= 0``, a bad ``num_clients``, or ``client_sizes`` of the
            wrong length, with a non-positive entry, or not summing to the number of samples.
    """
    y = _as_labels(labels)
    n = y.size
    _check_clients(n, num_clients)
    a = _check_positive("alpha", alpha, _ALPHA_HINT)
    if client_sizes is None:
        need = _balanced_sizes(n, num_clients)
    else:
        need = np.asarray(client_sizes).astype(np.int64).ravel()
        if need.size != num_clients:
            raise PartitionError(
                f"client_sizes has {need.size} entries but there are {num_clients} clients"
            )
        if need.size and int(need.min()) < 1:
            raise PartitionError(f"client_sizes must all be >= 1, found {int(need.min())}")
        if int(need.sum()) != n:
            raise PartitionError(
                f"client_sizes sum to {int(need.sum())} but there are {n} samples; "
                f"they must add up exactly"
            )
    class_of, left = _dense_classes(y)
    num_classes = left.size
    rng = _rng(seed)
    priors = rng.dirichlet(np.full(num_classes, a), size=num_clients)
    counts = np.zeros((num_clients, num_classes), dtype=np.int64)
    need = need.copy()
    while int(need.sum()) > 0:
        open_ = left > 0
        p = priors * open_
        row = p.sum(axis=1, keepdims=True)
        dead = ~(row[:, 0] > 1e-12)  # all of a client's mass is on exhausted classes
        p[dead] = open_
        p /= p.sum(axis=1, keepdims=True)
        want = rng.multinomial(need, p).astype(np.int64)
        demand = want.sum(axis=0)
        for j in np.flatnonzero(demand > left).tolist():
            want[:, j] = rng.multivariate_hypergeometric(want[:, j], int(left[j]))
        counts += want
        need -= want.sum(axis=1)
        left -= want.sum(axis=0)
    return _assign_by_counts(class_of, counts, rng)


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------

_METHODS: dict[str, Callable[..., Partition]] = {
    "iid": iid_partition,
    "iid-lognormal": iid_lognormal_partition,
    "iid-dirichlet": iid_dirichlet_partition,
    "dirichlet": dirichlet_partition,
    "shards": shards_partition,
    "label-quantity": label_quantity_partition,
    "client-dirichlet": client_dirichlet_partition,
}
_SIZE_ONLY = frozenset({"iid", "iid-lognormal", "iid-dirichlet"})

PARTITION_METHODS: tuple[str, ...] = tuple(_METHODS)
"""The ``method`` names :func:`partition` accepts."""


def partition(
    labels: npt.ArrayLike, num_clients: int, *, method: str, seed: int, **params: Any
) -> Partition:
    """Partition a data set by method name (the entry point of the CLI).

    Args:
        labels: The class id of every sample; the IID methods only use its length.
        num_clients: The number of clients.
        method: One of :data:`PARTITION_METHODS`.
        seed: The experiment seed.
        **params: The method's options, e.g. ``alpha=0.5`` for ``"dirichlet"``; see the
            function each method names in the module docstring.

    Returns:
        The partition.

    Raises:
        ConfigError: For an unknown method, an option the method does not take, or a
            missing required option.
        PartitionError: When the partition cannot be made with these options.
    """
    func = _METHODS.get(method)
    if func is None:
        raise unknown_name("partition method", method, PARTITION_METHODS)
    check_options(
        func, params, what=f"partition method {method!r}", positional=2, exclude=("seed",)
    )
    data: npt.ArrayLike | int = _num_samples(labels) if method in _SIZE_ONLY else labels
    return func(data, num_clients, seed=seed, **params)

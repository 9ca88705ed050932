"""Partition reports: per-client class counts, a CSV file, a heatmap and summary statistics.

A report starts from :func:`class_counts`, a ``clients x classes`` matrix; the other
functions take that matrix, so they work for any partition, however it was made.

Example:
    >>> import numpy as np
    >>> from emberfl.data.partition import partition
    >>> from emberfl.data.report import class_counts, partition_stats
    >>> labels = np.repeat(np.arange(10), 50)
    >>> parts = partition(labels, 10, method="shards", seed=0, shards_per_client=2)
    >>> counts = class_counts(labels, parts, 10)
    >>> counts.shape, int(counts.sum()), partition_stats(counts)["max_classes_per_client"]
    ((10, 10), 500, 2.0)
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from emberfl.data.partition import Partition
from emberfl.errors import PartitionError

__all__ = [
    "class_counts",
    "partition_stats",
    "plot_partition_heatmap",
    "read_partition_csv",
    "write_partition_csv",
]

CountMatrix = npt.NDArray[np.int64]
PathArg = str | os.PathLike[str]


def class_counts(
    labels: npt.ArrayLike,
    partition: Partition | Sequence[npt.ArrayLike],
    num_classes: int,
) -> CountMatrix:
    """Count each client's samples of each class.

    Args:
        labels: The class id of every sample, in ``0..num_classes-1``.
        partition: A :class:`Partition`, or one array of sample indices per client.
        num_classes: The number of classes (columns), including classes no client holds.

    Returns:
        An int64 matrix of shape ``(num_clients, num_classes)``.

    Raises:
        PartitionError: If a label is outside ``0..num_classes-1`` or an index is out of range.
    """
    y = np.asarray(labels).astype(np.int64, copy=False).ravel()
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise PartitionError(
            f"labels must lie in 0..{num_classes - 1} for num_classes={num_classes}, "
            f"found {int(y.min())}..{int(y.max())}"
        )
    clients = list(partition)
    counts = np.zeros((len(clients), num_classes), dtype=np.int64)
    for cid, raw in enumerate(clients):
        idx = np.asarray(raw).astype(np.int64, copy=False).ravel()
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= y.size):
            raise PartitionError(f"client {cid} has a sample index outside 0..{y.size - 1}")
        counts[cid] = np.bincount(y[idx], minlength=num_classes)
    return counts


def _as_counts(counts: npt.ArrayLike) -> CountMatrix:
    c = np.asarray(counts)
    if c.ndim != 2:
        raise PartitionError(f"counts must be a clients x classes matrix, got shape {c.shape}")
    c = c.astype(np.int64, copy=False)
    if c.size and int(c.min()) < 0:
        raise PartitionError("counts must be non-negative")
    return c


def write_partition_csv(path: PathArg, counts: npt.ArrayLike) -> None:
    """Write the count matrix as CSV: ``client,class_0,...,class_{C-1},total``, one row a client.

    Args:
        path: The file to write (overwritten).
        counts: The ``clients x classes`` matrix from :func:`class_counts`.

    Raises:
        PartitionError: If ``counts`` is not a non-negative 2-D matrix.
    """
    c = _as_counts(counts)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["client", *(f"class_{k}" for k in range(c.shape[1])), "total"])
        for cid, row in enumerate(c.tolist()):
            writer.writerow([cid, *row, sum(row)])


def read_partition_csv(path: PathArg) -> CountMatrix:
    """Read a count matrix written by :func:`write_partition_csv`.

    Args:
        path: The CSV file.

    Returns:
        The ``clients x classes`` int64 matrix (the ``client`` and ``total`` columns dropped,
        rows in client order).

    Raises:
        PartitionError: If the header or a row's total does not match the format.
    """
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise PartitionError(f"{path}: empty file, expected a header row")
    header = rows[0]
    num_classes = len(header) - 2
    expected = ["client", *(f"class_{k}" for k in range(num_classes)), "total"]
    if num_classes < 0 or header != expected:
        raise PartitionError(f"{path}: header is not client,class_0,...,class_{{C-1}},total")
    data = np.array([[int(v) for v in r] for r in rows[1:]], dtype=np.int64).reshape(
        -1, num_classes + 2
    )
    if not np.array_equal(data[:, 0], np.arange(data.shape[0])):
        raise PartitionError(f"{path}: the client column must be 0, 1, 2, ... in order")
    counts = data[:, 1:-1]
    if not np.array_equal(counts.sum(axis=1), data[:, -1]):
        raise PartitionError(f"{path}: a row's total is not the sum of its class counts")
    return np.ascontiguousarray(counts)


def partition_stats(counts: npt.ArrayLike) -> dict[str, float]:
    """Summarise a count matrix.

    Args:
        counts: The ``clients x classes`` matrix from :func:`class_counts`.

    Returns:
        A dict with ``num_clients``, ``num_classes``, ``num_samples``; client sizes
        ``min_size``, ``max_size``, ``mean_size``, ``std_size`` (population std),
        ``empty_clients``; classes held per client ``min_classes_per_client``,
        ``max_classes_per_client``, ``mean_classes_per_client``; and ``mean_tv_distance``,
        the mean total-variation distance between a client's label distribution and the
        overall one (0 for IID, near 1 for extreme skew; empty clients are skipped).

    Raises:
        PartitionError: If ``counts`` is not a non-negative 2-D matrix with at least one client.
    """
    c = _as_counts(counts)
    if c.shape[0] == 0:
        raise PartitionError("counts has no clients")
    sizes = c.sum(axis=1)
    held = (c > 0).sum(axis=1)
    total = int(sizes.sum())
    nonempty = sizes > 0
    if total and nonempty.any():
        overall = c.sum(axis=0) / total
        dist = c[nonempty] / sizes[nonempty, None]
        tv = float(0.5 * np.abs(dist - overall).sum(axis=1).mean())
    else:
        tv = 0.0
    return {
        "num_clients": float(c.shape[0]),
        "num_classes": float(c.shape[1]),
        "num_samples": float(total),
        "min_size": float(sizes.min()),
        "max_size": float(sizes.max()),
        "mean_size": float(sizes.mean()),
        "std_size": float(sizes.std()),
        "empty_clients": float((~nonempty).sum()),
        "min_classes_per_client": float(held.min()),
        "max_classes_per_client": float(held.max()),
        "mean_classes_per_client": float(held.mean()),
        "mean_tv_distance": tv,
    }


def plot_partition_heatmap(
    path: PathArg, counts: npt.ArrayLike, *, title: str | None = None, dpi: int = 120
) -> None:
    """Draw the partition as a PNG: a classes x clients heatmap under a bar chart of sizes.

    Each heatmap cell is the share of a client's samples in a class, so clients of different
    sizes compare (the colour scale ends at the largest share); the client sizes are drawn
    above. The figure widens with the number of clients up to a cap and ticks are thinned, so
    it stays readable from 10 to 1000 clients. It is drawn on matplotlib's Agg canvas
    directly: pyplot and the global backend are not touched.

    Args:
        path: The PNG file to write (overwritten).
        counts: The ``clients x classes`` matrix from :func:`class_counts`.
        title: A title for the figure; a summary of the shape by default.
        dpi: The resolution.

    Raises:
        PartitionError: If ``counts`` is not a non-negative 2-D matrix with at least one
            client and one class.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    c = _as_counts(counts)
    num_clients, num_classes = c.shape
    if num_clients == 0 or num_classes == 0:
        raise PartitionError(f"cannot plot an empty count matrix of shape {c.shape}")
    sizes = c.sum(axis=1)
    share = c / np.maximum(sizes, 1)[:, None]

    width = float(np.clip(3.0 + 0.12 * num_clients, 6.0, 16.0))
    height = float(np.clip(2.5 + 0.22 * num_classes, 4.0, 12.0))
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=(1, 3), width_ratios=(40, 1))
    bars = fig.add_subplot(grid[0, 0])
    heat = fig.add_subplot(grid[1, 0], sharex=bars)
    bar_cax = fig.add_subplot(grid[0, 1])
    bar_cax.set_axis_off()
    cax = fig.add_subplot(grid[1, 1])

    xs = np.arange(num_clients)
    bars.bar(xs, sizes, width=1.0 if num_clients > 50 else 0.8, color="tab:blue", linewidth=0)
    bars.set_ylabel("samples")
    bars.tick_params(labelbottom=False)
    bars.set_xlim(-0.5, num_clients - 0.5)

    image = heat.imshow(
        share.T,
        aspect="auto",
        interpolation="nearest",
        origin="lower",
        cmap="viridis",
        vmin=0.0,
        vmax=float(share.max()) or 1.0,
        extent=(-0.5, num_clients - 0.5, -0.5, num_classes - 0.5),
    )
    heat.set_xlabel("client")
    heat.set_ylabel("class")
    heat.xaxis.set_major_locator(MaxNLocator(nbins=min(num_clients, 20), integer=True))
    heat.yaxis.set_major_locator(MaxNLocator(nbins=min(num_classes, 25), integer=True))
    fig.colorbar(image, cax=cax, label="share of client's samples")
    if num_clients * num_classes <= 300:
        for i, j in zip(*np.nonzero(c), strict=True):
            heat.text(
                i,
                j,
                str(c[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if share[i, j] < 0.5 else "black",
            )
    fig.suptitle(
        title
        if title is not None
        else f"{num_clients} clients, {num_classes} classes, {int(sizes.sum())} samples"
    )
    fig.savefig(os.fspath(path), format="png")

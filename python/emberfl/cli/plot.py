"""``emberfl plot RUN_DIR``: accuracy and loss curves and the partition heatmap, as PNG.

Figures are drawn on matplotlib's Agg canvas directly; pyplot and the global backend are
never touched, so plotting works without a display and inside other programs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emberfl.atomic import name_os_errors
from emberfl.cli.config import unreadable_reason
from emberfl.cli.metrics import read_metrics
from emberfl.cli.run import (
    CONFIG_FILE,
    PARTITION_CSV,
    STALENESS_CSV,
    file_in_the_way,
    read_staleness,
)
from emberfl.data import plot_partition_heatmap, read_partition_csv
from emberfl.errors import CheckpointError, ConfigError, EmberflError

__all__ = [
    "ACCURACY_PNG",
    "ACCURACY_TIME_PNG",
    "LOSS_PNG",
    "PARTITION_PNG",
    "STALENESS_PNG",
    "plot_curves",
    "plot_run",
    "plot_staleness",
]

ACCURACY_PNG = "accuracy.png"
"""Train and test accuracy per round."""
LOSS_PNG = "loss.png"
"""Train and test loss per round."""
ACCURACY_TIME_PNG = "accuracy_time.png"
"""Asynchronous runs: test accuracy against the virtual clock."""
STALENESS_PNG = "staleness.png"
"""Asynchronous runs: the histogram of the reports' staleness."""
PARTITION_PNG = "partition.png"
"""The partition heatmap."""


def plot_curves(
    path: str | os.PathLike[str],
    rows: Sequence[dict[str, Any]],
    *,
    keys: Sequence[tuple[str, str]],
    ylabel: str,
    title: str,
    percent: bool = False,
    x: tuple[str, str] = ("round", "round"),
    dpi: int = 120,
) -> None:
    """Draw one line per metric against the round number and save it as PNG.

    Args:
        path: The PNG file (overwritten).
        rows: Metrics rows (see :mod:`emberfl.cli.metrics`).
        keys: ``(metric key, legend label)`` pairs.
        ylabel: The y-axis label.
        title: The figure title.
        percent: Show values as percentages.
        x: The x axis's ``(metric key, label)`` (the round number by default).
        dpi: The resolution.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.0), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    scale = 100.0 if percent else 1.0
    x_key, x_label = x
    for key, label in keys:
        points = [
            (row[x_key], scale * row[key])
            for row in rows
            if isinstance(row.get(key), int | float) and isinstance(row.get(x_key), int | float)
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=label)
    ax.set_xlabel(x_label)
    ax.set_ylabel(ylabel)
    if x_key == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    ax.set_title(title)
    with name_os_errors(path):
        fig.savefig(os.fspath(path), format="png")


def plot_staleness(
    path: str | os.PathLike[str], counts: Sequence[tuple[int, int]], *, title: str, dpi: int = 120
) -> None:
    """Draw the reports per staleness as a bar chart and save it as PNG.

    Args:
        path: The PNG file (overwritten).
        counts: ``(staleness, reports)`` pairs.
        title: The figure title.
        dpi: The resolution.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.0), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar([s for s, _ in counts], [n for _, n in counts], width=0.8)
    ax.set_xlabel("staleness (server updates since the client started)")
    ax.set_ylabel("reports")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title)
    with name_os_errors(path):
        fig.savefig(os.fspath(path), format="png")


def plot_run(
    run_dir: str | os.PathLike[str], *, out_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Render a run's curves and partition heatmap.

    Args:
        run_dir: The run directory.
        out_dir: Where to write the PNGs (``run_dir`` by default; created if needed).

    Returns:
        The files written: ``accuracy.png`` and ``loss.png`` when the run has metrics,
        ``partition.png`` when it has ``partition.csv``; for asynchronous runs also
        ``accuracy_time.png`` (test accuracy against the virtual clock) and
        ``staleness.png`` (from ``staleness.csv``).

    Raises:
        ConfigError: If ``run_dir`` is not a run directory or ``out_dir`` cannot be created.
        CheckpointError: If ``metrics.jsonl`` or ``partition.csv`` is damaged.
        OSError: If a PNG cannot be written (``filename`` names it).
    """
    run = Path(run_dir)
    if not (run / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{run} is not an emberfl run directory (no {CONFIG_FILE}); pass a folder that "
            "`emberfl run` wrote"
        )
    dest = Path(out_dir) if out_dir is not None else run
    blocker = file_in_the_way(dest)
    if blocker is not None:
        raise ConfigError(
            f"cannot create {dest}: {blocker} is a file, not a folder; choose another --out-dir"
        )
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create {dest}: {exc.strerror or exc}; choose another --out-dir"
        ) from None
    written: list[Path] = []
    rows = read_metrics(run)
    name = run.resolve().name
    if rows:
        plot_curves(
            dest / ACCURACY_PNG,
            rows,
            keys=[("train_accuracy", "train"), ("test_accuracy", "test")],
            ylabel="accuracy (%)",
            title=f"{name}: accuracy of the global model",
            percent=True,
        )
        plot_curves(
            dest / LOSS_PNG,
            rows,
            keys=[("train_loss", "train"), ("test_loss", "test")],
            ylabel="cross-entropy loss",
            title=f"{name}: loss of the global model",
        )
        written += [dest / ACCURACY_PNG, dest / LOSS_PNG]
        if any(isinstance(row.get("virtual_time_s"), int | float) for row in rows):
            plot_curves(
                dest / ACCURACY_TIME_PNG,
                rows,
                keys=[("test_accuracy", "test")],
                ylabel="accuracy (%)",
                title=f"{name}: accuracy against virtual time",
                percent=True,
                x=("virtual_time_s", "virtual time (s)"),
            )
            written.append(dest / ACCURACY_TIME_PNG)
    staleness_path = run / STALENESS_CSV
    if staleness_path.is_file():
        try:
            staleness = read_staleness(staleness_path)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"cannot read {staleness_path}: {unreadable_reason(exc)}; run `emberfl run "
                f"--resume {run}` to rewrite it"
            ) from None
        plot_staleness(dest / STALENESS_PNG, staleness, title=f"{name}: staleness of the reports")
        written.append(dest / STALENESS_PNG)
    csv_path = run / PARTITION_CSV
    if csv_path.is_file():
        try:
            counts = read_partition_csv(csv_path)
        except (EmberflError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read {csv_path}: {unreadable_reason(exc)}; delete it and run "
                f"`emberfl run --resume {run}` to rewrite it"
            ) from None
        with name_os_errors(dest / PARTITION_PNG):
            plot_partition_heatmap(dest / PARTITION_PNG, counts)
        written.append(dest / PARTITION_PNG)
    return written

"""``emberfl report RUN_DIR``: a run's configuration, summary table and partition statistics,
as plain text."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from emberfl.cli.checkpoint import load_checkpoint
from emberfl.cli.config import unreadable_reason
from emberfl.cli.metrics import format_summary, read_metrics
from emberfl.cli.run import (
    CONFIG_FILE,
    FINAL_MODEL_FILE,
    PARTITION_CSV,
    STALENESS_CSV,
    read_staleness,
)
from emberfl.data import partition_stats, read_partition_csv
from emberfl.errors import CheckpointError, ConfigError, EmberflError

__all__ = ["MAX_CLIENT_LINES", "format_report"]

MAX_CLIENT_LINES = 20
"""The clients the report lists one by one (the rest are in ``partition.csv``)."""

_STAT_LABELS = (
    ("num_clients", "clients", "{:.0f}"),
    ("num_classes", "classes", "{:.0f}"),
    ("num_samples", "samples", "{:.0f}"),
    ("min_size", "client size, min", "{:.0f}"),
    ("max_size", "client size, max", "{:.0f}"),
    ("mean_size", "client size, mean", "{:.1f}"),
    ("std_size", "client size, std", "{:.1f}"),
    ("empty_clients", "empty clients", "{:.0f}"),
    ("min_classes_per_client", "classes per client, min", "{:.0f}"),
    ("max_classes_per_client", "classes per client, max", "{:.0f}"),
    ("mean_classes_per_client", "classes per client, mean", "{:.2f}"),
    ("mean_tv_distance", "label skew (mean TV distance, 0 = IID)", "{:.3f}"),
)


def _status(run: Path, rounds_done: int) -> str:
    if (run / FINAL_MODEL_FILE).is_file():
        return f"complete ({rounds_done} rounds)"
    try:
        checkpoint = load_checkpoint(run)
    except CheckpointError as exc:
        return f"incomplete; checkpoint unusable: {exc}"
    if checkpoint is None:
        return f"incomplete ({rounds_done} rounds logged, no checkpoint)"
    return (
        f"incomplete ({rounds_done} rounds logged, checkpoint at round {checkpoint.round}); "
        f"continue with: emberfl run --resume {run}"
    )


def format_report(run_dir: str | os.PathLike[str]) -> str:
    """Return the report of a run directory.

    Args:
        run_dir: The run directory.

    Returns:
        The configuration (as TOML), the status, the summary table, the partition
        statistics with each client's size and largest classes (the first
        :data:`MAX_CLIENT_LINES`), and, for asynchronous runs, the staleness histogram, as
        text.

    Raises:
        ConfigError: If ``run_dir`` is not a run directory or its ``config.toml`` is not
            UTF-8 text.
        CheckpointError: If ``metrics.jsonl`` is damaged.
    """
    run = Path(run_dir)
    config_path = run / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(
            f"{run} is not an emberfl run directory (no {CONFIG_FILE}); pass a folder that "
            "`emberfl run` wrote"
        )
    try:
        config_text = config_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {config_path} is {unreadable_reason(exc)}; restore it as UTF-8"
        ) from None
    rows = read_metrics(run)
    config_lines = [
        line for line in config_text.splitlines() if line.strip() and not line.startswith("#")
    ]
    parts = [
        f"run: {run}",
        f"status: {_status(run, len(rows))}",
        "",
        "configuration",
        *(f"  {line}" for line in config_lines),
        "",
        "summary",
        *(f"  {line}" for line in format_summary(rows).splitlines()),
        "",
        "partition",
    ]
    csv_path = run / PARTITION_CSV
    try:
        stats = partition_stats(read_partition_csv(csv_path))
    except FileNotFoundError:
        parts.append(f"  no {PARTITION_CSV}")
    except (EmberflError, ValueError, OSError) as exc:
        parts.append(f"  {csv_path} is unreadable: {unreadable_reason(exc)}")
    else:
        width = max(len(label) for _, label, _ in _STAT_LABELS)
        parts += [
            f"  {label.ljust(width)}  {fmt.format(stats[key])}"
            for key, label, fmt in _STAT_LABELS
            if key in stats
        ]
        parts += ["", "clients (size: the largest classes, class:samples)"]
        parts += _client_lines(read_partition_csv(csv_path))
    staleness_path = run / STALENESS_CSV
    if staleness_path.is_file():
        parts += ["", "staleness (reports per server updates since the client started)"]
        try:
            parts += _histogram(read_staleness(staleness_path))
        except (ValueError, OSError) as exc:
            parts.append(f"  {staleness_path} is unreadable: {unreadable_reason(exc)}")
    return "\n".join(parts)


def _client_lines(counts: Any, shown: int = MAX_CLIENT_LINES, top: int = 4) -> list[str]:
    """One line per client: its size and its ``top`` largest classes."""
    rows = []
    for cid, row in enumerate(counts[:shown]):
        size = int(row.sum())
        order = sorted(range(len(row)), key=lambda k: (-int(row[k]), k))[:top]
        classes = " ".join(f"{k}:{int(row[k])}" for k in order if row[k])
        rows.append(f"  {cid:>5}  {size:>7}  {classes}")
    if len(counts) > shown:
        rows.append(f"  ... {len(counts) - shown} more clients (all of them in {PARTITION_CSV})")
    return rows


def _histogram(counts: list[tuple[int, int]], width: int = 40) -> list[str]:
    """Text bars, one per staleness, scaled to the largest count; mean and max below."""
    total = sum(n for _, n in counts)
    if total == 0:
        return ["  no report yet"]
    top = max(n for _, n in counts)
    digits = len(str(max(s for s, _ in counts)))
    rows = [
        f"  {s:>{digits}}  {'#' * max(1 if n else 0, round(width * n / top)):<{width}}  {n}"
        for s, n in counts
    ]
    mean = sum(s * n for s, n in counts) / total
    biggest = max(s for s, n in counts if n)
    return [*rows, f"  {total} reports, mean staleness {mean:.2f}, max {biggest}"]

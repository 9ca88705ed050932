"""Per-round metrics of a run: ``metrics.jsonl``, ``metrics.csv`` and the summary table.

Each completed round adds one row with the keys of :data:`METRIC_FIELDS`:

* ``round``: rounds completed (1 for the first);
* ``wall_time_s``: seconds since the run started (time spent killed before a resume
  excluded); ``round_time_s``: this round's seconds, training and evaluation included;
* ``num_clients``: clients that trained in the round;
* ``train_loss``, ``train_accuracy``: the global model after the round, on the clients'
  training data (at most :data:`TRAIN_EVAL_SAMPLES` samples, evenly spaced);
* ``test_loss``, ``test_accuracy``: the global model after the round, on the test split;
* ``client_loss``: the clients' own mean training loss during the round (weighted by
  their sample counts; ``null`` if no client took a step);
* ``uplink_bytes``, ``downlink_bytes``: what the round's clients sent (their encoded
  payloads with ``compression``, else float32 streams) and received (the broadcast);
* ``client_test_accuracy``: with ``client_test_fraction > 0``, the global model on every
  client's own test split (all held-out samples together); absent otherwise;
* ``personal_test_accuracy``: for personalised algorithms (``ditto``, ``fedbn``,
  ``ifca``, ``perfedavg``), each client's own model (for ``perfedavg``: the global model
  after one adaptation step on a batch of its training data) on its own test split (all
  held-out samples together; a client that has not trained yet is judged with the global
  model);
* ``dp_epsilon``: with ``dp = "central"``, the client-level privacy spent after this
  round at ``dp_delta`` (:func:`emberfl.privacy.epsilon`); with ``dp = "local"``, the
  record-level privacy of the client that has spent the most
  (:func:`emberfl.privacy.local_epsilon`); absent otherwise;
* ``dp_clip_norm``: with adaptive clipping, the bound the next round clips to;
* ``virtual_time_s``, ``mean_staleness``, ``max_staleness``: asynchronous algorithms
  (``fedasync``, ``fedbuff``), where a row is one server update: the virtual clock when it
  happened and the staleness (server updates since each client started) of the reports
  folded into it; ``num_clients`` counts those reports.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emberfl.atomic import append_text, atomic_write_text
from emberfl.cli.config import unreadable_reason
from emberfl.errors import CheckpointError

__all__ = [
    "CSV_FILE",
    "JSONL_FILE",
    "METRIC_FIELDS",
    "OPTIONAL_FIELDS",
    "TRAIN_EVAL_SAMPLES",
    "MetricsLog",
    "format_summary",
    "read_metrics",
]

JSONL_FILE = "metrics.jsonl"
"""One JSON object per round."""
CSV_FILE = "metrics.csv"
"""The same rows as CSV."""
METRIC_FIELDS: tuple[str, ...] = (
    "round",
    "wall_time_s",
    "round_time_s",
    "num_clients",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "client_loss",
    "uplink_bytes",
    "downlink_bytes",
    "client_test_accuracy",
    "personal_test_accuracy",
    "dp_epsilon",
    "dp_clip_norm",
    "virtual_time_s",
    "mean_staleness",
    "max_staleness",
)
"""The keys of a metrics row, in CSV column order."""
OPTIONAL_FIELDS: frozenset[str] = frozenset(
    {
        "client_test_accuracy",
        "personal_test_accuracy",
        "dp_epsilon",
        "dp_clip_norm",
        "virtual_time_s",
        "mean_staleness",
        "max_staleness",
    }
)
"""Keys a row has only when clients hold test splits of their own, or with differential
privacy, or in asynchronous runs (empty CSV cells else)."""
TRAIN_EVAL_SAMPLES = 10_000
"""The most training samples the global model is evaluated on after each round."""

Row = dict[str, Any]


def _csv_text(rows: Sequence[Row], *, header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


class MetricsLog:
    """Appends rows to ``metrics.jsonl`` and ``metrics.csv`` in a run directory.

    Attributes:
        run_dir: The run directory.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        """Create the log (no file is touched until :meth:`reset` or :meth:`append`).

        Args:
            run_dir: The run directory.
        """
        self.run_dir = Path(run_dir)

    def reset(self, rows: Sequence[Row]) -> None:
        """Rewrite both files with exactly ``rows`` (e.g. a checkpoint's, on resume).

        Args:
            rows: The rows so far.
        """
        atomic_write_text(
            self.run_dir / JSONL_FILE, "".join(json.dumps(row) + "\n" for row in rows)
        )
        atomic_write_text(self.run_dir / CSV_FILE, _csv_text(rows, header=True))

    def append(self, row: Row) -> None:
        """Append one round's row to both files (flushed, so a kill loses at most it).

        Args:
            row: The round's metrics.
        """
        append_text(self.run_dir / JSONL_FILE, json.dumps(row) + "\n")
        append_text(self.run_dir / CSV_FILE, _csv_text([row], header=False))


def read_metrics(run_dir: str | os.PathLike[str]) -> list[Row]:
    """Read ``metrics.jsonl`` of a run directory.

    A last line cut short by a kill is skipped.

    Args:
        run_dir: The run directory.

    Returns:
        The rows, in round order (empty if the file does not exist).

    Raises:
        CheckpointError: If the file is not UTF-8 text or a line other than the last is not
            valid JSON.
    """
    path = Path(run_dir) / JSONL_FILE
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise CheckpointError(
            f"{path} is {unreadable_reason(exc)}; `emberfl run --resume {Path(run_dir)}` "
            "rewrites it from the checkpoint"
        ) from None
    rows: list[Row] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise CheckpointError(f"{path}, line {i + 1}: not valid JSON") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _pick_rows(rows: Sequence[Row], max_rows: int) -> list[Row]:
    if len(rows) <= max_rows:
        return list(rows)
    step = (len(rows) - 1) / (max_rows - 1)
    picked = sorted({round(i * step) for i in range(max_rows)})
    return [rows[i] for i in picked]


def _fmt(value: Any, kind: str) -> str:
    if not isinstance(value, int | float):
        return "-"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "int":
        return str(int(value))
    if kind == "time":
        return f"{value:.1f}"
    return f"{value:.4f}"


def format_summary(rows: Sequence[Row], *, max_rows: int = 12) -> str:
    """Render metrics rows as a fixed-width table plus a one-line verdict.

    Long runs are thinned to ``max_rows`` evenly spaced rounds (first and last kept).

    Args:
        rows: Metrics rows.
        max_rows: The most table rows to show (at least 2).

    Returns:
        The table, or a note that no round has completed.
    """
    if not rows:
        return "no round completed yet"
    every: tuple[tuple[str, str, str], ...] = (
        ("round", "round", "int"),
        ("virtual s", "virtual_time_s", "time"),
        ("clients", "num_clients", "int"),
        ("train loss", "train_loss", "float"),
        ("train acc", "train_accuracy", "pct"),
        ("test loss", "test_loss", "float"),
        ("test acc", "test_accuracy", "pct"),
        ("own-test acc", "client_test_accuracy", "pct"),
        ("personal acc", "personal_test_accuracy", "pct"),
        ("epsilon", "dp_epsilon", "float"),
        ("staleness", "mean_staleness", "time"),
        ("time (s)", "wall_time_s", "time"),
    )
    # The clients' own-test columns only when the run has them.
    columns = tuple(c for c in every if c[1] not in OPTIONAL_FIELDS or c[1] in rows[-1])
    shown = _pick_rows(rows, max(2, max_rows))
    cells = [[_fmt(row.get(key), kind) for _, key, kind in columns] for row in shown]
    widths = [
        max(len(title), *(len(c[i]) for c in cells)) for i, (title, _, _) in enumerate(columns)
    ]
    lines = ["  ".join(t.rjust(w) for (t, _, _), w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    last = rows[-1]
    accs = [
        (r.get("test_accuracy"), r.get("round"))
        for r in rows
        if isinstance(r.get("test_accuracy"), int | float)
    ]
    if accs:
        best_acc, best_round = max(accs, key=lambda a: (a[0], -(a[1] or 0)))
        lines.append(
            f"final test accuracy {_fmt(last.get('test_accuracy'), 'pct')} after "
            f"{_fmt(last.get('round'), 'int')} rounds (best {_fmt(best_acc, 'pct')} at round "
            f"{best_round}), {_fmt(last.get('wall_time_s'), 'time')} s"
        )
    if isinstance(last.get("virtual_time_s"), int | float):
        lines.append(
            f"asynchronous: {_fmt(last.get('round'), 'int')} server updates in "
            f"{last['virtual_time_s']:.1f} virtual seconds"
        )
    if isinstance(last.get("dp_epsilon"), int | float):
        lines.append(f"privacy spent: epsilon {last['dp_epsilon']:.3f}")
    for key, what in (
        ("client_test_accuracy", "global model on the clients' own tests"),
        ("personal_test_accuracy", "personal models on their own tests"),
    ):
        if isinstance(last.get(key), int | float):
            lines.append(f"{what}: {_fmt(last.get(key), 'pct')}")
    return "\n".join(lines)

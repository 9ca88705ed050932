"""What the seeded accuracy benchmarks share: run one configuration, summarise, write.

``bench_algorithms.py``, ``bench_robust.py``, ``bench_privacy.py`` and
``bench_compression.py`` each run ``emberfl run`` in-process for a few settings and seeds
and report the mean and spread of the final accuracy; this module holds the parts that
are the same.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from emberfl.cli.config import RunConfig
from emberfl.cli.run import run_experiment

__all__ = ["mean_std", "run_rows", "write_record"]


def run_rows(config: RunConfig) -> list[dict[str, Any]]:
    """Validate and run ``config`` quietly; return its ``metrics.jsonl`` rows."""
    config.validate()
    run_experiment(config, out=io.StringIO(), progress=False)
    text = (Path(config.output_dir or "") / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Return the mean and the sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_record(bench: str, args: argparse.Namespace, **fields: Any) -> dict[str, Any]:
    """Build the bench's JSON record, print it and write it to ``args.out`` if set."""
    record = {
        "bench": bench,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        **fields,
    }
    text = json.dumps(record, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return record

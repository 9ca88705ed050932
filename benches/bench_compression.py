"""Accuracy and bytes of compressed uplinks, with and without error feedback, over seeds.

Runs ``emberfl run`` (in-process, serial mode) on the offline digits data set with
Dirichlet label skew over ``--clients`` clients, once per compression setting and seed:
``none``; ``topk:R`` / ``randk:R`` (ratio R) and ``qsgd:S`` / ``sign`` with error feedback;
the same with ``-noef`` appended, without it. Records the final test accuracy and the
uplink bytes of the whole run (``uplink_bytes`` summed over rounds, the payloads'
length); prints one JSON record and a SUMMARY line ``setting=accuracy+-std(xBYTES)`` with
the bytes relative to no compression.

Usage:
    python benches/bench_compression.py [--settings none,topk:0.01,topk:0.01-noef,...]
        [--seeds 0,1,2] [--rounds 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import mean_std, run_rows, write_record

from emberfl.cli.config import RunConfig

DEFAULT = "none,topk:0.01,topk:0.01-noef,randk:0.01,randk:0.01-noef,qsgd:16-noef,sign,sign-noef"


def options(setting: str) -> dict[str, Any]:
    """Return the RunConfig options of a setting (``topk:0.01-noef``, ``qsgd:4``, ...)."""
    if setting == "none":
        return {}
    spec, _, feedback = setting.partition("-")
    kind, _, arg = spec.partition(":")
    out: dict[str, Any] = {"compression": kind, "error_feedback": feedback != "noef"}
    if kind in ("topk", "randk") and arg:
        out["compression_ratio"] = float(arg)
    if kind == "qsgd" and arg:
        out["qsgd_levels"] = int(arg)
    return out


def run_one(setting: str, seed: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Run one setting and seed."""
    config = RunConfig(
        output_dir=str(root / f"{setting}-{seed}"),
        dataset="digits",
        partition="dirichlet",
        alpha=args.alpha,
        num_clients=args.clients,
        sample_ratio=args.sample_ratio,
        rounds=args.rounds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
        checkpoint_every=0,
        quiet=True,
        **options(setting),
    )
    rows = run_rows(config)
    return {
        "setting": setting,
        "seed": seed,
        "final_accuracy": rows[-1]["test_accuracy"],
        "best_accuracy": max(r["test_accuracy"] for r in rows),
        "uplink_bytes": sum(r["uplink_bytes"] for r in rows),
        "downlink_bytes": sum(r["downlink_bytes"] for r in rows),
    }


def main() -> None:
    """Run every setting on every seed and print the record."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--settings", default=DEFAULT)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--sample-ratio", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = args.settings.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="emberfl-compression-") as tmp:
        for seed in seeds:
            for setting in settings:
                result = run_one(setting, seed, args, Path(tmp))
                results.append(result)
                print(json.dumps(result), flush=True)
    dense = statistics.fmean(r["uplink_bytes"] for r in results if r["setting"] == settings[0])
    summary: dict[str, dict[str, float]] = {}
    for setting in settings:
        mine = [r for r in results if r["setting"] == setting]
        mean, std = mean_std([r["final_accuracy"] for r in mine])
        summary[setting] = {
            "final_accuracy_mean": mean,
            "final_accuracy_std": std,
            "uplink_bytes_mean": statistics.fmean(r["uplink_bytes"] for r in mine),
            "uplink_vs_first": statistics.fmean(r["uplink_bytes"] for r in mine) / dense,
        }
    write_record("compression", args, runs=results, summary=summary)
    print(
        "SUMMARY "
        + " ".join(
            f"{k}={v['final_accuracy_mean']:.4f}+-{v['final_accuracy_std']:.4f}"
            f"(x{v['uplink_vs_first']:.4f})"
            for k, v in summary.items()
        )
    )


if __name__ == "__main__":
    main()

"""Robust aggregators against FedAvg's mean under a Byzantine attack, over several seeds.

Runs ``emberfl run`` (in-process, serial mode) on the offline digits data set split IID
over ``--clients`` clients, every client in every round, with ``--malicious-fraction`` of
them attacking (``--attack``, default ``sign-flip``: they send ``-4 delta``), once per
aggregator and seed; ``clean`` is FedAvg's mean without an attack, the accuracy to keep.
For each run it records the final and best test accuracy and the mean round time; it
prints one JSON record and a SUMMARY line with each rule's final accuracy (mean +- std
over the seeds) and its round time relative to the attacked mean's.

With ``--aggregation-cost M,D`` it times instead each rule's ``combine`` on ``M`` random
updates of ``D`` floats (ResNet-18 has 11,173,962 parameters), with ``f = M / 5``, after
the updates are stored: the server's extra work per round.

Usage:
    python benches/bench_robust.py [--aggregators clean,mean,median,...] [--seeds 0,1,2]
        [--attack sign-flip] [--malicious-fraction 0.2] [--rounds 20] [--out FILE]
    python benches/bench_robust.py --aggregation-cost 100,11173962 [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import mean_std, run_rows, write_record

from emberfl.cli.config import RunConfig

DEFAULT = "clean,mean,median,trimmed-mean,krum,multi-krum,bulyan,geometric-median,clipped-mean"


def run_one(rule: str, seed: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Run one aggregator (``clean``: the mean without an attack) and seed."""
    aggregator = "mean" if rule == "clean" else rule
    extra: dict[str, Any] = {}
    if rule != "clean":
        extra = {"attack": args.attack, "malicious_fraction": args.malicious_fraction}
    if aggregator == "trimmed-mean":
        extra["trim_ratio"] = args.trim_ratio
    if aggregator == "clipped-mean":
        extra["clip_norm"] = args.clip_norm
    config = RunConfig(
        output_dir=str(root / f"{rule}-{seed}"),
        dataset="digits",
        partition="iid",
        num_clients=args.clients,
        rounds=args.rounds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
        aggregator=aggregator,
        checkpoint_every=0,
        quiet=True,
        **extra,
    )
    start = time.perf_counter()
    rows = run_rows(config)
    wall = time.perf_counter() - start
    return {
        "aggregator": rule,
        "seed": seed,
        "final_accuracy": rows[-1]["test_accuracy"],
        "best_accuracy": max(r["test_accuracy"] for r in rows),
        "mean_round_s": statistics.fmean(r["round_time_s"] for r in rows),
        "wall_s": round(wall, 3),
    }


def aggregation_cost(m: int, d: int, threads: int, rules: list[str]) -> dict[str, float]:
    """Return the seconds each rule's ``combine`` takes on ``m`` random updates of ``d``."""
    from emberfl.aggregation import AGGREGATORS, Bulyan, ClippedMean, Krum, MultiKrum, UpdateSet

    f = m // 5
    makers = {
        "krum": lambda: Krum(f),
        "multi-krum": lambda: MultiKrum(f),
        "bulyan": lambda: Bulyan(min(f, (m - 3) // 4)),
        "clipped-mean": lambda: ClippedMean(1.0),
        "trimmed-mean": lambda: AGGREGATORS["trimmed-mean"](0.2),  # type: ignore[call-arg]
    }
    g = torch.Generator().manual_seed(0)
    seconds: dict[str, float] = {}
    with UpdateSet(m, d) as updates:
        for i in range(m):
            row = torch.randn(d, generator=g)
            updates.add(row, 1.0, source=f"client {i}")
        out = torch.empty(d, dtype=torch.float32)
        for rule in rules:
            aggregator = makers.get(rule, AGGREGATORS[rule])()
            start = time.perf_counter()
            aggregator.combine(updates, out, num_threads=threads)
            seconds[rule] = round(time.perf_counter() - start, 3)
            print(json.dumps({"rule": rule, "m": m, "d": d, "seconds": seconds[rule]}), flush=True)
    return seconds


def main() -> None:
    """Run every aggregator on every seed, interleaved, and print the record."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--aggregators", default=DEFAULT)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--attack", default="sign-flip")
    parser.add_argument("--malicious-fraction", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--trim-ratio", type=float, default=0.2)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--aggregation-cost", metavar="M,D")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rules = args.aggregators.split(",")
    if args.aggregation_cost:
        m, d = (int(v) for v in args.aggregation_cost.split(","))
        seconds = aggregation_cost(m, d, args.threads, [r for r in rules if r != "clean"])
        record = {"bench": "robust_aggregation_cost", "m": m, "d": d, "threads": args.threads,
                  "seconds": seconds}  # fmt: skip
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=2) + "\n")
        print("SUMMARY " + " ".join(f"{k}={v:.3f}s" for k, v in seconds.items()))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="emberfl-robust-") as tmp:
        for seed in seeds:
            for rule in rules:
                result = run_one(rule, seed, args, Path(tmp))
                results.append(result)
                print(json.dumps(result), flush=True)
    base_name = "mean" if "mean" in rules else rules[0]
    base = statistics.fmean(r["mean_round_s"] for r in results if r["aggregator"] == base_name)
    summary: dict[str, dict[str, float]] = {}
    for rule in rules:
        mine = [r for r in results if r["aggregator"] == rule]
        mean, std = mean_std([r["final_accuracy"] for r in mine])
        summary[rule] = {
            "final_accuracy_mean": mean,
            "final_accuracy_std": std,
            "best_accuracy_mean": statistics.fmean(r["best_accuracy"] for r in mine),
            "round_time_vs_mean": statistics.fmean(r["mean_round_s"] for r in mine) / base,
        }
    write_record("robust", args, runs=results, round_time_base=base_name, summary=summary)
    print(
        "SUMMARY "
        + " ".join(
            f"{a}={s['final_accuracy_mean']:.4f}+-{s['final_accuracy_std']:.4f}"
            f"(x{s['round_time_vs_mean']:.2f})"
            for a, s in summary.items()
        )
    )


if __name__ == "__main__":
    main()

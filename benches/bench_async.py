"""Asynchronous against synchronous FL on one virtual clock: accuracy within a time budget.

Every client ``k`` takes ``exp(MU + SIGMA z_k)`` virtual seconds per task (``z_k`` from
its own stream, :class:`emberfl.asynchronous.ClientClock`), the same clock for all three:

* ``fedavg``: synchronous rounds of ``--concurrency`` sampled clients; a round lasts as
  long as its slowest client (the virtual time is computed here from the same clock and
  the same client sampling as the run);
* ``fedbuff``: ``--concurrency`` clients in flight, a server step every ``--buffer-size``
  reports;
* ``fedasync``: the same concurrency, every report mixed in (polynomial staleness).

Runs ``emberfl run`` in-process (serial mode) on digits with Dirichlet(0.5) label skew,
over seeds, and reports, for each, the test accuracy reached within the virtual time
FedAvg needs for ``--rounds`` rounds, the virtual time to reach ``--target`` accuracy
(``null`` if never), and the mean staleness. Prints one JSON record and a SUMMARY line.

Usage:
    python benches/bench_async.py [--seeds 0,1,2] [--rounds 50] [--out FILE]
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

from emberfl.asynchronous import ClientClock
from emberfl.cli.config import RunConfig
from emberfl.simulation import sample_clients


def _config(name: str, seed: int, rounds: int, args: argparse.Namespace, root: Path) -> RunConfig:
    extra: dict[str, Any] = {}
    if name != "fedavg":
        extra = {
            "concurrency": args.concurrency,
            "client_speed": f"lognormal:{args.mu},{args.sigma}",
        }
        if name == "fedbuff":
            extra["buffer_size"] = args.buffer_size
    return RunConfig(
        output_dir=str(root / f"{name}-{seed}"),
        algorithm=name,
        dataset="digits",
        partition="dirichlet",
        alpha=0.5,
        num_clients=args.clients,
        sample_ratio=args.concurrency / args.clients,
        rounds=rounds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
        checkpoint_every=0,
        quiet=True,
        **extra,
    )


def _fedavg_times(seed: int, args: argparse.Namespace) -> list[float]:
    """Virtual end time of each synchronous round: the slowest sampled client's."""
    clock = ClientClock(mu=args.mu, sigma=args.sigma)
    now, times = 0.0, []
    for r in range(args.rounds):
        cids = sample_clients(seed, r, args.clients, args.concurrency)
        now += max(clock.duration(seed, c) for c in cids)
        times.append(now)
    return times


def _summarise(
    name: str, seed: int, times: list[float], rows: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    budget = _fedavg_times(seed, args)[-1]
    within = [(t, r) for t, r in zip(times, rows, strict=True) if t <= budget]
    reached = [t for t, r in zip(times, rows, strict=True) if r["test_accuracy"] >= args.target]
    stale = [r["mean_staleness"] for r in rows if "mean_staleness" in r]
    return {
        "algorithm": name,
        "seed": seed,
        "budget_s": budget,
        "covered_s": times[-1],
        "accuracy_at_budget": within[-1][1]["test_accuracy"] if within else None,
        "updates_in_budget": len(within),
        "time_to_target_s": reached[0] if reached else None,
        "mean_staleness": statistics.fmean(stale) if stale else 0.0,
    }


def main() -> None:
    """Run the three algorithms on every seed and print the record."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--buffer-size", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=50, help="FedAvg's rounds (the budget)")
    parser.add_argument("--fedbuff-updates", type=int, default=500)
    parser.add_argument("--fedasync-updates", type=int, default=2500)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--mu", type=float, default=0.0)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    names = ("fedavg", "fedbuff", "fedasync")
    updates = {"fedavg": args.rounds, "fedbuff": args.fedbuff_updates,
               "fedasync": args.fedasync_updates}  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory(prefix="emberfl-async-") as tmp:
        for seed in seeds:
            for name in names:
                rows = run_rows(_config(name, seed, updates[name], args, Path(tmp)))
                if name == "fedavg":
                    times = _fedavg_times(seed, args)
                else:
                    times = [float(r["virtual_time_s"]) for r in rows]
                result = _summarise(name, seed, times, rows, args)
                results.append(result)
                print(json.dumps(result), flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [r for r in results if r["algorithm"] == name]
        acc = [r["accuracy_at_budget"] for r in mine if r["accuracy_at_budget"] is not None]
        mean, std = mean_std(acc) if acc else (float("nan"), float("nan"))
        reached = [r["time_to_target_s"] for r in mine if r["time_to_target_s"] is not None]
        summary[name] = {
            "accuracy_at_budget_mean": mean,
            "accuracy_at_budget_std": std,
            "time_to_target_mean_s": statistics.fmean(reached) if reached else None,
            "seeds_reaching_target": len(reached),
            "budget_covered": all(r["covered_s"] >= r["budget_s"] for r in mine),
            "mean_staleness": statistics.fmean(r["mean_staleness"] for r in mine),
        }
    write_record("async", args, runs=results, summary=summary)
    print(
        "SUMMARY "
        + " ".join(
            f"{k}={v['accuracy_at_budget_mean']:.4f}+-{v['accuracy_at_budget_std']:.4f}"
            f"(t80={v['time_to_target_mean_s'] or float('nan'):.1f}s)"
            for k, v in summary.items()
        )
    )


if __name__ == "__main__":
    main()

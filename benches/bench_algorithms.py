"""The algorithms against FedAvg where their papers say they help, over several seeds.

Runs ``emberfl run`` (in-process, serial mode, one process at a time) on the offline
digits data set with label-skewed clients and many local steps, the regime in which
client drift dominates (Karimireddy et al., 2020; Acar et al., 2021): every client holds
two label shards. For each algorithm and seed it records the final and best test
accuracy and the mean round time; it prints one JSON record and a SUMMARY line with each
algorithm's final accuracy (mean +- std over the seeds) and its round time relative to
FedAvg's, measured side by side in the same process.

``fedprox:MU`` runs FedProx with ``mu = MU`` (for a sweep); ``--stragglers F`` makes a
fraction ``F`` of the clients run 1..epochs epochs each round (FedProx's systems
heterogeneity), for every algorithm; ``fedavg-drop`` is FedAvg that leaves those stragglers
out of the round instead (the baseline of FedProx's experiments). ``--dataset synthetic``
runs FedProx's Synthetic(A, B) (``--synthetic A,B``; natural split, multinomial logistic
regression) instead of digits.

``ditto`` is judged on each client's own held-out 20% (personal models and the global
one); ``fedavg-own-tests`` is FedAvg with the same held-out data, for comparison.

Usage:
    python benches/bench_algorithms.py [--algorithms fedavg,scaffold,feddyn,fedprox]
        [--seeds 0,1,2] [--rounds 30] [--epochs 5] [--stragglers F] [--prox-mu MU]
        [--out FILE]
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

DEFAULT = "fedavg,scaffold,feddyn,fedprox,fedavgm,fedadam,fednova,qffl,ditto"


def run_one(
    algorithm: str, seed: int, args: argparse.Namespace, root: Path, extra: dict[str, Any]
) -> dict[str, Any]:
    """Run one configuration; return its accuracies and timings."""
    data: dict[str, Any] = {"dataset": "digits", "partition": "shards", "shards_per_client": 2}
    if args.dataset == "synthetic":
        alpha, beta = (float(v) for v in args.synthetic.split(","))
        data = {
            "dataset": "synthetic",
            "partition": "natural",
            "model": "logreg",
            "synthetic_alpha": alpha,
            "synthetic_beta": beta,
        }
    config = RunConfig(
        output_dir=str(root / f"{algorithm}-{seed}-{len(extra)}-{extra.get('prox_mu', '')}"),
        algorithm=algorithm,
        **data,
        num_clients=args.clients,
        sample_ratio=args.sample_ratio,
        rounds=args.rounds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
        checkpoint_every=0,
        quiet=True,
        stragglers=args.stragglers,
        **extra,
    )
    start = time.perf_counter()
    rows = run_rows(config)
    wall = time.perf_counter() - start
    result = {
        "algorithm": algorithm,
        "seed": seed,
        "final_accuracy": rows[-1]["test_accuracy"],
        "best_accuracy": max(r["test_accuracy"] for r in rows),
        "mean_round_s": statistics.fmean(r["round_time_s"] for r in rows),
        "wall_s": round(wall, 3),
    }
    for key in ("client_test_accuracy", "personal_test_accuracy"):
        if key in rows[-1]:  # clients' own held-out data (personalised algorithms)
            result[key] = rows[-1][key]
    return result


def main() -> None:
    """Run every algorithm on every seed, interleaved, and print the record."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--algorithms", default=DEFAULT)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--sample-ratio", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--prox-mu", type=float, default=0.01)
    parser.add_argument(
        "--stragglers", type=float, default=0.0, help="fraction of stragglers (every algorithm)"
    )
    parser.add_argument(
        "--dataset",
        choices=("digits", "synthetic"),
        default="digits",
        help="digits with two label shards per client, or FedProx's Synthetic(A,B) "
        "(natural split, logistic regression)",
    )
    parser.add_argument("--synthetic", default="1,1", help="A,B of --dataset synthetic")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    algorithms = args.algorithms.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    extras: dict[str, dict[str, Any]] = {
        "fedprox": {"prox_mu": args.prox_mu},
        "qffl": {"qffl_q": 1.0},
        # FedAvg is judged on the clients' own held-out data too, beside Ditto's personal
        # models; holding out 20% changes FedAvg's training data, so it runs separately.
        "fedavg-own-tests": {"client_test_fraction": 0.2},
        # FedProx's baseline: FedAvg that drops the stragglers (needs --stragglers).
        "fedavg-drop": {"drop_stragglers": True},
    }
    torch.set_num_threads(1)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="emberfl-algos-") as tmp:
        for seed in seeds:  # interleaved: each seed runs every algorithm back to back
            for algorithm in algorithms:
                name = algorithm.removesuffix("-own-tests").removesuffix("-drop")
                extra = extras.get(algorithm, {})
                if name.startswith("fedprox:"):  # fedprox:MU, a point of a sweep over mu
                    name, extra = "fedprox", {"prox_mu": float(name.split(":", 1)[1])}
                result = run_one(name, seed, args, Path(tmp), extra)
                result["algorithm"] = algorithm
                results.append(result)
                print(json.dumps(result), flush=True)
    summary: dict[str, dict[str, float]] = {}
    # Round times relative to FedAvg's (to the first algorithm's when FedAvg did not run).
    base_name = "fedavg" if "fedavg" in algorithms else algorithms[0]
    base = statistics.fmean(r["mean_round_s"] for r in results if r["algorithm"] == base_name)
    for algorithm in algorithms:
        mine = [r for r in results if r["algorithm"] == algorithm]
        mean, std = mean_std([r["final_accuracy"] for r in mine])
        summary[algorithm] = {
            "final_accuracy_mean": mean,
            "final_accuracy_std": std,
            "best_accuracy_mean": statistics.fmean(r["best_accuracy"] for r in mine),
            "round_time_vs_fedavg": statistics.fmean(r["mean_round_s"] for r in mine) / base,
        }
        for key in ("client_test_accuracy", "personal_test_accuracy"):
            values = [r[key] for r in mine if key in r]
            if values:
                mean, std = mean_std(values)
                summary[algorithm][f"{key}_mean"] = mean
                summary[algorithm][f"{key}_std"] = std
    write_record("algorithms", args, runs=results, round_time_base=base_name, summary=summary)
    print(
        "SUMMARY "
        + " ".join(
            f"{a}={s['final_accuracy_mean']:.4f}+-{s['final_accuracy_std']:.4f}"
            f"(x{s['round_time_vs_fedavg']:.2f})"
            + (
                f"[own-tests global={s['client_test_accuracy_mean']:.4f}"
                + (
                    f" personal={s['personal_test_accuracy_mean']:.4f}"
                    if "personal_test_accuracy_mean" in s
                    else ""
                )
                + "]"
                if "client_test_accuracy_mean" in s
                else ""
            )
            for a, s in summary.items()
        )
    )


if __name__ == "__main__":
    main()

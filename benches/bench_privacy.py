"""Accuracy against privacy spent: DP-FedAvg or local DP-SGD at a few noise multipliers.

Runs ``emberfl run`` (in-process, serial mode) on the offline digits data set split IID
over ``--clients`` clients, at each noise multiplier of ``--sigmas`` and once without DP
(``none``), over seeds. ``--dp central``: client-level DP (DP-FedAvg, clients
Poisson-sampled at rate ``--sample-ratio``, each update clipped to ``--clip-norm``).
``--dp local``: record-level DP-SGD on every client (each sample's gradient clipped to
``--clip-norm``). Records the final test accuracy and the epsilon spent at ``--delta``
(dp-accounting's RDP accountant; for ``local``, the worst-off client's) and, for
``local``, the mean round time against the run without DP; prints one JSON record and a
SUMMARY line ``sigma=accuracy+-std(eps=...)``.

Usage:
    python benches/bench_privacy.py [--dp central|local] [--sigmas none,0.5,1,2]
        [--seeds 0,1,2] [--out FILE]
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


def run_one(sigma: str, seed: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Run one noise multiplier (``none``: no DP) and seed."""
    extra: dict[str, Any] = {}
    if sigma != "none":
        extra = {
            "dp": args.dp,
            "dp_noise_multiplier": float(sigma),
            "dp_clip_norm": args.clip_norm,
            "dp_delta": args.delta,
        }
    config = RunConfig(
        output_dir=str(root / f"{sigma}-{seed}"),
        dataset="digits",
        partition="iid",
        num_clients=args.clients,
        sample_ratio=args.sample_ratio,
        rounds=args.rounds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
        checkpoint_every=0,
        quiet=True,
        **extra,
    )
    rows = run_rows(config)
    return {
        "sigma": sigma,
        "seed": seed,
        "final_accuracy": rows[-1]["test_accuracy"],
        "epsilon": rows[-1].get("dp_epsilon"),
        "mean_clients": statistics.fmean(r["num_clients"] for r in rows),
        "round_time_s": statistics.fmean(r["round_time_s"] for r in rows),
    }


def main() -> None:
    """Run every noise multiplier on every seed and print the record."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dp", choices=("central", "local"), default="central")
    parser.add_argument("--sigmas", default="none,0.3,0.5,1,2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--sample-ratio", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sigmas = args.sigmas.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="emberfl-dp-") as tmp:
        for seed in seeds:
            for sigma in sigmas:
                result = run_one(sigma, seed, args, Path(tmp))
                results.append(result)
                print(json.dumps(result), flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for sigma in sigmas:
        mine = [r for r in results if r["sigma"] == sigma]
        mean, std = mean_std([r["final_accuracy"] for r in mine])
        summary[sigma] = {
            "final_accuracy_mean": mean,
            "final_accuracy_std": std,
            "epsilon": mine[0]["epsilon"],  # the same for every seed (sigma, q, rounds)
            "round_time_s": statistics.fmean(r["round_time_s"] for r in mine),
        }
    write_record("privacy" if args.dp == "central" else "privacy-local", args,
                 runs=results, summary=summary)  # fmt: skip
    print(
        "SUMMARY "
        + " ".join(
            f"{k}={v['final_accuracy_mean']:.4f}+-{v['final_accuracy_std']:.4f}"
            + (f"(eps={v['epsilon']:.2f})" if v["epsilon"] is not None else "")
            for k, v in summary.items()
        )
    )


if __name__ == "__main__":
    main()

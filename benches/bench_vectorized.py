"""Vectorized execution vs emberfl's serial mode, and how it scales with chunk size.

Runs the shared FL workload (:mod:`fl_workload`, default: the ``small`` preset, 100
clients) in one process, interleaved over ``--repeats``: emberfl's serial trainer (the
baseline) and :class:`~emberfl.contrib.FedAvgVectorizedClientTrainer` at each
``--chunk-sizes`` value, for the tutorial CNN, an MLP (McMahan et al.'s "2NN",
3072-200-200-10) and logistic regression (3072-10), with ``--threads`` PyTorch intra-op
threads and ``--parallelism`` chunks at once. Only the round loop is timed
(:func:`emberfl_timing.run_rounds`: local training, aggregation, evaluation).

Usage:
    python benches/bench_vectorized.py --preset small --chunk-sizes 1,4,10,16,25,50,100 \\
        [--models cnn,mlp,logreg] [--threads 1] [--parallelism 1] [--repeats 3] [--out FILE]

Prints one JSON object (every run, medians, speed-ups over serial, max relative
difference of the final model from serial's) and a one-line ``SUMMARY``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_emberfl import RESULTS_DIR, prepare_data
from emberfl_timing import TimedFedAvg, run_rounds
from fl_workload import (
    PRESETS,
    InMemoryPartitionedDataset,
    WorkloadModelSelector,
    load_workload_data,
    pin_threads,
    warm_up_torch,
)

from emberfl.executors import ClientSetup, SerialExecutor, VectorizedExecutor
from emberfl.simulation import Simulation


class Selector(WorkloadModelSelector):
    """The workload's models plus ``"mlp"`` (2NN on flattened 3x32x32 images) and
    ``"logreg"`` (multinomial logistic regression, 30,730 parameters)."""

    def select_model(self, model_name: str) -> nn.Module:
        """Build ``model_name`` from the workload seed."""
        if model_name not in ("mlp", "logreg"):
            return super().select_model(model_name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if model_name == "logreg":
                return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
            return nn.Sequential(
                nn.Flatten(),
                nn.Linear(3 * 32 * 32, 200),
                nn.ReLU(),
                nn.Linear(200, 200),
                nn.ReLU(),
                nn.Linear(200, 10),
            )


def run_once(
    dataset: InMemoryPartitionedDataset,
    model: str,
    chunk_size: int | None,
    threads: int,
    preset: str,
    parallelism: int = 1,
) -> dict[str, Any]:
    """Run the workload once; ``chunk_size=None`` runs the serial trainer.

    Returns:
        ``{"total_s", "round_s", "local_process_s" (mean of rounds 2+), "params"}``.
    """
    config = PRESETS[preset].replace(model=model)
    selector = Selector(seed=config.seed)
    setup = ClientSetup(dataset, selector.select_model(model), config.batch_size, config.seed)
    executor = (
        SerialExecutor(setup, intra_op_threads=threads)
        if chunk_size is None
        else VectorizedExecutor(
            setup, chunk_size=chunk_size, num_parallels=parallelism, intra_op_threads=threads
        )
    )
    per_round = max(1, int(config.num_clients * config.sample_ratio))
    test_loader = dataset.get_dataloader(
        "test", None, batch_size=config.batch_size, generator=torch.Generator().manual_seed(0)
    )
    algorithm = TimedFedAvg(lr=config.lr, epochs=config.epochs)
    start = time.perf_counter()
    with Simulation(
        algorithm, executor, num_clients=config.num_clients, clients_per_round=per_round
    ) as sim:
        rounds, breakdown, _ = run_rounds(sim, config.rounds, test_loader, evaluation_threads=1)
        params = sim.state.model.clone()
    total = time.perf_counter() - start
    later = breakdown[1:] or breakdown
    return {
        "total_s": total,
        "round_s": rounds,
        "local_process_s": statistics.mean(b["local_process_s"] for b in later),
        "params": params,
    }


def main() -> None:
    """Parse arguments, run every setting ``--repeats`` times interleaved, report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--chunk-sizes", default="1,4,10,16,25,50,100")
    parser.add_argument("--models", default="cnn,mlp,logreg")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallelism", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    chunks = [int(c) for c in args.chunk_sizes.split(",") if c]
    models = [m for m in args.models.split(",") if m]
    pin_threads(args.threads)
    warm_up_torch()
    data_dir = prepare_data(PRESETS[args.preset], RESULTS_DIR / f"data-{args.preset}")
    dataset = InMemoryPartitionedDataset(load_workload_data(data_dir))
    settings: list[int | None] = [None, *chunks]
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        for model in models:
            for chunk in settings:
                key = f"{model}/{'serial' if chunk is None else f'vectorized-c{chunk}'}"
                run = run_once(dataset, model, chunk, args.threads, args.preset, args.parallelism)
                runs.setdefault(key, []).append(run)
                print(f"{key}: {run['total_s']:.2f}s", file=sys.stderr, flush=True)
    median = {k: statistics.median(r["total_s"] for r in rs) for k, rs in runs.items()}
    steady = {k: statistics.median(r["local_process_s"] for r in rs) for k, rs in runs.items()}
    speedup: dict[str, float] = {}
    rel_diff: dict[str, float] = {}
    for key, seconds in median.items():
        model = key.split("/")[0]
        base = runs[f"{model}/serial"][0]["params"]
        speedup[key] = median[f"{model}/serial"] / seconds
        got = runs[key][0]["params"]
        rel_diff[key] = float((got - base).abs().max() / base.abs().max())
    record = {
        "preset": args.preset,
        "threads": args.threads,
        "parallelism": args.parallelism,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "median_total_s": median,
        "median_local_process_s": steady,
        "speedup_vs_serial": speedup,
        "max_rel_diff_vs_serial": rel_diff,
        "runs": {k: [{**r, "params": None} for r in rs] for k, rs in runs.items()},
    }
    text = json.dumps(record, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    parts = []
    for model in models:
        best = max(
            (k for k in median if k.startswith(f"{model}/vectorized")),
            key=lambda k: speedup[k],
            default=None,
        )
        if best is not None:
            parts.append(
                f"{model}: serial {median[f'{model}/serial']:.2f}s, best {best.split('/')[1]} "
                f"{median[best]:.2f}s ({speedup[best]:.2f}x)"
            )
    print(
        f"SUMMARY bench_vectorized {args.preset} threads={args.threads} "
        f"P={args.parallelism}: " + "; ".join(parts)
    )


if __name__ == "__main__":
    main()

"""Each algorithm's per-round cost against FedAvg's on the ``small`` preset, mode by mode.

Runs every algorithm of :data:`emberfl.algorithms.ALGORITHMS` (with its defaults, the
preset's local lr and epochs) on the shared CIFAR-10-shaped workload (:mod:`fl_workload`,
``small``: 100 clients of 50 images, the tutorial CNN, every client in every round) with
a :class:`~emberfl.simulation.Simulation`, and times each round from the server's side.
The first round of every run is a warm-up and is not counted. Algorithms run one after
the other in one process, FedAvg among them, and the whole list is repeated
(``--repeats``), so each ratio compares runs made side by side; the ratio reported is the
median round time of the algorithm over FedAvg's in the same mode.

Usage:
    python benches/bench_algorithm_cost.py [--modes serial,vectorized] [--rounds 3]
        [--repeats 2] [--epochs E] [--algorithms a,b,...] [--out FILE]

Prints one JSON record and a SUMMARY line ``mode:algorithm=ratio``. Algorithms that are
not vectorizable are skipped in vectorized mode.

``--algorithms`` also takes ``NAME+COMPRESSOR`` (``fedavg+topk:0.01``, ``fedavg+qsgd:16``,
``fedavg+sign``): the algorithm with its uplink compressed
(:class:`~emberfl.algorithms.Compressed`, error feedback on), to measure what compression
adds to a round. Their records also carry ``compression_share``: the seconds the wrapper
spends beyond the wrapped client's training (encoding, decoding, the residual) over the
round's seconds, measured inside the same rounds (round-to-round noise on this machine is
larger than the cost itself).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_emberfl import RESULTS_DIR, prepare_data
from fl_workload import (
    PRESETS,
    InMemoryPartitionedDataset,
    WorkloadModelSelector,
    load_workload_data,
    pin_threads,
    warm_up_torch,
)

from emberfl.algorithms import ALGORITHMS, Algorithm
from emberfl.executors import ClientSetup, make_executor
from emberfl.simulation import Simulation


class _Timed:
    """An algorithm whose ``client_update`` adds its seconds to ``seconds``."""

    def __init__(self, inner: Algorithm) -> None:
        self.inner = inner
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def client_update(self, client: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.inner.client_update(client)
        finally:
            self.seconds += time.perf_counter() - start


def build(name: str, lr: float, epochs: int, seed: int) -> Algorithm:
    """Return algorithm ``name`` with its defaults and the workload's lr and epochs
    (``NAME+COMPRESSOR[:ARG]``: compressed)."""
    if "+" in name:
        from emberfl.algorithms import Compressed
        from emberfl.compression import QSGD, RandomK, ScaledSign, TopK

        base, spec = name.split("+", 1)
        kind, _, arg = spec.partition(":")
        makers = {
            "topk": lambda: TopK(float(arg or 0.01)),
            "randk": lambda: RandomK(float(arg or 0.01)),
            "qsgd": lambda: QSGD(int(arg or 16)),
            "sign": ScaledSign,
        }
        inner = _Timed(build(base, lr, epochs, seed))
        return _Timed(Compressed(inner, makers[kind]()))  # type: ignore[arg-type,return-value]
    cls = ALGORITHMS[name]
    kwargs: dict[str, Any] = {"lr": lr, "epochs": epochs}
    if "seed" in inspect.signature(cls).parameters:
        kwargs["seed"] = seed
    return cls(**kwargs)


def time_rounds(
    name: str, mode: str, dataset: InMemoryPartitionedDataset, args: argparse.Namespace
) -> list[float]:
    """Run ``args.rounds`` rounds of ``name`` in ``mode``; return the timed rounds' seconds."""
    config = PRESETS[args.preset]
    selector = WorkloadModelSelector(seed=config.seed)
    setup = ClientSetup(
        dataset=dataset,
        model=selector.select_model(config.model),
        batch_size=config.batch_size,
        seed=config.seed,
    )
    executor = make_executor(mode, setup, parallelism=1)
    epochs = getattr(args, "epochs", None) or config.epochs
    algorithm = build(name, config.lr, epochs, config.seed)
    per_round = max(1, int(config.num_clients * config.sample_ratio))
    times = []
    extra = []
    with Simulation(
        algorithm, executor, num_clients=config.num_clients, clients_per_round=per_round
    ) as sim:
        for _ in range(args.rounds):
            outer = getattr(algorithm, "seconds", 0.0)
            inner = getattr(getattr(algorithm, "inner", None), "inner", None)
            before = getattr(inner, "seconds", 0.0)
            start = time.perf_counter()
            sim.run_round()
            times.append(time.perf_counter() - start)
            wrapper = getattr(algorithm, "seconds", 0.0) - outer
            extra.append(wrapper - (getattr(inner, "seconds", 0.0) - before))
    if isinstance(algorithm, _Timed):
        shares = [e / t for e, t in zip(extra[1:], times[1:], strict=True)]
        LAST_SHARE[name] = statistics.fmean(shares)
    return times[1:]


LAST_SHARE: dict[str, float] = {}
"""The last run's ``compression_share`` per compressed algorithm name."""


def main() -> None:
    """Time every algorithm in every mode, repeated, and print the record."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--modes", default="serial,vectorized")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, help="local epochs (default: the preset's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first round is a warm-up)")
    names = args.algorithms.split(",")
    if "fedavg" not in names:
        names.insert(0, "fedavg")
    pin_threads(1)
    warm_up_torch()
    config = PRESETS[args.preset]
    data_dir = prepare_data(config, RESULTS_DIR / f"data-{args.preset}")
    dataset = InMemoryPartitionedDataset(load_workload_data(data_dir))
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for mode in args.modes.split(","):
            for name in names:
                if mode == "vectorized" and ("+" in name or not ALGORITHMS[name].vectorizable):
                    continue
                times = time_rounds(name, mode, dataset, args)
                run = {"repeat": repeat, "mode": mode, "algorithm": name, "round_s": times}
                if name in LAST_SHARE:
                    run["compression_share"] = round(LAST_SHARE.pop(name), 4)
                runs.append(run)
                print(json.dumps(run), flush=True)
    summary: dict[str, dict[str, float]] = {}
    for mode in args.modes.split(","):
        ratios: dict[str, list[float]] = {}
        for repeat in range(args.repeats):
            mine = {r["algorithm"]: r for r in runs if r["mode"] == mode and r["repeat"] == repeat}
            base = statistics.median(mine["fedavg"]["round_s"])
            for name, run in mine.items():
                ratios.setdefault(name, []).append(statistics.median(run["round_s"]) / base)
        summary[mode] = {name: round(statistics.fmean(r), 3) for name, r in ratios.items()}
    record = {
        "bench": "algorithm_cost",
        "preset": args.preset,
        "config": {
            "rounds": args.rounds,
            "repeats": args.repeats,
            "epochs": args.epochs or config.epochs,
            "threads": 1,
        },
        "torch": torch.__version__,
        "runs": runs,
        "round_time_vs_fedavg": summary,
    }
    text = json.dumps(record, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    shares: dict[str, list[float]] = {}
    for run in runs:
        if "compression_share" in run:
            shares.setdefault(run["algorithm"], []).append(run["compression_share"])
    record["compression_share"] = {a: round(statistics.fmean(v), 4) for a, v in shares.items()}
    text = json.dumps(record, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(
        "SUMMARY "
        + " ".join(f"{m}:{a}={v:.2f}" for m, ratios in summary.items() for a, v in ratios.items())
        + "".join(f" share:{a}={v:.3f}" for a, v in record["compression_share"].items())
    )


if __name__ == "__main__":
    main()

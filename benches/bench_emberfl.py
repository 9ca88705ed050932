"""emberfl's side of the side-by-side FL benchmark (and the data every framework reads).

Runs emberfl's FedAvg (:class:`emberfl.algorithms.FedAvg`, with a
:class:`emberfl.simulation.Simulation` and the executor of one mode) on the shared workload
(:mod:`fl_workload`), timing every round from the server's side with a per-phase breakdown
(:mod:`emberfl_timing`), and writes one JSON record.

Usage:
    python benches/bench_emberfl.py --preset small --mode process --parallelism 2 \\
        [--model cnn] [--data-dir DIR] [--threads 1] [--out FILE]

``--data-dir`` defaults to ``benches/results/data-<preset>``; the data are generated there
with :func:`emberfl.data.synthetic_cifar10` if missing. Prints the JSON record and a
one-line summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

import emberfl
from emberfl.core import StartMethod
from emberfl.core._process_pool import resolve_start_method
from emberfl.executors import ClientSetup, Executor, make_executor
from emberfl.simulation import Simulation

sys.path.insert(0, str(Path(__file__).resolve().parent))

from emberfl_timing import TimedFedAvg, run_rounds
from fl_workload import (
    PRESETS,
    InMemoryPartitionedDataset,
    WorkloadConfig,
    WorkloadModelSelector,
    load_workload_data,
    model_checksum,
    pin_threads,
    result_record,
    save_workload_data,
    warm_up_torch,
)

__all__ = ["MODES", "prepare_data", "run_emberfl"]

MODES = ("serial", "thread", "process", "vectorized")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
_DATA_FIELDS = ("num_train", "num_test", "num_clients", "shards_per_client", "seed")


def prepare_data(config: WorkloadConfig, directory: Path) -> Path:
    """Generate the workload's data with emberfl into ``directory`` unless already there.

    Images and labels come from :func:`emberfl.data.synthetic_cifar10`, the partition from
    :func:`emberfl.data.partition` (``"shards"``, ``shards_per_client`` per client, as
    BlazeFL's benchmark). Existing data are reused when they were made with the same
    sizes and seed.

    Args:
        config: The workload.
        directory: The data directory.

    Returns:
        ``directory``.
    """
    from emberfl.data import partition, synthetic_cifar10

    meta = directory / "meta.json"
    if meta.exists():
        made = json.loads(meta.read_text())["config"]
        if all(made.get(k) == getattr(config, k) for k in _DATA_FIELDS):
            return directory
    ds = synthetic_cifar10(config.num_train, config.num_test, seed=config.seed)
    labels = ds.train_y.numpy()
    part = partition(
        labels,
        config.num_clients,
        method="shards",
        seed=config.seed,
        shards_per_client=config.shards_per_client,
    )
    arrays = {
        "train_x": ds.train_x.numpy(),
        "train_y": labels.astype(np.int64),
        "test_x": ds.test_x.numpy(),
        "test_y": ds.test_y.numpy().astype(np.int64),
        "owner": part.owner().astype(np.int64),
    }
    save_workload_data(directory, arrays, config)
    return directory


def _make_executor(
    mode: str,
    setup: ClientSetup,
    parallelism: int,
    threads: int,
    chunk_size: int | None = None,
    start_method: StartMethod = "auto",
) -> Executor:
    options: dict[str, Any] = {"intra_op_threads": threads}
    if mode == "process":
        # Conservative: the workers start inside round 1 (as in BlazeFL and Flower), not in
        # the background during set-up as ``emberfl run`` does.
        options["start_method"] = start_method
    if mode == "vectorized":  # P chunks at once, in threads
        options["chunk_size"] = chunk_size
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    return make_executor(mode, setup, parallelism=parallelism, **options)


def run_emberfl(
    config: WorkloadConfig,
    data_dir: Path,
    *,
    mode: str,
    parallelism: int,
    threads: int = 1,
    chunk_size: int | None = None,
    evaluation_threads: int | None = None,
    start_method: StartMethod = "auto",
) -> dict[str, Any]:
    """Run emberfl's FedAvg on the workload and return the JSON record.

    Only the round loop is timed (not loading data or building the server); a process
    pool starts inside round one, so its start-up is counted there.

    Args:
        config: The workload.
        data_dir: Data written by :func:`prepare_data`.
        mode: ``"serial"``, ``"thread"``, ``"process"`` or ``"vectorized"``.
        parallelism: Clients at once (1 for ``serial``); chunks at once for
            ``vectorized``.
        threads: PyTorch intra-op threads per client.
        chunk_size: Clients trained at once in ``vectorized`` mode (``None``: the
            trainer's default).
        evaluation_threads: The server's ``evaluation_threads`` (``None``: the
            parallelism; the evaluation's result does not depend on it).
        start_method: How ``process`` mode starts its workers (``"auto"``: emberfl's
            default, forked where safe).

    Returns:
        The record (see :func:`fl_workload.result_record`), with a per-round
        ``breakdown``.
    """
    pin_threads(threads)
    warm_up_torch()
    data = load_workload_data(data_dir)
    dataset = InMemoryPartitionedDataset(data)
    selector = WorkloadModelSelector(seed=config.seed)
    parallelism = 1 if mode == "serial" else parallelism
    eval_threads = evaluation_threads or parallelism
    setup = ClientSetup(
        dataset=dataset,
        model=selector.select_model(config.model),
        batch_size=config.batch_size,
        seed=config.seed,
    )
    executor = _make_executor(mode, setup, parallelism, threads, chunk_size, start_method)
    algorithm = TimedFedAvg(lr=config.lr, epochs=config.epochs)
    per_round = max(1, int(config.num_clients * config.sample_ratio))
    test_loader = dataset.get_dataloader(
        "test", None, batch_size=config.batch_size, generator=torch.Generator().manual_seed(0)
    )
    with Simulation(
        algorithm, executor, num_clients=config.num_clients, clients_per_round=per_round
    ) as sim:
        rounds, breakdown, summary = run_rounds(
            sim, config.rounds, test_loader, evaluation_threads=eval_threads
        )
        final = sim.global_model()
    record = result_record(
        framework="emberfl",
        framework_version=emberfl.__version__,
        mode=mode,
        parallelism=parallelism,
        config=config,
        threads=threads,
        round_seconds=rounds,
        checksum=model_checksum(final),
        data_dir=data_dir,
        summary=summary,
        breakdown=breakdown,
    )
    if mode == "vectorized":
        record["chunk_size"] = chunk_size
    if mode == "process":
        record["start_method"] = resolve_start_method(start_method, threads)
    record["evaluation_threads"] = eval_threads
    return record


def summary_line(record: dict[str, Any]) -> str:
    """Return the one-line summary of a record."""
    return (
        f"SUMMARY {record['framework']} {record['mode']} P={record['parallelism']} "
        f"model={record['config']['model']}: {record['total_seconds']:.2f}s over "
        f"{len(record['round_seconds'])} rounds, acc={record['summary'].get('server_acc', 0):.3f}, "
        f"checksum={record['checksum'][:12]}"
    )


def main() -> None:
    """Parse arguments, run one mode, print and save the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--config-json", help="a WorkloadConfig as JSON (overrides --preset)")
    parser.add_argument("--model", choices=("cnn", "resnet18"))
    parser.add_argument("--mode", choices=MODES, default="serial")
    parser.add_argument("--parallelism", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, help="vectorized mode: clients at once")
    parser.add_argument(
        "--evaluation-threads",
        type=int,
        help="test batches the server evaluates at once (default: --parallelism)",
    )
    parser.add_argument(
        "--start-method",
        choices=get_args(StartMethod),
        default="auto",
        help="process mode: how the workers start (default: emberfl's auto)",
    )
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    config = (
        WorkloadConfig.from_dict(json.loads(args.config_json))
        if args.config_json
        else PRESETS[args.preset]
    )
    if args.model:
        config = config.replace(model=args.model)
    data_dir = args.data_dir or RESULTS_DIR / f"data-{args.preset}"
    prepare_data(config, data_dir)
    torch.manual_seed(config.seed)
    record = run_emberfl(
        config,
        data_dir,
        mode=args.mode,
        parallelism=args.parallelism,
        threads=args.threads,
        chunk_size=args.chunk_size,
        evaluation_threads=args.evaluation_threads,
        start_method=args.start_method,
    )
    text = json.dumps(record, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    print(summary_line(record))


if __name__ == "__main__":
    main()

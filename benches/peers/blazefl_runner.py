"""BlazeFL's side of the side-by-side FL benchmark (runs in BlazeFL's own virtual env).

Imports the installed ``blazefl`` package (3.0.0a1, Python >= 3.13) and runs its contrib
FedAvg (``blazefl.contrib``) on the shared workload (``benches/fl_workload.py``), reading
the data emberfl generated. The round loop is BlazeFL's benchmark pipeline
(``benchmarks/blazefl-case``): sample, downlink, ``local_process``, ``uplink_package``,
``load``, ``get_summary``, timed per phase. As in that benchmark, the multiprocessing start
method is ``spawn``; BlazeFL's process pool is created inside every ``local_process`` call,
so its start-up is inside the timed rounds.

Modes: ``serial`` (``FedAvgBaseClientTrainer``), ``thread``
(``FedAvgThreadPoolClientTrainer``; BlazeFL recommends a free-threaded build, on a GIL build
it still runs, PyTorch kernels release the GIL) and ``process``
(``FedAvgProcessPoolClientTrainer``).

BlazeFL 2.0.x's process trainer takes ``share_dir`` and ``ipc_mode``: ``--ipc-mode
storage|shared_memory`` passes them (``benches/bench_ipc_modes.py``). ``--package emberfl``
runs the same pipeline on ``emberfl.contrib`` (BlazeFL's classes on emberfl, imports
changed), so the two are compared on exactly the same code.

Usage:
    <blazefl-venv>/bin/python benches/peers/blazefl_runner.py --data-dir DIR \\
        --config-json '{...}' --mode process --parallelism 2 --threads 1 --out FILE \\
        [--ipc-mode storage] [--package emberfl]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fl_workload import (
    LazyPartitionedDataset,
    WorkloadConfig,
    WorkloadModelSelector,
    model_checksum,
    pin_threads,
    result_record,
    warm_up_torch,
)

MODES = ("serial", "thread", "process")


def _make_trainer(
    mode: str,
    config: WorkloadConfig,
    dataset: LazyPartitionedDataset,
    selector: WorkloadModelSelector,
    parallelism: int,
    state_dir: Path,
    package: str = "blazefl",
    ipc_mode: str | None = None,
) -> Any:
    contrib = importlib.import_module(f"{package}.contrib")
    FedAvgBaseClientTrainer = contrib.FedAvgBaseClientTrainer
    FedAvgProcessPoolClientTrainer = contrib.FedAvgProcessPoolClientTrainer
    FedAvgThreadPoolClientTrainer = contrib.FedAvgThreadPoolClientTrainer

    common: dict[str, Any] = {
        "model_selector": selector,
        "model_name": config.model,
        "dataset": dataset,
        "device": "cpu",
        "num_clients": config.num_clients,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
    }
    if mode == "serial":
        return FedAvgBaseClientTrainer(**common)
    if mode == "thread":
        return FedAvgThreadPoolClientTrainer(num_parallels=parallelism, **common)
    if mode == "process":
        ipc: dict[str, Any] = {}
        if ipc_mode is not None:  # BlazeFL 2.0.x's arguments
            ipc = {"share_dir": state_dir / "share", "ipc_mode": ipc_mode}
        return FedAvgProcessPoolClientTrainer(
            state_dir=state_dir / "state", num_parallels=parallelism, **common, **ipc
        )
    raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")


def run_blazefl(
    config: WorkloadConfig,
    data_dir: Path,
    *,
    mode: str,
    parallelism: int,
    threads: int,
    pkg: str = "blazefl",
    ipc_mode: str | None = None,
) -> dict[str, Any]:
    """Run BlazeFL's FedAvg on the workload and return the JSON record.

    Args:
        config: The workload.
        data_dir: The shared data directory.
        mode: ``serial``, ``thread`` or ``process``.
        parallelism: Clients at once (1 for ``serial``).
        threads: PyTorch intra-op threads per client (also exported to child processes).
        pkg: ``blazefl``, or ``emberfl`` for BlazeFL's classes on emberfl.
        ipc_mode: BlazeFL 2.0.x's IPC mode for ``process`` (``None``: 3.0's signature).

    Returns:
        The record.
    """
    FedAvgBaseServerHandler = importlib.import_module(f"{pkg}.contrib").FedAvgBaseServerHandler

    pin_threads(threads)
    warm_up_torch()
    dataset = LazyPartitionedDataset(data_dir)
    selector = WorkloadModelSelector(seed=config.seed)
    handler = FedAvgBaseServerHandler(
        model_selector=selector,
        model_name=config.model,
        dataset=dataset,
        global_round=config.rounds,
        num_clients=config.num_clients,
        sample_ratio=config.sample_ratio,
        device="cpu",
        batch_size=config.batch_size,
        seed=config.seed,
    )
    parallelism = 1 if mode == "serial" else parallelism
    rounds: list[float] = []
    breakdown: list[dict[str, float]] = []
    summary: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="blazefl-bench-") as state:
        trainer = _make_trainer(
            mode, config, dataset, selector, parallelism, Path(state), pkg, ipc_mode
        )
        try:
            while not handler.if_stop():
                t0 = time.perf_counter()
                cids = handler.sample_clients()
                payload = handler.downlink_package()
                t1 = time.perf_counter()
                trainer.local_process(payload, cids)
                t2 = time.perf_counter()
                for package in trainer.uplink_package():
                    handler.load(package)
                t3 = time.perf_counter()
                summary = handler.get_summary()
                t4 = time.perf_counter()
                rounds.append(t4 - t0)
                breakdown.append(
                    {
                        "dispatch_s": t1 - t0,
                        "local_process_s": t2 - t1,
                        "aggregation_s": t3 - t2,
                        "evaluation_s": t4 - t3,
                        "round_s": t4 - t0,
                        "clients": float(len(cids)),
                    }
                )
        finally:
            shutdown = getattr(trainer, "shutdown", None)
            manager = getattr(trainer, "manager", None)
            if shutdown is not None:
                shutdown()
            elif manager is not None:
                manager.shutdown()
    return result_record(
        framework=pkg,
        framework_version=version(pkg),
        mode=mode,
        parallelism=parallelism,
        config=config,
        threads=threads,
        round_seconds=rounds,
        checksum=model_checksum(handler.model),
        data_dir=data_dir,
        summary=summary,
        breakdown=breakdown,
        extra={
            "gil_enabled": bool(getattr(sys, "_is_gil_enabled", lambda: True)()),
            "ipc_mode": ipc_mode,
            "pipeline": "blazefl-contrib",
        },
    )


def main() -> None:
    """Parse arguments, run one mode, print and save the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--mode", choices=MODES, default="serial")
    parser.add_argument("--parallelism", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--package", choices=("blazefl", "emberfl"), default="blazefl")
    parser.add_argument("--ipc-mode", choices=("storage", "shared_memory"))
    args = parser.parse_args()
    mp.set_start_method("spawn")  # as BlazeFL's benchmark
    config = WorkloadConfig.from_dict(json.loads(args.config_json))
    torch.manual_seed(config.seed)
    record = run_blazefl(
        config,
        args.data_dir,
        mode=args.mode,
        parallelism=args.parallelism,
        threads=args.threads,
        pkg=args.package,
        ipc_mode=args.ipc_mode,
    )
    text = json.dumps(record, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    print(
        f"SUMMARY {args.package} {record['mode']} ipc={args.ipc_mode} "
        f"P={record['parallelism']}: "
        f"{record['total_seconds']:.2f}s, checksum={record['checksum'][:12]}"
    )


if __name__ == "__main__":
    main()

"""Flower's side of the side-by-side FL benchmark (runs in Flower's own virtual env).

Imports the installed ``flwr[simulation]`` and runs its standard FedAvg strategy
(``flwr.serverapp.strategy.FedAvg``) in the Simulation Engine on the Ray backend
(``flwr.simulation.run_simulation``), on the shared workload (``benches/fl_workload.py``)
with the data emberfl generated. The apps follow Flower's quickstart-pytorch and BlazeFL's
``benchmarks/flower-case``: the ``ClientApp`` loads the global ``ArrayRecord`` into a
model, trains with plain SGD and replies with its ``ArrayRecord`` and ``num-examples``;
the ``ServerApp`` evaluates the global model centrally after every round
(``evaluate_fn``) and does no federated evaluation (``fraction_evaluate=0``).

Parallelism ``P``: Ray is started with all the machine's CPUs and each client asks for
``cpus / P`` of them (``client_resources``), so ``P`` clients run at once, as BlazeFL's
benchmark configures Flower. Round times are the intervals between the end of round
``r - 1``'s evaluation and the end of round ``r``'s (the evaluation of the initial model,
which the other frameworks do not do, is left out and reported on its own).

Usage:
    <flower-venv>/bin/python benches/peers/flower_runner.py --data-dir DIR \\
        --config-json '{...}' --parallelism 2 --threads 1 --out FILE
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

BENCHES = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCHES))

from fl_workload import (  # noqa: E402
    LazyPartitionedDataset,
    WorkloadConfig,
    build_model,
    evaluate,
    local_sgd,
    model_checksum,
    pin_threads,
    result_record,
    warm_up_torch,
)

_ENV_CONFIG = "EMBERFL_BENCH_CONFIG"
_ENV_DATA = "EMBERFL_BENCH_DATA"
_ENV_THREADS = "EMBERFL_BENCH_THREADS"
_DATASET: LazyPartitionedDataset | None = None  # one per Ray worker process


def _settings() -> tuple[WorkloadConfig, Path, int]:
    config = WorkloadConfig.from_dict(json.loads(os.environ[_ENV_CONFIG]))
    return config, Path(os.environ[_ENV_DATA]), int(os.environ[_ENV_THREADS])


def _dataset(data_dir: Path) -> LazyPartitionedDataset:
    global _DATASET
    if _DATASET is None or _DATASET.directory != data_dir:
        _DATASET = LazyPartitionedDataset(data_dir)
    return _DATASET


def make_client_app() -> Any:
    """Return the ``ClientApp`` (local SGD on the node's partition)."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config, data_dir, threads = _settings()
        torch.set_num_threads(threads)
        cid = int(context.node_config["partition-id"])
        model = build_model(config.model, seed=config.seed)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        dataset = _dataset(data_dir).get_dataset("train", cid)
        round_ = int(msg.content["config"].get("server-round", 0))
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + cid * 1_009 + round_)
        loader = DataLoader(
            dataset, batch_size=config.batch_size, shuffle=True, generator=generator
        )
        loss = local_sgd(model, loader, config.epochs, float(msg.content["config"]["lr"]))
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"train_loss": loss, "num-examples": len(dataset)}),  # type: ignore[arg-type]
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def make_server_app(record: dict[str, Any]) -> Any:
    """Return the ``ServerApp``; it fills ``record`` with timings and the final model."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config, data_dir, threads = _settings()
        torch.set_num_threads(threads)
        model = build_model(config.model, seed=config.seed)
        test_loader = DataLoader(
            _dataset(data_dir).get_dataset("test", None), batch_size=config.batch_size
        )
        stamps: list[float] = []
        evals: list[tuple[float, float]] = []

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = evaluate(model, test_loader)
            evals.append((loss, acc))
            stamps.append(time.perf_counter())
            return MetricRecord({"server_acc": acc, "server_loss": loss})

        num_train = max(1, int(config.num_clients * config.sample_ratio))
        strategy = FedAvg(
            fraction_train=config.sample_ratio,
            fraction_evaluate=0.0,
            min_train_nodes=num_train,
            min_evaluate_nodes=0,
            min_available_nodes=config.num_clients,
        )
        start = time.perf_counter()
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            train_config=ConfigRecord({"lr": config.lr}),
            num_rounds=config.rounds,
            evaluate_fn=evaluate_fn,
        )
        record["strategy_start_s"] = time.perf_counter() - start
        record["initial_eval_s"] = stamps[0] - start if stamps else 0.0
        record["round_seconds"] = [b - a for a, b in itertools.pairwise(stamps)]
        record["summary"] = (
            {"server_loss": evals[-1][0], "server_acc": evals[-1][1]} if evals else {}
        )
        model.load_state_dict(result.arrays.to_torch_state_dict())
        record["checksum"] = model_checksum(model)

    return app


def run_flower(
    config: WorkloadConfig, data_dir: Path, *, parallelism: int, threads: int
) -> dict[str, Any]:
    """Run Flower's FedAvg simulation on the workload and return the JSON record.

    Args:
        config: The workload.
        data_dir: The shared data directory.
        parallelism: Clients at once (Ray CPUs per client = CPUs / parallelism).
        threads: PyTorch intra-op threads per client.

    Returns:
        The record.
    """
    from flwr.simulation import run_simulation

    pin_threads(threads)
    warm_up_torch()
    os.environ[_ENV_CONFIG] = json.dumps(config.to_dict())
    os.environ[_ENV_DATA] = str(data_dir.resolve())
    os.environ[_ENV_THREADS] = str(threads)
    paths = [str(BENCHES), str(Path(__file__).resolve().parent)]
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])
    cpus = os.cpu_count() or 1
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": cpus / parallelism, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False},
    }
    record: dict[str, Any] = {}
    start = time.perf_counter()
    run_simulation(
        server_app=make_server_app(record),
        client_app=make_client_app(),
        num_supernodes=config.num_clients,
        backend_name="ray",
        backend_config=backend_config,
    )
    wall = time.perf_counter() - start
    if "checksum" not in record:
        raise RuntimeError("the Flower ServerApp did not finish; see the log above")
    return result_record(
        framework="flower",
        framework_version=version("flwr"),
        mode="ray",
        parallelism=parallelism,
        config=config,
        threads=threads,
        round_seconds=record["round_seconds"],
        checksum=record["checksum"],
        data_dir=data_dir,
        summary=record["summary"],
        extra={
            "ray": version("ray"),
            "backend_config": backend_config,
            "strategy_start_s": record["strategy_start_s"],
            "initial_eval_s": record["initial_eval_s"],
            "run_simulation_wall_s": wall,
        },
    )


def main() -> None:
    """Parse arguments, run the simulation, print and save the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--mode", choices=("ray",), default="ray")
    parser.add_argument("--parallelism", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    config = WorkloadConfig.from_dict(json.loads(args.config_json))
    record = run_flower(config, args.data_dir, parallelism=args.parallelism, threads=args.threads)
    text = json.dumps(record, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    print(
        f"SUMMARY flower ray P={record['parallelism']}: {record['total_seconds']:.2f}s, "
        f"checksum={record['checksum'][:12]}"
    )


if __name__ == "__main__":
    main()

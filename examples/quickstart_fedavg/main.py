"""Quickstart: FedAvg on CIFAR-10-shaped data with emberfl (port of BlazeFL's quickstart).

Run ``python examples/quickstart_fedavg/main.py --help`` for the options. The data set is
generated from the seed (``emberfl.data.synthetic_cifar10``), so nothing is downloaded.
The last line printed is the SHA-256 of the final global model: it is the same for every
``--mode`` and ``--parallelism`` (on CPU), which is emberfl's determinism guarantee.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from emberfl.contrib import (
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgProcessPoolClientTrainer,
    FedAvgThreadPoolClientTrainer,
)
from emberfl.core import serialize_model
from emberfl.data import partition, synthetic_cifar10
from emberfl.data.partitioned import TensorPartitionedDataset
from emberfl.models import ModelName, Models
from emberfl.reproducibility import setup_reproducibility

log = logging.getLogger("quickstart")

Trainer = FedAvgBaseClientTrainer | FedAvgThreadPoolClientTrainer | FedAvgProcessPoolClientTrainer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The options.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20, help="number of clients")
    parser.add_argument("--rounds", type=int, default=5, help="communication rounds")
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--batch", type=int, default=32, help="local batch size")
    parser.add_argument("--lr", type=float, default=0.1, help="client SGD learning rate")
    parser.add_argument(
        "--mode", choices=["serial", "thread", "process"], default="process", help="execution mode"
    )
    parser.add_argument(
        "--parallelism",
        type=int,
        default=os.cpu_count() or 1,
        help="threads or processes training clients at once",
    )
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--seed", type=int, default=42, help="experiment seed")
    parser.add_argument("--sample-ratio", type=float, default=1.0, help="clients per round")
    parser.add_argument(
        "--partition", choices=["iid", "dirichlet"], default="dirichlet", help="data split"
    )
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration")
    parser.add_argument("--train-size", type=int, default=10000, help="training images")
    parser.add_argument("--test-size", type=int, default=2000, help="test images")
    return parser.parse_args(argv)


def build_dataset(args: argparse.Namespace) -> TensorPartitionedDataset:
    """Generate the data and split it among the clients.

    Args:
        args: The options.

    Returns:
        The partitioned data set.
    """
    data = synthetic_cifar10(args.train_size, args.test_size, seed=args.seed)
    options: dict[str, Any] = {"alpha": args.alpha} if args.partition == "dirichlet" else {}
    if args.partition == "dirichlet":
        options["min_size"] = 1
    parts = partition(data.train_y, args.clients, method=args.partition, seed=args.seed, **options)
    return TensorPartitionedDataset(data, parts)


def main(argv: Sequence[str] | None = None) -> str:
    """Run FedAvg and return the SHA-256 of the final global model.

    Args:
        argv: Command-line arguments.

    Returns:
        The hex digest of the final model's parameters.
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    setup_reproducibility(args.seed)
    dataset = build_dataset(args)
    selector = Models(input_shape=(3, 32, 32), num_classes=10, seed=args.seed)

    handler = FedAvgBaseServerHandler(
        model_selector=selector,
        model_name=ModelName.CNN,
        dataset=dataset,
        global_round=args.rounds,
        num_clients=args.clients,
        sample_ratio=args.sample_ratio,
        device=device,
        batch_size=256,
        seed=args.seed,
    )
    common: dict[str, Any] = {
        "model_selector": selector,
        "model_name": ModelName.CNN,
        "dataset": dataset,
        "device": device,
        "num_clients": args.clients,
        "epochs": args.epochs,
        "batch_size": args.batch,
        "lr": args.lr,
        "seed": args.seed,
    }
    trainer: (
        FedAvgBaseClientTrainer | FedAvgThreadPoolClientTrainer | FedAvgProcessPoolClientTrainer
    )
    if args.mode == "serial":
        trainer = FedAvgBaseClientTrainer(**common)
    elif args.mode == "thread":
        trainer = FedAvgThreadPoolClientTrainer(**common, num_parallels=args.parallelism)
    else:
        trainer = FedAvgProcessPoolClientTrainer(
            **common, state_dir=None, num_parallels=args.parallelism
        )
    log.info(
        "FedAvg: %d clients, %d rounds, mode=%s, parallelism=%d, device=%s",
        args.clients,
        args.rounds,
        args.mode,
        args.parallelism,
        device,
    )
    try:
        while not handler.is_stopped():
            start = time.perf_counter()
            round_ = handler.round
            cids = handler.sample_clients()
            trainer.local_process(handler.downlink_package(), cids)
            for package in trainer.uplink_package():
                handler.load(package)
            summary = handler.get_summary()
            log.info(
                "round %d: server_acc=%.4f server_loss=%.4f (%.2fs)",
                round_,
                summary["server_acc"],
                summary["server_loss"],
                time.perf_counter() - start,
            )
    except KeyboardInterrupt:
        log.info("interrupted")
    finally:
        if isinstance(trainer, FedAvgProcessPoolClientTrainer):
            trainer.shutdown()
        handler.close()
    digest = hashlib.sha256(serialize_model(handler.model).numpy().tobytes()).hexdigest()
    print(f"model sha256: {digest}", flush=True)
    return digest


if __name__ == "__main__":
    main()

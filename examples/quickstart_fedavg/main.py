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
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emberfl.contrib import (
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgPartitionType,
    FedAvgProcessPoolClientTrainer,
    FedAvgThreadPoolClientTrainer,
)
from emberfl.core import serialize_model
from emberfl.data import partition, synthetic_cifar10
from emberfl.reproducibility import setup_reproducibility

log = logging.getLogger("quickstart")

Trainer = FedAvgBaseClientTrainer | FedAvgThreadPoolClientTrainer | FedAvgProcessPoolClientTrainer


class ModelName(StrEnum):
    """The models this example knows."""

    CNN = "cnn"


class CNN(nn.Module):
    """The CNN of PyTorch's "Training a classifier" tutorial (62k parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        """Build the layers.

        Args:
            num_classes: Number of output classes.
        """
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of 3x32x32 images.

        Args:
            x: Images ``(N, 3, 32, 32)``.

        Returns:
            Logits ``(N, num_classes)``.
        """
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        logits: torch.Tensor = self.fc3(x)
        return logits


class QuickstartModelSelector:
    """Builds the CNN with weights drawn from the seed (global RNG state is restored)."""

    def __init__(self, *, num_classes: int, seed: int) -> None:
        """Remember the settings.

        Args:
            num_classes: Number of classes.
            seed: Seed of the initial weights.
        """
        self.num_classes = num_classes
        self.seed = seed

    def select_model(self, model_name: ModelName) -> nn.Module:
        """Return a freshly initialised model.

        Args:
            model_name: Which model.

        Returns:
            The model.
        """
        if model_name != ModelName.CNN:
            raise ValueError(f"unknown model {model_name!r}; choose from {list(ModelName)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return CNN(self.num_classes)


class PartitionedTensors:
    """A :class:`~emberfl.core.PartitionedDataset` over in-memory tensors.

    The training set is split among clients by an :mod:`emberfl.data` partition; the
    server's (``cid=None``) split is the test set.
    """

    def __init__(
        self,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        client_indices: Sequence[torch.Tensor],
    ) -> None:
        """Keep the tensors and each client's sample indices.

        Args:
            train_x: Training images.
            train_y: Training labels.
            test_x: Test images.
            test_y: Test labels.
            client_indices: One index tensor per client.
        """
        self.train_x, self.train_y = train_x, train_y
        self.test_x, self.test_y = test_x, test_y
        self.client_indices = list(client_indices)

    def get_dataset(self, type_: FedAvgPartitionType, cid: int | None) -> TensorDataset:
        """Return a client's training data, or the test set for ``TEST`` / ``cid=None``."""
        if type_ == FedAvgPartitionType.TEST or cid is None:
            return TensorDataset(self.test_x, self.test_y)
        index = self.client_indices[cid]
        return TensorDataset(self.train_x[index], self.train_y[index])

    def set_dataset(self, type_: FedAvgPartitionType, cid: int | None, dataset: Any) -> None:
        """Not needed by FedAvg; the splits are fixed."""

    def get_dataloader(
        self,
        type_: FedAvgPartitionType,
        cid: int | None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> DataLoader[Any]:
        """Return a loader; training data is shuffled with ``generator``."""
        dataset = self.get_dataset(type_, cid)
        return DataLoader(
            dataset,
            batch_size=batch_size or len(dataset),
            shuffle=type_ == FedAvgPartitionType.TRAIN,
            generator=generator,
        )


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


def build_dataset(args: argparse.Namespace) -> PartitionedTensors:
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
    indices = [torch.from_numpy(idx.copy()) for idx in parts.client_indices]
    return PartitionedTensors(data.train_x, data.train_y, data.test_x, data.test_y, indices)


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
    selector = QuickstartModelSelector(num_classes=10, seed=args.seed)

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

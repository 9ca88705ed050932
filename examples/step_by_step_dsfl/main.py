"""Run DS-FL on the offline ``digits`` data set and print the server's test accuracy.

Usage::

    python examples/step_by_step_dsfl/main.py                      # serial, defaults
    python examples/step_by_step_dsfl/main.py --mode process --num-parallels 2
    python examples/step_by_step_dsfl/main.py --mode process --ipc-mode storage
    python examples/step_by_step_dsfl/main.py --help

The same seed gives the same numbers, bit for bit, in both modes, in both IPC modes and
for any ``--num-parallels``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import torch
from algorithm import DSFLBaseClientTrainer, DSFLProcessPoolClientTrainer, DSFLServerHandler
from dataset import DSFLPartitionedDataset
from models import DSFLModelName, DSFLModelSelector

from emberfl.core import IPCMode
from emberfl.data import load_dataset
from emberfl.reproducibility import setup_reproducibility

__all__ = ["DSFLConfig", "DSFLResult", "ExecutionMode", "build", "main", "parse_args", "run"]


class ExecutionMode(StrEnum):
    """How the clients run."""

    SERIAL = "serial"
    PROCESS = "process"


@dataclass(frozen=True)
class DSFLConfig:
    """One DS-FL experiment.

    Attributes:
        num_clients: Number of clients.
        global_round: Number of communication rounds.
        sample_ratio: Fraction of clients per round.
        epochs: Private-data epochs per round.
        batch_size: Private-data batch size.
        lr: Private-data learning rate.
        kd_epochs: Distillation epochs per round (server and clients).
        kd_batch_size: Distillation batch size.
        kd_lr: Distillation learning rate.
        open_size: Training samples set aside (labels dropped) as the open set.
        open_size_per_round: Open-set samples the clients predict on per round.
        era_temperature: ERA's sharpening temperature.
        alpha: Dirichlet concentration of the clients' label skew.
        server_model: The server's architecture.
        client_models: The clients' architectures, assigned round-robin by client id.
        mode: Serial or process-pool clients.
        num_parallels: Worker processes in process mode.
        ipc_mode: How process mode exchanges data with its workers (shared memory, or
            BlazeFL 2.x's files in a temporary share directory).
        dataset: ``"digits"`` or ``"synthetic-cifar10"`` (both generated offline).
        dataset_size: Training images of ``"synthetic-cifar10"`` (a fifth as many for
            its test split).
        seed: The experiment seed.
        device: Where to compute.
    """

    num_clients: int = 10
    global_round: int = 10
    sample_ratio: float = 1.0
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.005
    kd_epochs: int = 5
    kd_batch_size: int = 50
    kd_lr: float = 0.005
    open_size: int = 400
    open_size_per_round: int = 200
    era_temperature: float = 0.1
    alpha: float = 0.5
    server_model: str = DSFLModelName.CNN
    client_models: tuple[str, ...] = (DSFLModelName.CNN, DSFLModelName.MLP)
    mode: ExecutionMode = ExecutionMode.SERIAL
    num_parallels: int = 2
    ipc_mode: IPCMode = IPCMode.SHARED_MEMORY
    dataset: str = "digits"
    dataset_size: int = 2000
    seed: int = 42
    device: str = "cpu"


@dataclass
class DSFLResult:
    """What :func:`run` returns.

    Attributes:
        initial: The server's summary before the first round.
        history: The summary after each round.
        server_state: The server model's final state dict.
        seconds: Wall-clock time of the rounds.
    """

    initial: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    server_state: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0


def build(
    config: DSFLConfig, *, share_dir: Path | None = None
) -> tuple[DSFLServerHandler, DSFLBaseClientTrainer | DSFLProcessPoolClientTrainer]:
    """Create the data set, the model selector, the server handler and the client trainer.

    Args:
        config: The experiment.
        share_dir: The folder storage IPC exchanges files in (process mode with
            ``IPCMode.STORAGE`` only).

    Returns:
        The handler and the trainer (shut a process-pool trainer down when done).
    """
    if config.dataset == "synthetic-cifar10":
        size = config.dataset_size
        data = load_dataset(config.dataset, seed=config.seed, num_train=size, num_test=size // 5)
    else:
        data = load_dataset(config.dataset, seed=config.seed)
    dataset = DSFLPartitionedDataset(
        data,
        num_clients=config.num_clients,
        open_size=config.open_size,
        seed=config.seed,
        partition_method="dirichlet",
        partition_params={"alpha": config.alpha, "min_size": 10},
    )
    selector = DSFLModelSelector(
        num_classes=data.num_classes, input_shape=dataset.input_shape, seed=config.seed
    )
    handler = DSFLServerHandler(
        model_selector=selector,
        model_name=config.server_model,
        dataset=dataset,
        global_round=config.global_round,
        num_clients=config.num_clients,
        sample_ratio=config.sample_ratio,
        device=config.device,
        kd_epochs=config.kd_epochs,
        kd_batch_size=config.kd_batch_size,
        kd_lr=config.kd_lr,
        era_temperature=config.era_temperature,
        open_size_per_round=config.open_size_per_round,
        seed=config.seed,
    )
    trainer: DSFLBaseClientTrainer | DSFLProcessPoolClientTrainer
    if ExecutionMode(config.mode) is ExecutionMode.PROCESS:
        trainer = DSFLProcessPoolClientTrainer(
            model_selector=selector,
            model_names=config.client_models,
            dataset=dataset,
            device=config.device,
            num_clients=config.num_clients,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            kd_epochs=config.kd_epochs,
            kd_batch_size=config.kd_batch_size,
            kd_lr=config.kd_lr,
            seed=config.seed,
            num_parallels=config.num_parallels,
            ipc_mode=config.ipc_mode,
            share_dir=share_dir,
        )
    else:
        trainer = DSFLBaseClientTrainer(
            model_selector=selector,
            model_names=config.client_models,
            dataset=dataset,
            device=config.device,
            num_clients=config.num_clients,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            kd_epochs=config.kd_epochs,
            kd_batch_size=config.kd_batch_size,
            kd_lr=config.kd_lr,
            seed=config.seed,
        )
    return handler, trainer


def _format(round_: int, summary: dict[str, float]) -> str:
    fields = "  ".join(f"{key} {value:.4f}" for key, value in summary.items())
    return f"round {round_:3d}  {fields}"


def run(config: DSFLConfig, *, log: Callable[[str], None] | None = print) -> DSFLResult:
    """Run the experiment: the usual emberfl loop of sample, broadcast, train, load.

    Args:
        config: The experiment.
        log: Called with one line per round (``None``: silent).

    Returns:
        The summaries and the server's final model state.
    """
    with ExitStack() as stack:
        share_dir = None
        if config.mode == ExecutionMode.PROCESS and config.ipc_mode == IPCMode.STORAGE:
            share_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dsfl-")))
        handler, trainer = build(config, share_dir=share_dir)
        if isinstance(trainer, DSFLProcessPoolClientTrainer):
            stack.enter_context(trainer)  # stops the worker processes on exit
        result = DSFLResult(initial=handler.get_summary())
        if log is not None:
            log(_format(0, result.initial))
        start = time.perf_counter()
        while not handler.is_stopped():
            sampled = handler.sample_clients()
            trainer.local_process(handler.downlink_package(), sampled)
            for package in trainer.uplink_package():
                handler.load(package)
            summary = handler.get_summary()
            result.history.append(summary)
            if log is not None:
                log(_format(handler.round, summary))
        result.seconds = time.perf_counter() - start
    result.server_state = {k: v.detach().clone() for k, v in handler.model.state_dict().items()}
    return result


def parse_args(argv: Sequence[str] | None = None) -> DSFLConfig:
    """Parse the command line into a :class:`DSFLConfig`.

    Args:
        argv: The arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The configuration.
    """
    d = DSFLConfig()
    models = [m.value for m in DSFLModelName]
    p = argparse.ArgumentParser(
        description="DS-FL (distillation-based semi-supervised FL) on the offline digits set",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--num-clients", type=int, default=d.num_clients, help="number of clients")
    p.add_argument("--rounds", type=int, default=d.global_round, help="communication rounds")
    p.add_argument("--sample-ratio", type=float, default=d.sample_ratio, help="clients/round")
    p.add_argument("--epochs", type=int, default=d.epochs, help="private-data epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="private batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="private-data learning rate")
    p.add_argument("--kd-epochs", type=int, default=d.kd_epochs, help="distillation epochs")
    p.add_argument("--kd-batch-size", type=int, default=d.kd_batch_size, help="KD batch size")
    p.add_argument("--kd-lr", type=float, default=d.kd_lr, help="distillation learning rate")
    p.add_argument("--open-size", type=int, default=d.open_size, help="open-set size")
    p.add_argument(
        "--open-size-per-round",
        type=int,
        default=d.open_size_per_round,
        help="open-set samples per round",
    )
    p.add_argument("--temperature", type=float, default=d.era_temperature, help="ERA temperature T")
    p.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet label skew")
    p.add_argument("--server-model", choices=models, default=d.server_model)
    p.add_argument(
        "--client-models",
        default=",".join(d.client_models),
        help=f"comma-separated architectures ({', '.join(models)}), round-robin by client id",
    )
    p.add_argument("--mode", choices=[m.value for m in ExecutionMode], default=d.mode.value)
    p.add_argument("--num-parallels", type=int, default=d.num_parallels, help="processes")
    p.add_argument(
        "--ipc-mode",
        choices=[m.value for m in IPCMode],
        default=d.ipc_mode.value,
        help="process mode: shared memory, or files in a temporary folder (BlazeFL 2.x)",
    )
    p.add_argument(
        "--dataset", choices=["digits", "synthetic-cifar10"], default=d.dataset, help="data"
    )
    p.add_argument(
        "--dataset-size", type=int, default=d.dataset_size, help="synthetic-cifar10 images"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="experiment seed")
    p.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    client_models = tuple(m.strip() for m in args.client_models.split(",") if m.strip())
    unknown = [m for m in client_models if m not in models]
    if unknown or not client_models:
        p.error(f"--client-models: unknown {unknown} (choose from {models})")
    return DSFLConfig(
        num_clients=args.num_clients,
        global_round=args.rounds,
        sample_ratio=args.sample_ratio,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        kd_epochs=args.kd_epochs,
        kd_batch_size=args.kd_batch_size,
        kd_lr=args.kd_lr,
        open_size=args.open_size,
        open_size_per_round=args.open_size_per_round,
        era_temperature=args.temperature,
        alpha=args.alpha,
        server_model=args.server_model,
        client_models=client_models,
        mode=ExecutionMode(args.mode),
        num_parallels=args.num_parallels,
        ipc_mode=IPCMode(args.ipc_mode),
        dataset=args.dataset,
        dataset_size=args.dataset_size,
        seed=args.seed,
        device=args.device,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, run the experiment and print one line per round.

    Args:
        argv: The arguments (``None``: ``sys.argv[1:]``).
    """
    config = parse_args(argv)
    setup_reproducibility(config.seed)  # deterministic cuDNN; seeds no global generator
    print(config)
    result = run(config)
    final = result.history[-1]["server_acc"] if result.history else result.initial["server_acc"]
    print(
        f"done: server_acc {result.initial['server_acc']:.4f} -> {final:.4f} "
        f"in {result.seconds:.1f} s ({config.global_round} rounds, {config.mode} mode)"
    )


if __name__ == "__main__":  # the guard lets spawned worker processes import this file
    main()

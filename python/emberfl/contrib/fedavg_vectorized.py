"""FedAvg with vectorized clients under BlazeFL's trainer protocol.

:class:`FedAvgVectorizedClientTrainer` is a drop-in replacement for the serial
:class:`~emberfl.contrib.FedAvgBaseClientTrainer` (same constructor arguments, plus
``chunk_size`` and SGD options). It is a thin adapter of
:class:`emberfl.executors.VectorizedExecutor`: ``chunk_size`` clients train at once as
one stacked model, each reading its own mini-batches in its own stream's order, and the
uplinks equal the serial trainer's up to float rounding (about 1e-6 relative after a
round), deterministically and independently of ``num_parallels``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from emberfl.algorithms.base import ModelLayout, StreamSpec
from emberfl.algorithms.fedavg import FedAvg
from emberfl.algorithms.local_sgd import ClientUpdate, LocalResult
from emberfl.contrib.fedavg import (
    FedAvgBaseServerHandler,
    FedAvgDownlinkPackage,
    FedAvgPartitionedDataset,
    FedAvgUplinkPackage,
)
from emberfl.core import BaseClientTrainer, ModelSelector
from emberfl.core.vectorized import ConvMode, StackedSGD
from emberfl.errors import ConfigError
from emberfl.executors.base import ClientSetup, RoundPlan
from emberfl.executors.vectorized import DEFAULT_CPU_CHUNK, VectorizedExecutor, default_chunk_size

__all__ = [
    "DEFAULT_CPU_CHUNK",
    "FedAvgVectorizedClientTrainer",
    "FedAvgVectorizedServerHandler",
    "default_chunk_size",
]


class _ModelUplinkFedAvg(FedAvg):
    """FedAvg whose clients send their trained model (BlazeFL's package) instead of a delta."""

    name: ClassVar[str] = "fedavg-model-uplink"

    def __init__(self, *, dampening: float, nesterov: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dampening = dampening
        self.nesterov = nesterov

    def uplink_streams(self, layout: ModelLayout) -> dict[str, StreamSpec]:
        return {"model": StreamSpec(layout.dim, "samples")}

    def finish(self, result: LocalResult) -> ClientUpdate:
        return ClientUpdate(uplink={"model": result.model})

    def optimizer(self) -> StackedSGD:
        return StackedSGD(
            lr=self.lr,
            momentum=self.momentum,
            dampening=self.dampening,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
        )


class FedAvgVectorizedClientTrainer(BaseClientTrainer[FedAvgUplinkPackage, FedAvgDownlinkPackage]):
    """FedAvg clients trained ``chunk_size`` at a time as one stacked model.

    Attributes:
        model: The local model (the architecture; its values are never used).
        dataset: The partitioned data set.
        device: Where to train.
        num_clients: Number of clients.
        epochs: Local epochs.
        batch_size: Local batch size.
        lr: SGD learning rate.
        seed: The experiment seed.
        chunk_size: Clients trained at once (``None``: :func:`default_chunk_size` on the
            CPU, every client of the round elsewhere).
        num_parallels: Chunks trained at once (threads).
        round: Number of ``local_process`` calls completed (the client streams' round).
        cache: Packages waiting for :meth:`uplink_package`.
    """

    def __init__(
        self,
        model_selector: ModelSelector[Any],
        model_name: str,
        dataset: FedAvgPartitionedDataset,
        device: str,
        num_clients: int,
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int,
        *,
        chunk_size: int | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        num_parallels: int = 1,
        intra_op_threads: int | None = 1,
        conv: ConvMode = "auto",
        retain_memory: bool = True,
    ) -> None:
        """Create the trainer.

        Args:
            model_selector: Builds the local model.
            model_name: Which model.
            dataset: The partitioned data set.
            device: Where to train.
            num_clients: Number of clients.
            epochs: Local epochs.
            batch_size: Local batch size.
            lr: SGD learning rate.
            seed: The experiment seed.
            chunk_size: Clients trained at once (>= 1).
            momentum: SGD momentum (``torch.optim.SGD``'s meaning).
            weight_decay: SGD weight decay.
            dampening: SGD dampening.
            nesterov: Nesterov momentum.
            num_parallels: Chunks trained at once, each in its own thread.
            intra_op_threads: PyTorch's intra-op thread count while training.
            conv: How per-client convolutions run (:data:`~emberfl.core.vectorized.ConvMode`).
            retain_memory: Keep freed CPU memory in the heap between steps.

        Raises:
            ConfigError: For a bad count, optimiser setting or an unsupported model layer.
        """
        if epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {epochs}")
        StackedSGD(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
        )  # validates the options now
        self.model = model_selector.select_model(model_name)
        self.dataset = dataset
        self.device = device
        self.num_clients = num_clients
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.round = 0
        self.cache: list[FedAvgUplinkPackage] = []
        self._algorithm = _ModelUplinkFedAvg(
            lr=lr,
            epochs=epochs,
            momentum=momentum,
            weight_decay=weight_decay,
            dampening=dampening,
            nesterov=nesterov,
        )
        self._executor = VectorizedExecutor(
            ClientSetup(dataset, self.model, batch_size, seed, device, fast_layers=False),
            chunk_size=chunk_size,
            num_parallels=num_parallels,
            intra_op_threads=intra_op_threads,
            conv=conv,
            retain_memory=retain_memory,
        )
        self._layout = ModelLayout.of(self.model)

    @property
    def chunk_size(self) -> int | None:
        """Clients trained at once."""
        return self._executor.chunk_size

    @property
    def num_parallels(self) -> int:
        """Chunks trained at once."""
        return self._executor.num_parallels

    def local_process(self, payload: FedAvgDownlinkPackage, cid_list: list[int]) -> None:
        """Train ``cid_list``, ``chunk_size`` clients at a time.

        Args:
            payload: The global model.
            cid_list: The clients of this round.

        Raises:
            TensorMismatchError: If the global model does not have the local model's layout.
            ClientError: If training a chunk raised (it names the chunk's first client and
                lists the others; nothing is cached).
        """
        plan = RoundPlan(
            algorithm=self._algorithm,
            broadcast={"model": payload.model_parameters.detach().reshape(-1).to(torch.float32)},
            cids=list(cid_list),
            round=self.round,
            layout=self._layout,
            streams=self._algorithm.uplink_streams(self._layout),
        )
        packages: list[FedAvgUplinkPackage] = []

        def keep(_position: int, cid: int, result: Any) -> None:
            packages.append(FedAvgUplinkPackage(cid, result.uplink["model"], result.num_samples))

        self._executor.run(plan, keep)
        self.cache.extend(packages)
        self.round += 1

    def uplink_package(self) -> list[FedAvgUplinkPackage]:
        """Return (and clear) the cached packages."""
        package, self.cache = self.cache, []
        return package

    def close(self) -> None:
        """Nothing to release (kept for symmetry with the other trainers)."""

    def __enter__(self) -> FedAvgVectorizedClientTrainer:
        """Return the trainer; :meth:`close` runs on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Call :meth:`close`."""
        self.close()


class FedAvgVectorizedServerHandler(FedAvgBaseServerHandler):
    """Kept for compatibility: the FedAvg server, which already folds every uplink into a
    running sum without copying it (:class:`~emberfl.contrib.FedAvgBaseServerHandler`)."""

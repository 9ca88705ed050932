"""BlazeFL's FedAvg classes (``blazefl.contrib.fedavg``), built on emberfl's algorithm layer.

The classes, constructor arguments and packages are BlazeFL 3.0's, so BlazeFL code ports
by changing its imports. Underneath, they are thin:

* every client's local training is :func:`emberfl.algorithms.local_sgd.train_locally`
  with :class:`emberfl.algorithms.FedAvg`, the loop every emberfl executor runs; the client
  draws its randomness from :func:`emberfl.reproducibility.client_rng_suite` ``(seed, cid,
  round)`` and trains with one intra-op thread, so the global model is bitwise identical
  across runs, ``num_parallels`` and the serial, thread-pool and process-pool trainers;
* the server folds each uplink into a float64 :class:`emberfl.aggregation.WeightedSum` as
  :meth:`FedAvgBaseServerHandler.load` receives it, weighted by the client's training-set
  size, in the order the packages arrive (``cid_list`` order); it keeps no copy, so in the
  loop ``for p in trainer.uplink_package(): server.load(p)`` every uplink exists once.

New code can use :class:`emberfl.simulation.Simulation` with an executor directly; these
classes are for BlazeFL's protocol (:class:`~emberfl.core.BaseServerHandler` and the
trainers of :mod:`emberfl.core`).
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import threading
import traceback
from collections.abc import Iterable, Sized
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader

from emberfl.aggregation import WeightedSum
from emberfl.algorithms.base import Client, ModelLayout, Split
from emberfl.algorithms.fedavg import FedAvg
from emberfl.algorithms.local_sgd import train_locally
from emberfl.core import (
    BaseClientTrainer,
    BaseServerHandler,
    ClientJob,
    IPCMode,
    ModelSelector,
    PartitionedDataset,
    ProcessPoolClientTrainer,
    SHMHandle,
    StartMethod,
    ThreadPoolClientTrainer,
    deserialize_model,
    intra_op_threads,
    serialize_model,
)
from emberfl.errors import ClientError, ConfigError, TensorMismatchError
from emberfl.evaluation import evaluate
from emberfl.executors.process import ModelTemplate
from emberfl.nn import use_fast_layers
from emberfl.reproducibility import RNGSuite, client_rng_suite, create_rng_suite
from emberfl.simulation import sample_clients

__all__ = [
    "FedAvgBaseClientTrainer",
    "FedAvgBaseServerHandler",
    "FedAvgClientConfig",
    "FedAvgDownlinkPackage",
    "FedAvgPartitionType",
    "FedAvgPartitionedDataset",
    "FedAvgProcessPoolClientTrainer",
    "FedAvgProcessPoolUplinkPackage",
    "FedAvgThreadPoolClientTrainer",
    "FedAvgUplinkPackage",
]


@dataclass
class FedAvgUplinkPackage:
    """What a client sends to the server.

    Attributes:
        cid: Client id.
        model_parameters: The client's model after local training
            (:func:`~emberfl.core.serialize_model`).
        data_size: Number of training samples (the aggregation weight).
        metadata: Optional metrics.
    """

    cid: int
    model_parameters: torch.Tensor
    data_size: int
    metadata: dict[str, float] | None = None


@dataclass
class FedAvgProcessPoolUplinkPackage:
    """The process-pool transport form of :class:`FedAvgUplinkPackage`.

    ``model_parameters`` is an :class:`~emberfl.core.SHMHandle` while the tensor itself is
    in the worker's arena slot.

    Attributes:
        cid: Client id.
        model_parameters: The parameters, or a placeholder.
        data_size: Number of training samples.
        metadata: Optional metrics.
    """

    cid: int
    model_parameters: torch.Tensor | SHMHandle
    data_size: int
    metadata: dict[str, float] | None = None


@dataclass
class FedAvgDownlinkPackage:
    """What the server broadcasts.

    Attributes:
        model_parameters: The global model (:func:`~emberfl.core.serialize_model`).
    """

    model_parameters: torch.Tensor


FedAvgPartitionType = Split
"""The splits FedAvg uses (``TRAIN``, ``TEST``): :class:`emberfl.algorithms.Split`."""

FedAvgPartitionedDataset = PartitionedDataset[FedAvgPartitionType]


def _describe_state(model: torch.nn.Module, limit: int = 6) -> str:
    state = model.state_dict()
    parts = [f"{name} {tuple(t.shape)}" for name, t in list(state.items())[:limit]]
    if len(state) > limit:
        parts.append(f"... {len(state) - limit} more")
    return ", ".join(parts)


class FedAvgBaseServerHandler(BaseServerHandler[FedAvgUplinkPackage, FedAvgDownlinkPackage]):
    """The FedAvg server: samples clients, broadcasts the model, averages the updates.

    Attributes:
        model: The global model.
        dataset: The partitioned data set (its ``TEST`` split with ``cid=None`` is used by
            :meth:`get_summary`).
        global_round: Number of rounds to run.
        num_clients: Number of clients in the federation.
        sample_ratio: Fraction of clients sampled per round.
        device: Where to evaluate.
        batch_size: Evaluation batch size.
        seed: The experiment seed.
        num_clients_per_round: ``int(num_clients * sample_ratio)``.
        round: Rounds completed so far.
        client_buffer_cache: Packages of the current round, kept only by a subclass that
            overrides :meth:`global_update` (BlazeFL's buffering); this class folds each
            package into a running sum instead and keeps none.
        rng_suite: The server's generators.
        aggregation_threads: Threads of the Rust aggregation kernel (``None``: PyTorch's
            thread count); the result does not depend on it.
        evaluation_threads: Test batches evaluated at once by :meth:`get_summary`.
    """

    def __init__(
        self,
        model_selector: ModelSelector[Any],
        model_name: str,
        dataset: FedAvgPartitionedDataset,
        global_round: int,
        num_clients: int,
        sample_ratio: float,
        device: str,
        batch_size: int,
        seed: int,
        *,
        aggregation_threads: int | None = None,
        fast_layers: bool = True,
        evaluation_threads: int = 1,
    ) -> None:
        """Create the server.

        Args:
            model_selector: Builds the global model.
            model_name: Which model.
            dataset: The partitioned data set.
            global_round: Number of rounds (> 0).
            num_clients: Number of clients (> 0).
            sample_ratio: Fraction of clients per round, in ``(0, 1]``.
            device: Where to evaluate.
            batch_size: Evaluation batch size.
            seed: The experiment seed (drives client sampling).
            aggregation_threads: Threads of the aggregation kernel.
            fast_layers: Evaluate with emberfl's CPU kernels where they compute exactly
                what PyTorch's do (:func:`emberfl.nn.use_fast_layers`).
            evaluation_threads: Test batches evaluated at once by :meth:`get_summary`
                (the result does not depend on it).

        Raises:
            ConfigError: If a count or ratio is out of range.
        """
        if global_round <= 0:
            raise ConfigError(f"global_round must be positive, got {global_round}")
        if num_clients <= 0:
            raise ConfigError(f"num_clients must be positive, got {num_clients}")
        if isinstance(evaluation_threads, bool) or evaluation_threads < 1:
            raise ConfigError(f"evaluation_threads must be >= 1, got {evaluation_threads}")
        if not 0 < sample_ratio <= 1:
            raise ConfigError(f"sample_ratio must be in the interval (0, 1], got {sample_ratio}")
        num_clients_per_round = int(num_clients * sample_ratio)
        if num_clients_per_round <= 0:
            raise ConfigError(
                "sample_ratio selects zero clients per round; increase sample_ratio or "
                f"num_clients (got num_clients={num_clients}, sample_ratio={sample_ratio})"
            )
        self.model = model_selector.select_model(model_name)
        if fast_layers:
            use_fast_layers(self.model)
        self.dataset = dataset
        self.global_round = global_round
        self.num_clients = num_clients
        self.sample_ratio = sample_ratio
        self.device = device
        self.batch_size = batch_size
        self.seed = seed
        self.aggregation_threads = aggregation_threads
        self.evaluation_threads = evaluation_threads
        self.client_buffer_cache: list[FedAvgUplinkPackage] = []
        self.num_clients_per_round = num_clients_per_round
        self.round = 0
        self.rng_suite: RNGSuite = create_rng_suite(seed)
        self._sum: WeightedSum | None = None
        self._received = 0

    def sample_clients(self) -> list[int]:
        """Sample ``num_clients_per_round`` distinct clients for the current round.

        The sample is a pure function of ``(seed, round)`` (emberfl stream with purpose
        ``CLIENT_SAMPLING``), so a resumed run samples the same clients.

        Returns:
            The sorted client ids.
        """
        return sample_clients(self.seed, self.round, self.num_clients, self.num_clients_per_round)

    def is_stopped(self) -> bool:
        """Return ``True`` once ``global_round`` rounds have completed."""
        return self.round >= self.global_round

    def load(self, payload: FedAvgUplinkPackage) -> bool:
        """Fold one client's package into the round's weighted sum; finish the round when
        every sampled client has reported.

        Args:
            payload: A client's uplink package.

        Returns:
            ``True`` if this package completed the round.

        Raises:
            TensorMismatchError: The package's parameters do not have the global model's
                layout (nothing is added).
            NonFiniteError: They hold NaN or infinity (nothing is added).
        """
        if type(self).global_update is not FedAvgBaseServerHandler.global_update:
            # A subclass with its own rule gets BlazeFL's buffer.
            self.client_buffer_cache.append(payload)
            if len(self.client_buffer_cache) < self.num_clients_per_round:
                return False
            self.global_update(self.client_buffer_cache)
            self.client_buffer_cache = []
            self.round += 1
            return True
        self._fold(payload)
        self._received += 1
        if self._received < self.num_clients_per_round:
            return False
        self._finish_round()
        self.round += 1
        return True

    def _fold(self, package: FedAvgUplinkPackage) -> None:
        if self._sum is None:
            layout = ModelLayout.of(self.model)
            self._sum = WeightedSum(
                layout.dim,
                name="model_parameters",
                describe=layout.name_at,
                num_threads=self.aggregation_threads,
            )
        self._check_uplink(package, self._sum.dim)
        self._sum.add(
            package.model_parameters, float(package.data_size), source=f"client {package.cid}"
        )

    def _finish_round(self) -> None:
        assert self._sum is not None
        try:
            deserialize_model(self.model, self._sum.mean())
        finally:
            self._sum.reset()
            self._received = 0

    def global_update(self, buffer: list[FedAvgUplinkPackage]) -> None:
        """Replace the global model with the data-size-weighted mean of ``buffer``.

        Args:
            buffer: The round's packages (their order is the summation order).

        Raises:
            TensorMismatchError: If a package's parameters do not have the global model's
                layout; the message names the client and the expected layout.
            InvalidWeightsError: If every ``data_size`` is zero.
        """
        if not buffer:
            raise ValueError("global_update needs at least one uplink package")
        if self._sum is not None:
            self._sum.reset()
        self._received = 0
        for package in buffer:
            self._fold(package)
        self._finish_round()

    def _check_uplink(self, package: FedAvgUplinkPackage, dim: int) -> None:
        params = package.model_parameters
        if (
            not isinstance(params, torch.Tensor)
            or params.dtype != torch.float32
            or params.dim() != 1
            or params.numel() != dim
        ):
            got = (
                f"shape {tuple(params.shape)} and dtype {params.dtype}"
                if isinstance(params, torch.Tensor)
                else f"a {type(params).__name__}"
            )
            raise TensorMismatchError(
                f"client {package.cid} sent model_parameters with {got}; expected a flat "
                f"torch.float32 tensor of {dim} elements, serialize_model() of the global "
                f"model (layout: {_describe_state(self.model)})"
            )

    @staticmethod
    def aggregate(parameters_list: list[torch.Tensor], weights_list: list[int]) -> torch.Tensor:
        """Return the weighted mean of flat parameter tensors (BlazeFL's helper).

        Args:
            parameters_list: Flat float32 tensors of one length.
            weights_list: One weight per tensor (data sizes).

        Returns:
            A new tensor.
        """
        total = WeightedSum(parameters_list[0].numel(), name="parameters")
        for i, (params, weight) in enumerate(zip(parameters_list, weights_list, strict=True)):
            total.add(params.detach().to(torch.float32), float(weight), source=f"tensor {i}")
        return total.mean()

    @staticmethod
    def evaluate(
        model: torch.nn.Module,
        test_loader: DataLoader[Any],
        device: str,
        *,
        num_threads: int = 1,
    ) -> tuple[float, float]:
        """Return ``(average loss, accuracy)`` of ``model`` on ``test_loader``
        (:func:`emberfl.evaluation.evaluate`: the same for any ``num_threads``).

        Raises:
            ValueError: If the loader yields no sample or ``num_threads < 1``.
        """
        return evaluate(model, test_loader, device, num_threads=num_threads)

    def get_summary(self) -> dict[str, float]:
        """Evaluate the global model on the server's test split.

        Returns:
            ``{"server_acc": ..., "server_loss": ...}``.
        """
        loader = self.dataset.get_dataloader(
            type_=FedAvgPartitionType.TEST,
            cid=None,
            batch_size=self.batch_size,
            generator=self.rng_suite.torch_cpu,
        )
        loss, acc = FedAvgBaseServerHandler.evaluate(
            self.model, loader, self.device, num_threads=self.evaluation_threads
        )
        return {"server_acc": acc, "server_loss": loss}

    def downlink_package(self) -> FedAvgDownlinkPackage:
        """Return the global model, serialized."""
        return FedAvgDownlinkPackage(serialize_model(self.model))

    def close(self) -> None:
        """Drop the round's running sum (it is re-created when needed)."""
        self._sum = None
        self._received = 0

    def __enter__(self) -> FedAvgBaseServerHandler:
        """Return the handler; :meth:`close` runs on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Call :meth:`close`."""
        self.close()


def _fedavg_train(
    model: torch.nn.Module,
    model_parameters: torch.Tensor,
    train_loader: DataLoader[Any],
    device: str,
    epochs: int,
    lr: float,
    stop_event: threading.Event | None,
    *,
    cid: int = 0,
    round_: int = 0,
    seed: int = 0,
) -> tuple[torch.Tensor, int]:
    """Run FedAvg's local SGD on ``model`` (:func:`~emberfl.algorithms.local_sgd.train_locally`).

    ``cid``, ``round_`` and ``seed`` key the client's dropout stream.

    Returns:
        The trained model's flat state and the number of training samples.
    """
    dataset = train_loader.dataset
    data_size = len(dataset) if isinstance(dataset, Sized) else 0
    client = Client(
        cid=cid,
        round=round_,
        seed=seed,
        device=device,
        model=model,
        layout=ModelLayout.of(model),
        broadcast={"model": model_parameters},
        state={},
        state_is_new=True,
        loader_factory=lambda _split, _generator: train_loader,
        num_samples=data_size,
        stop_event=stop_event,
    )
    result, _ = train_locally(FedAvg(lr=lr, epochs=epochs), client)
    return result.model, data_size


def _client_loader(
    dataset: FedAvgPartitionedDataset, cid: int, batch_size: int, seed: int, round_: int
) -> DataLoader[Any]:
    rng = client_rng_suite(seed, cid, round_)
    return dataset.get_dataloader(
        type_=FedAvgPartitionType.TRAIN, cid=cid, batch_size=batch_size, generator=rng.torch_cpu
    )


class FedAvgBaseClientTrainer(BaseClientTrainer[FedAvgUplinkPackage, FedAvgDownlinkPackage]):
    """Serial FedAvg clients: one model, trained for each client in turn.

    Attributes:
        model: The local model.
        dataset: The partitioned data set.
        device: Where to train.
        num_clients: Number of clients.
        epochs: Local epochs.
        batch_size: Local batch size.
        lr: SGD learning rate.
        seed: The experiment seed.
        round: Number of ``local_process`` calls completed (the client streams' round).
        cache: Packages waiting for :meth:`uplink_package`.
        intra_op_threads: PyTorch's intra-op thread count while training (``None``: leave).
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
        intra_op_threads: int | None = 1,
        fast_layers: bool = True,
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
            intra_op_threads: PyTorch's intra-op thread count while training.
            fast_layers: Train with emberfl's CPU kernels where they compute exactly what
                PyTorch's do, bit for bit (:func:`emberfl.nn.use_fast_layers`).
        """
        self.model = model_selector.select_model(model_name)
        if fast_layers:
            use_fast_layers(self.model)
        self.dataset = dataset
        self.device = device
        self.num_clients = num_clients
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.intra_op_threads = intra_op_threads
        self.round = 0
        self.model.to(device)
        self.cache: list[FedAvgUplinkPackage] = []

    def local_process(self, payload: FedAvgDownlinkPackage, cid_list: list[int]) -> None:
        """Train every client of ``cid_list`` in turn.

        Args:
            payload: The global model.
            cid_list: The clients of this round.

        Raises:
            ClientError: If a client's training raised (nothing is cached).
        """
        results = []
        with intra_op_threads(self.intra_op_threads):
            for cid in cid_list:
                loader = _client_loader(self.dataset, cid, self.batch_size, self.seed, self.round)
                try:
                    results.append(self.train(payload.model_parameters, loader, cid))
                except Exception as exc:
                    raise ClientError(cid, f"{type(exc).__name__}: {exc}", _tb(exc)) from exc
        self.cache.extend(results)
        self.round += 1

    def train(
        self, model_parameters: torch.Tensor, train_loader: DataLoader[Any], cid: int
    ) -> FedAvgUplinkPackage:
        """Train the local model from ``model_parameters`` on one client's data.

        Args:
            model_parameters: The global model.
            train_loader: The client's training data.
            cid: The client id.

        Returns:
            The client's uplink package.
        """
        params, data_size = _fedavg_train(
            self.model,
            model_parameters,
            train_loader,
            self.device,
            self.epochs,
            self.lr,
            None,
            cid=cid,
            round_=self.round,
            seed=self.seed,
        )
        return FedAvgUplinkPackage(cid, params, data_size)

    def uplink_package(self) -> list[FedAvgUplinkPackage]:
        """Return (and clear) the cached packages."""
        package, self.cache = self.cache, []
        return package


def _tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


@dataclass
class FedAvgClientConfig:
    """Everything a worker process needs to train one client.

    Attributes:
        model_selector: Builds the local model.
        model_name: Which model.
        dataset: The partitioned data set (sent to each worker once).
        epochs: Local epochs.
        batch_size: Local batch size.
        lr: SGD learning rate.
        cid: The client id.
        seed: The experiment seed (the client's stream is ``(seed, cid, round)``).
        state_path: Kept for BlazeFL compatibility; emberfl has no per-client state file.
        round: The round (drives the client's generators).
        fast_layers: Train with emberfl's bitwise-equivalent CPU kernels.
        model_template: A model of the architecture (:class:`ModelTemplate`), copied for
            each client instead of calling ``model_selector`` in the worker (``None``:
            call it). Its values never matter: every client loads the global model into
            its copy.
    """

    model_selector: ModelSelector[Any]
    model_name: str
    dataset: FedAvgPartitionedDataset
    epochs: int
    batch_size: int
    lr: float
    cid: int
    seed: int
    state_path: Path | None = None
    round: int = 0
    fast_layers: bool = True
    model_template: ModelTemplate | None = None


def _train_from_config(
    config: FedAvgClientConfig,
    payload: FedAvgDownlinkPackage,
    device: str,
    stop_event: threading.Event,
) -> FedAvgProcessPoolUplinkPackage:
    if config.model_template is not None:
        model = copy.deepcopy(config.model_template.model)
    else:
        model = config.model_selector.select_model(config.model_name)
        if config.fast_layers:
            use_fast_layers(model)
    loader = _client_loader(
        config.dataset, config.cid, config.batch_size, config.seed, config.round
    )
    return FedAvgProcessPoolClientTrainer.train(
        model=model,
        model_parameters=payload.model_parameters,
        train_loader=loader,
        device=device,
        epochs=config.epochs,
        lr=config.lr,
        stop_event=stop_event,
        cid=config.cid,
        seed=config.seed,
        round_=config.round,
    )


class FedAvgProcessPoolClientTrainer(
    ProcessPoolClientTrainer[
        FedAvgUplinkPackage,
        FedAvgDownlinkPackage,
        FedAvgClientConfig,
        FedAvgProcessPoolUplinkPackage,
    ]
):
    """FedAvg clients in a persistent pool of worker processes.

    Use it as a context manager (or call :meth:`shutdown`) to stop the workers.

    Attributes:
        model_selector: Builds the local model.
        model_name: Which model.
        state_dir: Accepted for BlazeFL compatibility and unused: a client's generators
            are a function of ``(seed, cid, round)``, so there is no state to save.
        dataset: The partitioned data set.
        device: Where to train.
        num_clients: Number of clients.
        epochs: Local epochs.
        batch_size: Local batch size.
        lr: SGD learning rate.
        seed: The experiment seed.
        num_parallels: Number of worker processes.
        round: Number of ``local_process`` calls completed.
    """

    def __init__(
        self,
        model_selector: ModelSelector[Any],
        model_name: str,
        state_dir: Path | str | None,
        dataset: FedAvgPartitionedDataset,
        device: str,
        num_clients: int,
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int,
        num_parallels: int,
        *,
        intra_op_threads: int | None = 1,
        start_workers: bool = True,
        fast_layers: bool = True,
        start_method: StartMethod = "auto",
        share_dir: Path | str | None = None,
        ipc_mode: IPCMode | str | None = None,
    ) -> None:
        """Create the trainer and start its worker processes in the background.

        Args:
            model_selector: Builds the local model (sent to each worker once).
            model_name: Which model.
            state_dir: Ignored; see the class attributes.
            dataset: The partitioned data set (sent to each worker once).
            device: Where to train.
            num_clients: Number of clients.
            epochs: Local epochs.
            batch_size: Local batch size.
            lr: SGD learning rate.
            seed: The experiment seed.
            num_parallels: Number of worker processes.
            intra_op_threads: PyTorch's intra-op thread count in each worker.
            start_workers: Start the workers now (see :meth:`start`) rather than on the
                first round.
            fast_layers: Train with emberfl's CPU kernels where they compute exactly what
                PyTorch's do, bit for bit (:func:`emberfl.nn.use_fast_layers`).
            start_method: How the workers start (``"auto"``: forked where safe, else
                spawned; see :class:`~emberfl.core.ProcessPoolClientTrainer`).
            share_dir: BlazeFL 2.x's directory for ``IPCMode.STORAGE`` files (created).
            ipc_mode: BlazeFL 2.x's :class:`~emberfl.core.IPCMode` (either spelling);
                ``None`` means ``SHARED_MEMORY``. Both modes give the same bits.
        """
        self.num_parallels = num_parallels
        self.ipc_mode = IPCMode(ipc_mode) if ipc_mode is not None else IPCMode.SHARED_MEMORY
        self.share_dir = Path(share_dir) if share_dir is not None else None
        if self.share_dir is not None:
            self.share_dir.mkdir(parents=True, exist_ok=True)
        self.start_method = start_method
        self.device = device
        self.device_count = torch.cuda.device_count()
        self.cache: list[FedAvgUplinkPackage] = []
        self.model_selector = model_selector
        self.model_name = model_name
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.dataset = dataset
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.num_clients = num_clients
        self.seed = seed
        self.round = 0
        self.intra_op_threads = intra_op_threads
        self.fast_layers = fast_layers
        self.stop_event = multiprocessing.get_context("spawn").Event()  # type: ignore[assignment]
        template = model_selector.select_model(model_name)
        if fast_layers:
            use_fast_layers(template)
        self.model_parameters_buffer = serialize_model(template)
        # Sent to each worker once and copied per client, like the thread trainer's
        # template: building a model (select_model) in a fresh worker costs milliseconds
        # per client, and seeding PyTorch there imports TorchDynamo (seconds) in round 1.
        self._template = _template_of(template)
        if start_workers:
            self.start()

    def progress_fn(
        self, it: list[ClientJob[FedAvgProcessPoolUplinkPackage]]
    ) -> Iterable[ClientJob[FedAvgProcessPoolUplinkPackage]]:
        """Return the jobs unchanged (override to add a progress bar)."""
        return it

    def prepare_uplink_package_buffer(self) -> FedAvgProcessPoolUplinkPackage:
        """Return a buffer shaped like one client's result."""
        return FedAvgProcessPoolUplinkPackage(-1, self.model_parameters_buffer, 0)

    def convert_buffer_to_uplink(
        self, buffer: FedAvgProcessPoolUplinkPackage
    ) -> FedAvgUplinkPackage:
        """Turn the rebuilt buffer into a :class:`FedAvgUplinkPackage`.

        Args:
            buffer: The client's rebuilt buffer.

        Returns:
            The uplink package.
        """
        if not isinstance(buffer.model_parameters, torch.Tensor):
            raise TensorMismatchError(
                f"client {buffer.cid}: model_parameters was not restored from shared memory"
            )
        return FedAvgUplinkPackage(
            buffer.cid, buffer.model_parameters, buffer.data_size, buffer.metadata
        )

    @staticmethod
    def worker(  # type: ignore[override]  # BlazeFL 2.x's storage mode passes paths
        config: FedAvgClientConfig | Path,
        payload: FedAvgDownlinkPackage | Path,
        device: str,
        stop_event: threading.Event,
        *,
        shm_buffer: FedAvgProcessPoolUplinkPackage | None = None,
    ) -> FedAvgProcessPoolUplinkPackage | Path:
        """Train one client in a worker process.

        Args:
            config: The client's configuration, or (``IPCMode.STORAGE``) the path of the
                file it was saved to.
            payload: The global model (a read-only view of shared memory), or
                (``IPCMode.STORAGE``) the path of the file it was saved to.
            device: Where to train.
            stop_event: Stops training between batches once set.
            shm_buffer: This worker's arena slot, as a package.

        Returns:
            The package, with ``model_parameters`` left in ``shm_buffer``; in storage
            mode, the path of the file the package was saved to (the config's).
        """
        if isinstance(config, str | os.PathLike) or isinstance(payload, str | os.PathLike):
            config_path = Path(cast(Path, config))
            loaded_config = torch.load(config_path, weights_only=False)
            loaded_payload = torch.load(cast(Path, payload), weights_only=False)
            result = _train_from_config(loaded_config, loaded_payload, device, stop_event)
            torch.save(result, config_path)
            return config_path
        package = _train_from_config(config, payload, device, stop_event)
        if shm_buffer is None or not isinstance(shm_buffer.model_parameters, torch.Tensor):
            raise RuntimeError("shm_buffer must be a pre-allocated shared-memory package")
        params = package.model_parameters
        target = shm_buffer.model_parameters
        if (
            not isinstance(params, torch.Tensor)
            or params.shape != target.shape
            or params.dtype != target.dtype
        ):
            got = (
                f"shape {tuple(params.shape)} and dtype {params.dtype}"
                if isinstance(params, torch.Tensor)
                else f"a {type(params).__name__}"
            )
            raise TensorMismatchError(
                f"client {config.cid} produced model_parameters with {got}; the uplink "
                f"layout expects shape {tuple(target.shape)} and dtype {target.dtype}"
            )
        target.copy_(params)
        package.model_parameters = SHMHandle()
        return package

    @staticmethod
    def train(
        model: torch.nn.Module,
        model_parameters: torch.Tensor,
        train_loader: DataLoader[Any],
        device: str,
        epochs: int,
        lr: float,
        stop_event: threading.Event,
        cid: int,
        *,
        seed: int = 0,
        round_: int = 0,
    ) -> FedAvgProcessPoolUplinkPackage:
        """Train ``model`` from ``model_parameters`` on one client's data.

        Args:
            model: A fresh local model.
            model_parameters: The global model.
            train_loader: The client's training data.
            device: Where to train.
            epochs: Local epochs.
            lr: SGD learning rate.
            stop_event: Stops training between batches once set.
            cid: The client id.
            seed: The experiment seed (keys the client's dropout stream).
            round_: The round (keys the client's dropout stream).

        Returns:
            The client's package.
        """
        params, data_size = _fedavg_train(
            model,
            model_parameters,
            train_loader,
            device,
            epochs,
            lr,
            stop_event,
            cid=cid,
            round_=round_,
            seed=seed,
        )
        return FedAvgProcessPoolUplinkPackage(cid, params, data_size)

    def get_client_config(self, cid: int) -> FedAvgClientConfig:
        """Return client ``cid``'s configuration for the current round."""
        return FedAvgClientConfig(
            model_selector=self.model_selector,
            model_name=self.model_name,
            dataset=self.dataset,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            cid=cid,
            seed=self.seed,
            state_path=self.state_dir / f"{cid}.pt" if self.state_dir is not None else None,
            round=self.round,
            fast_layers=getattr(self, "fast_layers", True),
            model_template=getattr(self, "_template", None),
        )

    def local_process(self, payload: FedAvgDownlinkPackage, cid_list: list[int]) -> None:
        """Train ``cid_list`` in the worker processes (see the base class).

        Args:
            payload: The global model.
            cid_list: The clients of this round.
        """
        super().local_process(payload, cid_list)
        self.round += 1

    def uplink_package(self) -> list[FedAvgUplinkPackage]:
        """Return (and clear) the cached packages."""
        package, self.cache = self.cache, []
        return package


class FedAvgThreadPoolClientTrainer(
    ThreadPoolClientTrainer[FedAvgUplinkPackage, FedAvgDownlinkPackage]
):
    """FedAvg clients in a thread pool.

    Each client trains its own copy of the model; PyTorch releases the GIL inside its
    kernels, so threads run in parallel.

    Attributes:
        model_selector: Builds the local model.
        model_name: Which model.
        dataset: The partitioned data set.
        device: Where to train.
        num_clients: Number of clients.
        epochs: Local epochs.
        batch_size: Local batch size.
        lr: SGD learning rate.
        seed: The experiment seed.
        num_parallels: Number of threads.
        round: Number of ``local_process`` calls completed.
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
        num_parallels: int,
        *,
        intra_op_threads: int | None = 1,
        fast_layers: bool = True,
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
            num_parallels: Number of threads.
            intra_op_threads: PyTorch's intra-op thread count while the pool runs.
            fast_layers: Train with emberfl's CPU kernels where they compute exactly what
                PyTorch's do, bit for bit (:func:`emberfl.nn.use_fast_layers`).
        """
        self.num_parallels = num_parallels
        self.device = device
        self.device_count = torch.cuda.device_count()
        self.cache: list[FedAvgUplinkPackage] = []
        self.model_selector = model_selector
        self.model_name = model_name
        self.dataset = dataset
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.num_clients = num_clients
        self.seed = seed
        self.round = 0
        self.intra_op_threads = intra_op_threads
        self.stop_event = threading.Event()
        # Copies of one template instead of select_model() per client: building a model
        # in a thread would draw from PyTorch's global generator.
        self._template = model_selector.select_model(model_name)
        if fast_layers:
            use_fast_layers(self._template)

    def progress_fn(
        self, it: list[Future[FedAvgUplinkPackage]]
    ) -> Iterable[Future[FedAvgUplinkPackage]]:
        """Return the futures unchanged (override to add a progress bar)."""
        return it

    def worker(
        self,
        cid: int,
        device: str,
        payload: FedAvgDownlinkPackage,
        stop_event: threading.Event,
    ) -> FedAvgUplinkPackage:
        """Train one client in a pool thread.

        Args:
            cid: The client id.
            device: Where to train.
            payload: The global model.
            stop_event: Stops training between batches once set.

        Returns:
            The client's uplink package.
        """
        model = copy.deepcopy(self._template)
        loader = _client_loader(self.dataset, cid, self.batch_size, self.seed, self.round)
        return self.train(
            model=model,
            model_parameters=payload.model_parameters,
            train_loader=loader,
            device=device,
            epochs=self.epochs,
            lr=self.lr,
            stop_event=stop_event,
            cid=cid,
        )

    def train(
        self,
        model: torch.nn.Module,
        model_parameters: torch.Tensor,
        train_loader: DataLoader[Any],
        device: str,
        epochs: int,
        lr: float,
        stop_event: threading.Event,
        cid: int,
    ) -> FedAvgUplinkPackage:
        """Train ``model`` from ``model_parameters`` on one client's data.

        Args:
            model: The client's copy of the model.
            model_parameters: The global model.
            train_loader: The client's training data.
            device: Where to train.
            epochs: Local epochs.
            lr: SGD learning rate.
            stop_event: Stops training between batches once set.
            cid: The client id.

        Returns:
            The client's uplink package.
        """
        params, data_size = _fedavg_train(
            model,
            model_parameters,
            train_loader,
            device,
            epochs,
            lr,
            stop_event,
            cid=cid,
            round_=self.round,
            seed=self.seed,
        )
        return FedAvgUplinkPackage(cid, params, data_size)

    def local_process(self, payload: FedAvgDownlinkPackage, cid_list: list[int]) -> None:
        """Train ``cid_list`` in the thread pool (see the base class).

        Args:
            payload: The global model.
            cid_list: The clients of this round.
        """
        super().local_process(payload, cid_list)
        self.round += 1

    def uplink_package(self) -> list[FedAvgUplinkPackage]:
        """Return (and clear) the cached packages."""
        package, self.cache = self.cache, []
        return package


def _template_of(model: torch.nn.Module) -> ModelTemplate | None:
    """Wrap ``model``, or ``None`` if it does not pickle (workers then call the selector)."""
    try:
        return ModelTemplate(model)
    except Exception:
        return None

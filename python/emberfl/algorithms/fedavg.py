"""Federated Averaging (McMahan et al., 2017) on emberfl's simulation core.

The classes, constructor arguments and packages are BlazeFL 3.0's ``blazefl.contrib.fedavg``
ones. Two things are stronger than in BlazeFL:

* Every client draws its randomness (data-loader shuffling) from
  :func:`emberfl.reproducibility.client_rng_suite` ``(seed, cid, round)`` and trains with
  one intra-op thread, so the global model after any number of rounds is bitwise
  identical across runs, across ``num_parallels`` and across the serial, thread-pool and
  process-pool trainers.
* The server averages client models with :func:`emberfl.aggregation.weighted_mean` on a
  shared-memory arena (Rust, deterministic for any thread count), weighting each client
  by the size of its training set, in the order the clients were listed in ``cid_list``.
"""

from __future__ import annotations

import copy
import multiprocessing
import pickle
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader

from emberfl.core import (
    BaseClientTrainer,
    BaseServerHandler,
    ClientJob,
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
from emberfl.core.batches import iter_batches
from emberfl.errors import ClientError, ConfigError, TensorMismatchError
from emberfl.nn import use_fast_layers
from emberfl.reproducibility import RNGSuite, client_rng_suite, create_rng_suite
from emberfl.rng import Purpose, stream

_R = TypeVar("_R")

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


class FedAvgPartitionType(StrEnum):
    """The splits FedAvg uses."""

    TRAIN = "train"
    TEST = "test"


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
        client_buffer_cache: Packages received in the current round.
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
        self._arena: Any = None

    def sample_clients(self) -> list[int]:
        """Sample ``num_clients_per_round`` distinct clients for the current round.

        The sample is a pure function of ``(seed, round)`` (emberfl stream with purpose
        ``CLIENT_SAMPLING``), so a resumed run samples the same clients.

        Returns:
            The sorted client ids.
        """
        draw = stream(self.seed, purpose=Purpose.CLIENT_SAMPLING, round=self.round)
        return sorted(int(c) for c in draw.choice(self.num_clients, self.num_clients_per_round))

    def is_stopped(self) -> bool:
        """Return ``True`` once ``global_round`` rounds have completed."""
        return self.round >= self.global_round

    def load(self, payload: FedAvgUplinkPackage) -> bool:
        """Buffer one client's package; aggregate once the round is complete.

        Args:
            payload: A client's uplink package.

        Returns:
            ``True`` if this package completed the round.
        """
        self.client_buffer_cache.append(payload)
        if len(self.client_buffer_cache) < self.num_clients_per_round:
            return False
        self.global_update(self.client_buffer_cache)
        self.round += 1
        self.client_buffer_cache = []
        return True

    def global_update(self, buffer: list[FedAvgUplinkPackage]) -> None:
        """Replace the global model with the data-size-weighted mean of ``buffer``.

        Args:
            buffer: The round's packages (their order is the summation order).

        Raises:
            TensorMismatchError: If a package's parameters do not have the global model's
                layout; the message names the client and the expected layout.
            InvalidWeightsError: If every ``data_size`` is zero.
        """
        from emberfl.aggregation import weighted_mean

        if not buffer:
            raise ValueError("global_update needs at least one uplink package")
        arena = self._aggregation_arena(len(buffer) + 1)
        for slot, package in enumerate(buffer):
            self._check_uplink(package, arena.dim)
            arena.slot(slot).copy_(package.model_parameters)
        out = len(buffer)
        weighted_mean(
            arena,
            list(range(len(buffer))),
            [float(p.data_size) for p in buffer],
            out,
            num_threads=self.aggregation_threads,
        )
        deserialize_model(self.model, arena.slot(out))

    def _aggregation_arena(self, num_slots: int) -> Any:
        from emberfl.arena import ParamArena

        if self._arena is None or self._arena.num_slots < num_slots:
            self.close()
            template = {"model_parameters": serialize_model(self.model)}
            self._arena = ParamArena.from_model(
                template, max(num_slots, self.num_clients_per_round + 1)
            )
        return self._arena

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
        from emberfl.aggregation import weighted_mean
        from emberfl.arena import ParamArena

        n = len(parameters_list)
        template = {"model_parameters": parameters_list[0].detach().float()}
        with ParamArena.from_model(template, n + 1) as arena:
            for i, params in enumerate(parameters_list):
                arena.slot(i).copy_(params.reshape(-1))
            weighted_mean(arena, list(range(n)), [float(w) for w in weights_list], n)
            return arena.slot(n).clone()

    @staticmethod
    def evaluate(
        model: torch.nn.Module,
        test_loader: DataLoader[Any],
        device: str,
        *,
        num_threads: int = 1,
    ) -> tuple[float, float]:
        """Return ``(average loss, accuracy)`` of ``model`` on ``test_loader``.

        Every batch's loss sum is computed on its own and the sums are added in batch
        order, so the result is the same for any ``num_threads``.

        Args:
            model: The model.
            test_loader: Yields ``(inputs, labels)``.
            device: Where to evaluate.
            num_threads: Batches evaluated at once, in threads (each runs PyTorch's
                kernels, which release the GIL, with PyTorch's intra-op thread count).

        Returns:
            Mean cross-entropy and accuracy.

        Raises:
            ValueError: If the loader yields no sample or ``num_threads < 1``.
        """
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        model.to(device)
        model.eval()
        criterion = torch.nn.CrossEntropyLoss(reduction="sum")

        def one(batch: Any) -> tuple[float, int, int]:
            inputs, labels = batch
            with torch.no_grad():  # per thread: grad mode is thread-local
                inputs, labels = inputs.to(device), labels.to(device)
                outputs = model(inputs)
                loss = float(criterion(outputs, labels).item())
                correct = int((outputs.argmax(dim=1) == labels).sum().item())
            return loss, correct, int(labels.size(0))

        total_loss = 0.0
        total_correct = 0
        total = 0
        for loss, correct, count in _in_order(one, iter_batches(test_loader), num_threads):
            total_loss += loss
            total_correct += correct
            total += count
        if total == 0:
            raise ValueError("the evaluation data loader must yield at least one sample")
        return total_loss / total, total_correct / total

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
        """Release the aggregation arena (it is re-created if needed)."""
        if self._arena is not None:
            self._arena.close()
            self._arena = None

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
) -> tuple[torch.Tensor, int]:
    """Run local SGD; stops between batches once ``stop_event`` is set.

    The update is plain SGD, ``p -= lr * grad``: the same arithmetic as
    ``torch.optim.SGD(lr=lr)`` on CPU, without importing ``torch.optim`` (whose first use
    imports TorchDynamo, several seconds in every fresh worker process).
    """
    first = next(model.parameters(), None)
    if first is None or first.device != torch.device(device):
        model.to(device)  # a no-op walk of every module otherwise, ~1 ms per client
    deserialize_model(model, model_parameters)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    criterion = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        for data, target in iter_batches(train_loader):
            if stop_event is not None and stop_event.is_set():
                break
            data, target = data.to(device), target.to(device)
            loss = criterion(model(data), target)
            for p in params:
                p.grad = None
            loss.backward()
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-lr)
        if stop_event is not None and stop_event.is_set():
            break
    dataset = train_loader.dataset
    data_size = len(dataset) if isinstance(dataset, Sized) else 0
    return serialize_model(model), data_size


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
            self.model, model_parameters, train_loader, self.device, self.epochs, self.lr, None
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
        """
        self.num_parallels = num_parallels
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
    def worker(
        config: FedAvgClientConfig,
        payload: FedAvgDownlinkPackage,
        device: str,
        stop_event: threading.Event,
        *,
        shm_buffer: FedAvgProcessPoolUplinkPackage | None = None,
    ) -> FedAvgProcessPoolUplinkPackage:
        """Train one client in a worker process.

        Args:
            config: The client's configuration.
            payload: The global model (a read-only view of shared memory).
            device: Where to train.
            stop_event: Stops training between batches once set.
            shm_buffer: This worker's arena slot, as a package.

        Returns:
            The package, with ``model_parameters`` left in ``shm_buffer``.
        """
        if config.model_template is not None:
            model = copy.deepcopy(config.model_template.model)
        else:
            model = config.model_selector.select_model(config.model_name)
            if config.fast_layers:
                use_fast_layers(model)
        loader = _client_loader(
            config.dataset, config.cid, config.batch_size, config.seed, config.round
        )
        package = FedAvgProcessPoolClientTrainer.train(
            model=model,
            model_parameters=payload.model_parameters,
            train_loader=loader,
            device=device,
            epochs=config.epochs,
            lr=config.lr,
            stop_event=stop_event,
            cid=config.cid,
        )
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

        Returns:
            The client's package.
        """
        params, data_size = _fedavg_train(
            model, model_parameters, train_loader, device, epochs, lr, stop_event
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
            model, model_parameters, train_loader, device, epochs, lr, stop_event
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


def _in_order(fn: Callable[[Any], _R], items: Iterable[Any], num_threads: int) -> Iterator[_R]:
    """Yield ``fn(item)`` for every item, in order, computing up to ``num_threads`` at once.

    At most ``2 * num_threads`` items are read ahead of the one being yielded.
    """
    if num_threads == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(num_threads, thread_name_prefix="emberfl-eval") as pool:
        pending: deque[Future[_R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * num_threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class ModelTemplate:
    """A model that travels to worker processes as one pickle, unpickled once there.

    Worker processes receive objects shared by all clients once, with their tensors moved
    to shared memory as plain tensors; this wrapper holds the model's pickle instead, so
    its parameters come back as ``nn.Parameter`` with their ``requires_grad``.

    Attributes:
        data: The model, pickled.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        """Pickle ``model``.

        Raises:
            Exception: Whatever pickling the model raises (a lambda, a local class).
        """
        self.data = pickle.dumps(model)
        self._model: torch.nn.Module | None = None

    @property
    def model(self) -> torch.nn.Module:
        """The model (unpickled on first use, then cached; copy it before training)."""
        if self._model is None:
            self._model = pickle.loads(self.data)
        return self._model

    def __getstate__(self) -> dict[str, Any]:
        """Send the pickle only."""
        return {"data": self.data, "_model": None}


def _template_of(model: torch.nn.Module) -> ModelTemplate | None:
    """Wrap ``model``, or ``None`` if it does not pickle (workers then call the selector)."""
    try:
        return ModelTemplate(model)
    except Exception:
        return None

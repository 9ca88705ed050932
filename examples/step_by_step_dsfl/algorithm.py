"""DS-FL (Itahara et al., IEEE TMC 2021) built from emberfl's public protocols.

Distillation-Based Semi-Supervised FL: clients never send parameters. In every round

1. the server broadcasts the aggregated soft labels of the previous round (with the open-set
   indices they belong to) and the indices of this round's open-set batch;
2. each client distils its own model towards those soft labels, trains it on its private
   data, and uploads its predicted probabilities on this round's open-set batch;
3. the server aggregates them with **entropy-reduction averaging** (ERA: average, then
   sharpen with a temperature ``T < 1``) and distils its own model on the open set towards
   the result, which becomes the next round's broadcast.

Clients keep their models between rounds (and may each use a different architecture).

The pieces are the usual emberfl ones: two package dataclasses, a
:class:`~emberfl.core.BaseServerHandler` and two client trainers (serial and process
pool). Every random choice comes from an emberfl stream, and every client and the server
compute with one intra-op thread, so a run is bitwise reproducible and the serial and
process-pool trainers give identical results.
"""

from __future__ import annotations

import math
import multiprocessing
import threading
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch
import torch.nn.functional as F
from dataset import DSFLPartitionedDataset, DSFLPartitionType
from models import DSFLModelSelector
from torch.utils.data import DataLoader

from emberfl.aggregation import weighted_mean
from emberfl.arena import ParamArena
from emberfl.core import (
    BaseClientTrainer,
    BaseServerHandler,
    ClientJob,
    IPCMode,
    ProcessPoolClientTrainer,
    SHMHandle,
    intra_op_threads,
)
from emberfl.errors import ClientError, ConfigError, TensorMismatchError
from emberfl.reproducibility import client_rng_suite
from emberfl.rng import Purpose, stream

__all__ = [
    "OPEN_SET_PURPOSE",
    "DSFLBaseClientTrainer",
    "DSFLClientConfig",
    "DSFLDownlinkPackage",
    "DSFLProcessPoolClientTrainer",
    "DSFLProcessPoolUplinkPackage",
    "DSFLServerHandler",
    "DSFLUplinkPackage",
    "client_round",
    "distill",
    "entropy_reduction_aggregation",
    "evaluate",
    "predict",
    "train_private",
]

OPEN_SET_PURPOSE: Final[int] = 100
"""The stream purpose of the open-set batch draws; outside :class:`emberfl.rng.Purpose`'s
values, so it never collides with emberfl's own streams."""

StateDict = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------
# The packages
# ------------------------------------------------------------------------------------------


@dataclass
class DSFLUplinkPackage:
    """What a client sends to the server: predictions, never parameters.

    Attributes:
        cid: The client id.
        soft_labels: float32 ``(n, num_classes)`` class probabilities on the open set.
        indices: int64 ``(n,)``: which open-set samples ``soft_labels`` are about.
        metadata: The client's own metrics (``"loss"`` and ``"acc"`` on the test split).
    """

    cid: int
    soft_labels: torch.Tensor
    indices: torch.Tensor
    metadata: dict[str, float] = field(default_factory=dict)


@dataclass
class DSFLDownlinkPackage:
    """What the server broadcasts.

    Attributes:
        soft_labels: The ERA-aggregated soft labels of the previous round, ``None`` in the
            first round.
        indices: The open-set samples they are about, ``None`` in the first round.
        next_indices: The open-set samples the clients predict on this round.
    """

    soft_labels: torch.Tensor | None
    indices: torch.Tensor | None
    next_indices: torch.Tensor


# ------------------------------------------------------------------------------------------
# The algorithm's building blocks, shared by the server and both client trainers
# ------------------------------------------------------------------------------------------


def entropy_reduction_aggregation(
    soft_labels: Sequence[torch.Tensor], temperature: float, *, num_threads: int | None = None
) -> torch.Tensor:
    """DS-FL's entropy-reduction averaging: ``softmax(log(mean_k p_k) / T)`` per sample.

    The mean over clients is taken by emberfl's Rust kernel (float64 sums in client order,
    the same for any ``num_threads``). Dividing the log-probabilities by ``T < 1`` sharpens
    the average, i.e. raises each probability to the power ``1/T`` and renormalises.

    Args:
        soft_labels: One ``(n, num_classes)`` probability tensor per client, all of one
            shape.
        temperature: ``T > 0``; below 1 sharpens, 1 leaves the average unchanged.
        num_threads: Threads of the averaging kernel (the result does not depend on it).

    Returns:
        float32 ``(n, num_classes)`` probabilities.

    Raises:
        ValueError: If ``soft_labels`` is empty.
        ConfigError: If ``temperature`` is not a positive finite number.
        TensorMismatchError: If the tensors differ in shape.
    """
    if not soft_labels:
        raise ValueError("entropy_reduction_aggregation needs at least one client's soft labels")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"the ERA temperature must be positive and finite, got {temperature}")
    shape = soft_labels[0].shape
    for k, labels in enumerate(soft_labels):
        if labels.shape != shape:
            raise TensorMismatchError(
                f"soft labels {k} have shape {tuple(labels.shape)}, soft labels 0 have "
                f"{tuple(shape)}; every client must predict on the same open-set samples"
            )
    count = len(soft_labels)
    template = {"soft_labels": torch.zeros(shape, dtype=torch.float32)}
    with ParamArena.from_model(template, count + 1) as arena:
        for k, labels in enumerate(soft_labels):
            arena.slot(k).copy_(labels.detach().reshape(-1))
        weighted_mean(arena, list(range(count)), [1.0] * count, count, num_threads=num_threads)
        mean = arena.slot(count).clone().view(shape)
    log_mean = mean.clamp_min(torch.finfo(torch.float32).tiny).log()
    return torch.softmax(log_mean / temperature, dim=-1)


def _stopped(stop_event: threading.Event | None) -> bool:
    return stop_event is not None and stop_event.is_set()


def distill(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    device: str,
    stop_event: threading.Event | None = None,
) -> None:
    """Train ``model`` to match ``targets`` on ``inputs`` (KL divergence, Adam).

    Batches are taken in order (the open-set batch is already a random draw), so
    distillation draws no random numbers.

    Args:
        model: The model to update in place.
        inputs: Open-set images ``(n, ...)``.
        targets: Probabilities ``(n, num_classes)``.
        epochs: Passes over the batch.
        batch_size: Samples per step.
        lr: Adam's learning rate (a fresh optimizer per call: no state is kept).
        device: Where to compute.
        stop_event: Return early (between steps) once set.
    """
    model.to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    inputs, targets = inputs.to(device), targets.to(device)
    for _ in range(epochs):
        for start in range(0, inputs.shape[0], batch_size):
            if _stopped(stop_event):
                return
            log_probs = F.log_softmax(model(inputs[start : start + batch_size]), dim=1)
            loss = F.kl_div(log_probs, targets[start : start + batch_size], reduction="batchmean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def train_private(
    model: torch.nn.Module,
    loader: DataLoader[Any],
    *,
    epochs: int,
    lr: float,
    device: str,
    stop_event: threading.Event | None = None,
) -> None:
    """Train ``model`` on a client's labelled private data (cross-entropy, Adam).

    Args:
        model: The model to update in place.
        loader: Yields ``(images, labels)``; its shuffling generator decides the order.
        epochs: Passes over the data.
        lr: Adam's learning rate (a fresh optimizer per call: no state is kept).
        device: Where to compute.
        stop_event: Return early (between steps) once set.
    """
    model.to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for images, labels in loader:
            if _stopped(stop_event):
                return
            loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def predict(
    model: torch.nn.Module, inputs: torch.Tensor, *, batch_size: int, device: str
) -> torch.Tensor:
    """Return ``model``'s class probabilities on ``inputs`` (float32, on the CPU).

    Args:
        model: The model.
        inputs: Images ``(n, ...)``.
        batch_size: Samples per forward pass.
        device: Where to compute.

    Returns:
        ``(n, num_classes)`` probabilities.
    """
    model.to(device)
    model.eval()
    with torch.no_grad():
        chunks = [
            F.softmax(model(inputs[start : start + batch_size].to(device)), dim=1)
            for start in range(0, inputs.shape[0], batch_size)
        ]
    return torch.cat(chunks).float().cpu()


def evaluate(model: torch.nn.Module, loader: DataLoader[Any], device: str) -> tuple[float, float]:
    """Return ``(mean cross-entropy, accuracy)`` of ``model`` on ``loader``.

    Args:
        model: The model.
        loader: Yields ``(images, labels)``.
        device: Where to compute.

    Returns:
        The loss and the accuracy.

    Raises:
        ValueError: If the loader yields no sample.
    """
    model.to(device)
    model.eval()
    total_loss, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images.to(device))
            labels = labels.to(device)
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels).sum())
            total += int(labels.numel())
    if total == 0:
        raise ValueError("the evaluation loader yielded no sample")
    return total_loss / total, correct / total


def client_round(
    model: torch.nn.Module,
    payload: DSFLDownlinkPackage,
    dataset: DSFLPartitionedDataset,
    *,
    cid: int,
    round_: int,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    kd_epochs: int,
    kd_batch_size: int,
    kd_lr: float,
    device: str,
    stop_event: threading.Event | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Run one client's round: distil, train on private data, predict, evaluate.

    The distillation uses the previous round's aggregated soft labels (DS-FL's last step of
    that round, done when the client is next sampled); the only random numbers, the order
    of the private batches, come from ``client_rng_suite(seed, cid, round_)``.

    Args:
        model: The client's model (updated in place).
        payload: The server's broadcast.
        dataset: The partitioned data set.
        cid: The client id.
        round_: The trainer's round (selects the client's stream).
        seed: The experiment seed.
        epochs: Private-data epochs.
        batch_size: Private-data and prediction batch size.
        lr: Private-data learning rate.
        kd_epochs: Distillation epochs.
        kd_batch_size: Distillation batch size.
        kd_lr: Distillation learning rate.
        device: Where to compute.
        stop_event: Stop early (between steps) once set.

    Returns:
        The soft labels on ``payload.next_indices`` and the client's test metrics.
    """
    if payload.soft_labels is not None and payload.indices is not None:
        distill(
            model,
            dataset.open_images(payload.indices),
            payload.soft_labels,
            epochs=kd_epochs,
            batch_size=kd_batch_size,
            lr=kd_lr,
            device=device,
            stop_event=stop_event,
        )
    rng = client_rng_suite(seed, cid, round_)
    loader = dataset.get_dataloader(
        DSFLPartitionType.TRAIN, cid, batch_size=batch_size, generator=rng.torch_cpu
    )
    train_private(model, loader, epochs=epochs, lr=lr, device=device, stop_event=stop_event)
    soft_labels = predict(
        model, dataset.open_images(payload.next_indices), batch_size=batch_size, device=device
    )
    test_loader = dataset.get_dataloader(DSFLPartitionType.TEST, None, batch_size=256)
    loss, acc = evaluate(model, test_loader, device)
    return soft_labels, {"loss": loss, "acc": acc}


def _client_model(
    selector: DSFLModelSelector, model_name: str, cid: int, state: StateDict | None
) -> torch.nn.Module:
    """Client ``cid``'s model: its own initial weights, or its state from its last round."""
    model = selector.select_model(model_name, owner=cid)
    if state is not None:
        model.load_state_dict(state)
    return model


def _state_of(model: torch.nn.Module) -> StateDict:
    return {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}


# ------------------------------------------------------------------------------------------
# The server handler
# ------------------------------------------------------------------------------------------


class DSFLServerHandler(BaseServerHandler[DSFLUplinkPackage, DSFLDownlinkPackage]):
    """The DS-FL server: draws open-set batches, aggregates soft labels with ERA, distils.

    Attributes:
        model: The server's model (trained only by distillation).
        dataset: The partitioned data set (open set and test split).
        global_round: Number of rounds to run.
        num_clients: Number of clients.
        sample_ratio: Fraction of clients per round.
        device: Where to compute.
        kd_epochs: Distillation epochs per round.
        kd_batch_size: Distillation batch size.
        kd_lr: Distillation learning rate.
        era_temperature: ERA's sharpening temperature ``T``.
        open_size_per_round: Open-set samples the clients predict on per round.
        seed: The experiment seed.
        num_clients_per_round: ``int(num_clients * sample_ratio)``.
        round: Rounds completed.
        global_soft_labels: The latest ERA result (``None`` before the first round ends).
        global_indices: The open-set samples it is about.
        metadata_list: The clients' metrics of the latest round.
        intra_op_threads: PyTorch's thread count while the server computes.
    """

    def __init__(
        self,
        model_selector: DSFLModelSelector,
        model_name: str,
        dataset: DSFLPartitionedDataset,
        global_round: int,
        num_clients: int,
        sample_ratio: float,
        device: str,
        kd_epochs: int,
        kd_batch_size: int,
        kd_lr: float,
        era_temperature: float,
        open_size_per_round: int,
        seed: int,
        *,
        intra_op_threads: int | None = 1,
    ) -> None:
        """Create the server and its model.

        Args:
            model_selector: Builds the server's model.
            model_name: Which architecture.
            dataset: The partitioned data set.
            global_round: Number of rounds (> 0).
            num_clients: Number of clients (> 0).
            sample_ratio: Fraction of clients per round, in ``(0, 1]``.
            device: Where to compute.
            kd_epochs: Distillation epochs per round.
            kd_batch_size: Distillation batch size.
            kd_lr: Distillation learning rate.
            era_temperature: ERA temperature ``T > 0`` (DS-FL uses 0.1).
            open_size_per_round: Open-set samples per round, at most the open-set size.
            seed: The experiment seed.
            intra_op_threads: PyTorch's thread count while the server computes (1 keeps
                results independent of the machine's core count).

        Raises:
            ConfigError: If a count, ratio or the temperature is out of range.
        """
        if global_round <= 0 or num_clients <= 0:
            raise ConfigError(
                f"global_round and num_clients must be positive, got {global_round} and "
                f"{num_clients}"
            )
        if not 0 < sample_ratio <= 1 or int(num_clients * sample_ratio) == 0:
            raise ConfigError(
                f"sample_ratio={sample_ratio} must be in (0, 1] and select at least one of "
                f"the {num_clients} clients"
            )
        if not 0 < open_size_per_round <= dataset.open_size:
            raise ConfigError(
                f"open_size_per_round={open_size_per_round} must be between 1 and the "
                f"open-set size {dataset.open_size}"
            )
        if not (math.isfinite(era_temperature) and era_temperature > 0):
            raise ConfigError(f"era_temperature must be positive, got {era_temperature}")
        self.model = model_selector.select_model(model_name)
        self.dataset = dataset
        self.global_round = global_round
        self.num_clients = num_clients
        self.sample_ratio = sample_ratio
        self.device = device
        self.kd_epochs = kd_epochs
        self.kd_batch_size = kd_batch_size
        self.kd_lr = kd_lr
        self.era_temperature = era_temperature
        self.open_size_per_round = open_size_per_round
        self.seed = seed
        self.intra_op_threads = intra_op_threads
        self.num_clients_per_round = int(num_clients * sample_ratio)
        self.round = 0
        self.client_buffer_cache: list[DSFLUplinkPackage] = []
        self.global_soft_labels: torch.Tensor | None = None
        self.global_indices: torch.Tensor | None = None
        self.metadata_list: list[dict[str, float]] = []

    def sample_clients(self) -> list[int]:
        """Sample this round's clients from the stream ``(seed, CLIENT_SAMPLING, round)``.

        Returns:
            The sorted client ids.
        """
        draw = stream(self.seed, purpose=Purpose.CLIENT_SAMPLING, round=self.round)
        return sorted(int(c) for c in draw.choice(self.num_clients, self.num_clients_per_round))

    def next_indices(self) -> torch.Tensor:
        """Return this round's open-set batch, a pure function of ``(seed, round)``.

        Returns:
            ``open_size_per_round`` distinct open-set positions, ascending (int64).
        """
        draw = stream(self.seed, purpose=OPEN_SET_PURPOSE, round=self.round)
        picked = draw.choice(self.dataset.open_size, self.open_size_per_round)
        return torch.from_numpy(picked).sort().values

    def is_stopped(self) -> bool:
        """Return ``True`` once ``global_round`` rounds have completed."""
        return self.round >= self.global_round

    def downlink_package(self) -> DSFLDownlinkPackage:
        """Return the previous round's ERA soft labels and this round's open-set batch."""
        return DSFLDownlinkPackage(
            self.global_soft_labels, self.global_indices, self.next_indices()
        )

    def load(self, payload: DSFLUplinkPackage) -> bool:
        """Buffer one client's package; aggregate once every sampled client has reported.

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

    def global_update(self, buffer: list[DSFLUplinkPackage]) -> None:
        """Aggregate the round's soft labels with ERA and distil the server's model on them.

        Args:
            buffer: The round's packages, in ``cid_list`` order.

        Raises:
            ValueError: If ``buffer`` is empty.
            TensorMismatchError: If a client predicted on other open-set samples than this
                round's, or sent soft labels of the wrong shape.
        """
        if not buffer:
            raise ValueError("global_update needs at least one uplink package")
        indices = self.next_indices()
        expected = (indices.numel(), self.dataset.num_classes)
        for package in buffer:
            if not torch.equal(package.indices.long(), indices):
                raise TensorMismatchError(
                    f"client {package.cid} sent soft labels for other open-set samples than "
                    f"round {self.round}'s batch of {indices.numel()}"
                )
            if tuple(package.soft_labels.shape) != expected:
                raise TensorMismatchError(
                    f"client {package.cid} sent soft labels of shape "
                    f"{tuple(package.soft_labels.shape)}, expected {expected}"
                )
        with intra_op_threads(self.intra_op_threads):
            targets = entropy_reduction_aggregation(
                [p.soft_labels for p in buffer], self.era_temperature
            )
            distill(
                self.model,
                self.dataset.open_images(indices),
                targets,
                epochs=self.kd_epochs,
                batch_size=self.kd_batch_size,
                lr=self.kd_lr,
                device=self.device,
            )
        self.global_soft_labels, self.global_indices = targets, indices
        self.metadata_list = [dict(p.metadata) for p in buffer]

    def get_summary(self) -> dict[str, float]:
        """Evaluate the server's model on the test split; add the clients' mean metrics.

        Returns:
            ``server_acc`` and ``server_loss``, plus ``client_acc`` and ``client_loss``
            (means over the latest round's clients) once a round has completed.
        """
        loader = self.dataset.get_dataloader(DSFLPartitionType.TEST, None, batch_size=256)
        with intra_op_threads(self.intra_op_threads):
            loss, acc = evaluate(self.model, loader, self.device)
        summary = {"server_acc": acc, "server_loss": loss}
        if self.metadata_list:
            for key in ("acc", "loss"):
                values = [m[key] for m in self.metadata_list if key in m]
                if values:
                    summary[f"client_{key}"] = sum(values) / len(values)
        return summary


# ------------------------------------------------------------------------------------------
# The serial client trainer
# ------------------------------------------------------------------------------------------


class DSFLBaseClientTrainer(BaseClientTrainer[DSFLUplinkPackage, DSFLDownlinkPackage]):
    """DS-FL clients trained one after the other in this process.

    Client ``cid`` uses architecture ``model_names[cid % len(model_names)]`` and keeps its
    model from one round to the next (in :attr:`client_states`).

    Attributes:
        model_selector: Builds the clients' models.
        model_names: The architectures, assigned to clients round-robin.
        dataset: The partitioned data set.
        device: Where to train.
        num_clients: Number of clients.
        epochs: Private-data epochs.
        batch_size: Private-data batch size.
        lr: Private-data learning rate.
        kd_epochs: Distillation epochs.
        kd_batch_size: Distillation batch size.
        kd_lr: Distillation learning rate.
        seed: The experiment seed.
        round: Number of ``local_process`` calls completed (the client streams' round).
        client_states: Each client's model state after its latest round.
        cache: Packages waiting for :meth:`uplink_package`.
        intra_op_threads: PyTorch's thread count while training.
    """

    def __init__(
        self,
        model_selector: DSFLModelSelector,
        model_names: Sequence[str],
        dataset: DSFLPartitionedDataset,
        device: str,
        num_clients: int,
        epochs: int,
        batch_size: int,
        lr: float,
        kd_epochs: int,
        kd_batch_size: int,
        kd_lr: float,
        seed: int,
        *,
        intra_op_threads: int | None = 1,
    ) -> None:
        """Create the trainer.

        Args:
            model_selector: Builds the clients' models.
            model_names: One or more architectures, assigned round-robin by client id.
            dataset: The partitioned data set.
            device: Where to train.
            num_clients: Number of clients.
            epochs: Private-data epochs.
            batch_size: Private-data batch size.
            lr: Private-data learning rate.
            kd_epochs: Distillation epochs.
            kd_batch_size: Distillation batch size.
            kd_lr: Distillation learning rate.
            seed: The experiment seed.
            intra_op_threads: PyTorch's thread count while training.

        Raises:
            ConfigError: If ``model_names`` is empty.
        """
        if not model_names:
            raise ConfigError("model_names needs at least one architecture")
        self.model_selector = model_selector
        self.model_names = tuple(model_names)
        self.dataset = dataset
        self.device = device
        self.num_clients = num_clients
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.kd_epochs = kd_epochs
        self.kd_batch_size = kd_batch_size
        self.kd_lr = kd_lr
        self.seed = seed
        self.intra_op_threads = intra_op_threads
        self.round = 0
        self.client_states: dict[int, StateDict] = {}
        self.cache: list[DSFLUplinkPackage] = []

    def client_model_name(self, cid: int) -> str:
        """Return client ``cid``'s architecture."""
        return self.model_names[cid % len(self.model_names)]

    def local_process(self, payload: DSFLDownlinkPackage, cid_list: list[int]) -> None:
        """Run every client of ``cid_list`` in turn.

        Args:
            payload: The server's broadcast.
            cid_list: The clients of this round.

        Raises:
            ClientError: If a client raised; nothing is cached and no client state changes.
        """
        results: list[DSFLUplinkPackage] = []
        states: dict[int, StateDict] = {}
        with intra_op_threads(self.intra_op_threads):
            for cid in cid_list:
                try:
                    model = _client_model(
                        self.model_selector,
                        self.client_model_name(cid),
                        cid,
                        self.client_states.get(cid),
                    )
                    soft_labels, metadata = client_round(
                        model,
                        payload,
                        self.dataset,
                        cid=cid,
                        round_=self.round,
                        seed=self.seed,
                        epochs=self.epochs,
                        batch_size=self.batch_size,
                        lr=self.lr,
                        kd_epochs=self.kd_epochs,
                        kd_batch_size=self.kd_batch_size,
                        kd_lr=self.kd_lr,
                        device=self.device,
                    )
                except Exception as exc:
                    tb = "".join(traceback.format_exception(exc))
                    raise ClientError(cid, f"{type(exc).__name__}: {exc}", tb) from exc
                indices = payload.next_indices.clone()
                results.append(DSFLUplinkPackage(cid, soft_labels, indices, metadata))
                states[cid] = _state_of(model)
        self.client_states.update(states)
        self.cache.extend(results)
        self.round += 1

    def uplink_package(self) -> list[DSFLUplinkPackage]:
        """Return (and clear) the cached packages."""
        packages, self.cache = self.cache, []
        return packages


# ------------------------------------------------------------------------------------------
# The process-pool client trainer
# ------------------------------------------------------------------------------------------


@dataclass
class DSFLClientConfig:
    """Everything a worker process needs to run one client (pickled per client).

    The selector and the data set are the same object in every config, so emberfl sends
    them to each worker once; ``state`` travels with the client.

    Attributes:
        model_selector: Builds the client's model.
        model_name: The client's architecture.
        dataset: The partitioned data set.
        epochs: Private-data epochs.
        batch_size: Private-data batch size.
        lr: Private-data learning rate.
        kd_epochs: Distillation epochs.
        kd_batch_size: Distillation batch size.
        kd_lr: Distillation learning rate.
        cid: The client id.
        seed: The experiment seed.
        round: The trainer's round (selects the client's stream).
        state: The client's model state after its previous round, ``None`` the first time.
    """

    model_selector: DSFLModelSelector
    model_name: str
    dataset: DSFLPartitionedDataset
    epochs: int
    batch_size: int
    lr: float
    kd_epochs: int
    kd_batch_size: int
    kd_lr: float
    cid: int
    seed: int
    round: int
    state: StateDict | None = None


@dataclass
class DSFLProcessPoolUplinkPackage:
    """What a worker hands back: the uplink package plus the client's new model state.

    ``soft_labels`` and ``indices`` are written into the worker's shared-memory slot and
    travel as :class:`~emberfl.core.SHMHandle`; ``state`` (whose size depends on the
    client's architecture) is pickled. The state stays with the trainer: it is not part of
    what the server receives.

    Attributes:
        cid: The client id.
        soft_labels: The soft labels, or a placeholder.
        indices: The open-set positions, or a placeholder.
        metadata: The client's metrics.
        state: The client's model state after this round.
    """

    cid: int
    soft_labels: torch.Tensor | SHMHandle
    indices: torch.Tensor | SHMHandle
    metadata: dict[str, float] = field(default_factory=dict)
    state: StateDict | None = None


def _run_client(
    config: DSFLClientConfig,
    payload: DSFLDownlinkPackage,
    device: str,
    stop_event: threading.Event,
) -> DSFLProcessPoolUplinkPackage:
    """One client's round in a worker, its tensors in the returned package."""
    model = _client_model(config.model_selector, config.model_name, config.cid, config.state)
    soft_labels, metadata = client_round(
        model,
        payload,
        config.dataset,
        cid=config.cid,
        round_=config.round,
        seed=config.seed,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        kd_epochs=config.kd_epochs,
        kd_batch_size=config.kd_batch_size,
        kd_lr=config.kd_lr,
        device=device,
        stop_event=stop_event,
    )
    return DSFLProcessPoolUplinkPackage(
        cid=config.cid,
        soft_labels=soft_labels,
        indices=payload.next_indices.clone(),
        metadata=metadata,
        state=_state_of(model),
    )


class DSFLProcessPoolClientTrainer(
    ProcessPoolClientTrainer[
        DSFLUplinkPackage,
        DSFLDownlinkPackage,
        DSFLClientConfig,
        DSFLProcessPoolUplinkPackage,
    ]
):
    """DS-FL clients in a persistent pool of ``num_parallels`` worker processes.

    Gives the same packages, bit for bit, as :class:`DSFLBaseClientTrainer`, in both IPC
    modes: ``IPCMode.SHARED_MEMORY`` (the default; soft labels come back through the
    workers' shared-memory slots) and BlazeFL 2.x's ``IPCMode.STORAGE`` (configs, the
    broadcast and the results are files in ``share_dir``, as in BlazeFL's tutorial). Use it
    as a context manager (or call :meth:`shutdown`) to stop the workers.

    Attributes:
        model_selector: Builds the clients' models.
        model_names: The architectures, assigned to clients round-robin.
        dataset: The partitioned data set.
        device: Where to train.
        device_count: Number of CUDA devices.
        num_clients: Number of clients.
        epochs: Private-data epochs.
        batch_size: Private-data batch size.
        lr: Private-data learning rate.
        kd_epochs: Distillation epochs.
        kd_batch_size: Distillation batch size.
        kd_lr: Distillation learning rate.
        seed: The experiment seed.
        num_parallels: Number of worker processes.
        round: Number of ``local_process`` calls completed.
        client_states: Each client's model state after its latest round.
        cache: Packages waiting for :meth:`uplink_package`.
        stop_event: Shared with the workers; set to stop them between steps.
        intra_op_threads: PyTorch's thread count in each worker.
        ipc_mode: How configs, broadcasts and results reach the workers.
        share_dir: Where ``IPCMode.STORAGE`` exchanges its files.
    """

    def __init__(
        self,
        model_selector: DSFLModelSelector,
        model_names: Sequence[str],
        dataset: DSFLPartitionedDataset,
        device: str,
        num_clients: int,
        epochs: int,
        batch_size: int,
        lr: float,
        kd_epochs: int,
        kd_batch_size: int,
        kd_lr: float,
        seed: int,
        num_parallels: int,
        *,
        intra_op_threads: int | None = 1,
        ipc_mode: IPCMode = IPCMode.SHARED_MEMORY,
        share_dir: Path | None = None,
    ) -> None:
        """Create the trainer (the workers start with the first round).

        Args:
            model_selector: Builds the clients' models.
            model_names: One or more architectures, assigned round-robin by client id.
            dataset: The partitioned data set.
            device: Where to train.
            num_clients: Number of clients.
            epochs: Private-data epochs.
            batch_size: Private-data batch size.
            lr: Private-data learning rate.
            kd_epochs: Distillation epochs.
            kd_batch_size: Distillation batch size.
            kd_lr: Distillation learning rate.
            seed: The experiment seed.
            num_parallels: Number of worker processes.
            intra_op_threads: PyTorch's thread count in each worker.
            ipc_mode: ``IPCMode.SHARED_MEMORY`` or ``IPCMode.STORAGE``.
            share_dir: The folder ``IPCMode.STORAGE`` writes to (required there).

        Raises:
            ConfigError: If ``model_names`` is empty, or storage mode lacks ``share_dir``.
        """
        if not model_names:
            raise ConfigError("model_names needs at least one architecture")
        if IPCMode(ipc_mode) is IPCMode.STORAGE and share_dir is None:
            raise ConfigError("ipc_mode=STORAGE needs a share_dir to exchange files in")
        self.ipc_mode = IPCMode(ipc_mode)
        self.share_dir = share_dir
        self.model_selector = model_selector
        self.model_names = tuple(model_names)
        self.dataset = dataset
        self.device = device
        self.device_count = torch.cuda.device_count()
        self.num_clients = num_clients
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.kd_epochs = kd_epochs
        self.kd_batch_size = kd_batch_size
        self.kd_lr = kd_lr
        self.seed = seed
        self.num_parallels = num_parallels
        self.intra_op_threads = intra_op_threads
        self.round = 0
        self.client_states: dict[int, StateDict] = {}
        self.cache: list[DSFLUplinkPackage] = []
        self.stop_event = multiprocessing.get_context("spawn").Event()  # type: ignore[assignment]
        self._num_open = 0
        self._new_states: dict[int, StateDict] = {}

    def client_model_name(self, cid: int) -> str:
        """Return client ``cid``'s architecture."""
        return self.model_names[cid % len(self.model_names)]

    def progress_fn(
        self, it: list[ClientJob[DSFLProcessPoolUplinkPackage]]
    ) -> Iterable[ClientJob[DSFLProcessPoolUplinkPackage]]:
        """Return the jobs unchanged (override to add a progress bar)."""
        return it

    def get_client_config(self, cid: int) -> DSFLClientConfig:
        """Return client ``cid``'s configuration for the current round."""
        return DSFLClientConfig(
            model_selector=self.model_selector,
            model_name=self.client_model_name(cid),
            dataset=self.dataset,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            kd_epochs=self.kd_epochs,
            kd_batch_size=self.kd_batch_size,
            kd_lr=self.kd_lr,
            cid=cid,
            seed=self.seed,
            round=self.round,
            state=self.client_states.get(cid),
        )

    def prepare_uplink_package_buffer(self) -> DSFLProcessPoolUplinkPackage:
        """Return a buffer shaped like one client's soft labels and indices."""
        return DSFLProcessPoolUplinkPackage(
            cid=-1,
            soft_labels=torch.zeros(self._num_open, self.dataset.num_classes),
            indices=torch.zeros(self._num_open, dtype=torch.int64),
        )

    @staticmethod
    def worker(
        config: DSFLClientConfig | Path,
        payload: DSFLDownlinkPackage | Path,
        device: str,
        stop_event: threading.Event,
        *,
        shm_buffer: DSFLProcessPoolUplinkPackage | None = None,
    ) -> DSFLProcessPoolUplinkPackage | Path:
        """Run one client in a worker process.

        Args:
            config: The client's configuration; in storage mode, the file it was saved to.
            payload: The server's broadcast (read-only views of shared memory); in storage
                mode, the file it was saved to.
            device: Where to train.
            stop_event: Stops the client between steps once set.
            shm_buffer: This worker's shared-memory slot, as a package (shared-memory mode).

        Returns:
            The package, its tensors left in ``shm_buffer``; in storage mode, the path of
            the file the whole package was saved to (the config's, as in BlazeFL).

        Raises:
            RuntimeError: If there is no shared-memory buffer in shared-memory mode.
            TensorMismatchError: If the soft labels do not fit the buffer.
        """
        if isinstance(config, Path) and isinstance(payload, Path):
            package = _run_client(
                torch.load(config, weights_only=False),
                torch.load(payload, weights_only=False),
                device,
                stop_event,
            )
            torch.save(package, config)
            return config
        assert isinstance(config, DSFLClientConfig) and isinstance(payload, DSFLDownlinkPackage)
        if shm_buffer is None or not isinstance(shm_buffer.soft_labels, torch.Tensor):
            raise RuntimeError("shm_buffer must be a pre-allocated shared-memory package")
        if not isinstance(shm_buffer.indices, torch.Tensor):
            raise RuntimeError("shm_buffer must be a pre-allocated shared-memory package")
        package = _run_client(config, payload, device, stop_event)
        assert isinstance(package.soft_labels, torch.Tensor)
        if package.soft_labels.shape != shm_buffer.soft_labels.shape:
            raise TensorMismatchError(
                f"client {config.cid} produced soft labels of shape "
                f"{tuple(package.soft_labels.shape)}; the uplink buffer expects "
                f"{tuple(shm_buffer.soft_labels.shape)}"
            )
        shm_buffer.soft_labels.copy_(package.soft_labels)
        shm_buffer.indices.copy_(payload.next_indices)
        package.soft_labels = SHMHandle()
        package.indices = SHMHandle()
        return package

    def convert_buffer_to_uplink(self, buffer: DSFLProcessPoolUplinkPackage) -> DSFLUplinkPackage:
        """Keep the client's new state aside and return the part the server receives.

        Args:
            buffer: The client's rebuilt buffer.

        Returns:
            The uplink package.

        Raises:
            TensorMismatchError: If the tensors were not restored from shared memory.
        """
        if not isinstance(buffer.soft_labels, torch.Tensor) or not isinstance(
            buffer.indices, torch.Tensor
        ):
            raise TensorMismatchError(
                f"client {buffer.cid}: soft_labels/indices were not restored from shared memory"
            )
        if buffer.state is not None:
            self._new_states[buffer.cid] = buffer.state
        return DSFLUplinkPackage(buffer.cid, buffer.soft_labels, buffer.indices, buffer.metadata)

    def local_process(self, payload: DSFLDownlinkPackage, cid_list: list[int]) -> None:
        """Run ``cid_list`` in the worker processes (see the base class).

        Client states are committed only if every client of the round succeeded.

        Args:
            payload: The server's broadcast.
            cid_list: The clients of this round.
        """
        self._num_open = int(payload.next_indices.numel())
        self._new_states = {}
        try:
            super().local_process(payload, cid_list)
            self.client_states.update(self._new_states)
        finally:
            self._new_states = {}
        self.round += 1

    def uplink_package(self) -> list[DSFLUplinkPackage]:
        """Return (and clear) the cached packages."""
        packages, self.cache = self.cache, []
        return packages

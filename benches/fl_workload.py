"""The side-by-side benchmark's workload, shared by emberfl, BlazeFL and Flower runners.

This module needs only PyTorch and NumPy (it runs in the peers' own virtual environments,
which have no emberfl), and defines everything the three runners must agree on:

* :class:`WorkloadConfig` and :data:`PRESETS`: ``paper`` is BlazeFL's published benchmark
  (CIFAR-10-shaped data, 50,000 training images, 100 clients of about 500 images, all
  clients every round, 5 rounds of 5 local epochs, batch 50, SGD lr 0.1); ``small`` keeps
  the shape with fewer images and epochs so it runs on two CPU cores in minutes.
* The models: the PyTorch tutorial CNN and ResNet-18 (torchvision's layout, written out
  here so the peers need no torchvision), initialised from the seed.
* The data on disk (:func:`load_workload_data`): images, labels and the client
  partition, generated once by emberfl (``bench_emberfl.prepare_data``) and read by
  everyone, so the data are identical bit for bit.
* :class:`InMemoryPartitionedDataset`: the partitioned data set for emberfl's and
  BlazeFL's FedAvg (their ``PartitionedDataset`` protocols are structural).
* :func:`local_sgd`, :func:`evaluate`: the plain PyTorch loops used by Flower's client and
  by the bare-PyTorch baseline, the same loops the frameworks' FedAvg run.
* :func:`model_checksum` and :func:`result_record`: the JSON every runner writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "MODEL_NAMES",
    "PRESETS",
    "InMemoryPartitionedDataset",
    "LazyPartitionedDataset",
    "ResNet18",
    "TutorialCNN",
    "WorkloadConfig",
    "WorkloadData",
    "WorkloadModelSelector",
    "build_model",
    "data_digest",
    "evaluate",
    "load_workload_data",
    "local_sgd",
    "model_checksum",
    "pin_threads",
    "result_record",
    "save_workload_data",
    "warm_up_torch",
]

MODEL_NAMES = ("cnn", "resnet18")


@dataclass(frozen=True)
class WorkloadConfig:
    """The federated workload every framework runs.

    Attributes:
        num_train: Training images (split among the clients).
        num_test: Test images (the server's evaluation set).
        num_clients: Clients in the federation.
        rounds: Communication rounds.
        epochs: Local epochs per client per round.
        batch_size: Local (and evaluation) batch size.
        lr: SGD learning rate.
        sample_ratio: Fraction of clients per round (1.0: all of them, as in the paper).
        shards_per_client: Label shards per client (pathological non-IID, as BlazeFL's
            benchmark: 200 shards for 100 clients).
        seed: The experiment seed (data, partition, model initialisation).
        model: ``"cnn"`` or ``"resnet18"``.
    """

    num_train: int
    num_test: int
    num_clients: int
    rounds: int
    epochs: int
    batch_size: int = 50
    lr: float = 0.1
    sample_ratio: float = 1.0
    shards_per_client: int = 2
    seed: int = 42
    model: str = "cnn"

    def replace(self, **changes: Any) -> WorkloadConfig:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkloadConfig:
        """Build a config from :meth:`to_dict`'s output."""
        return cls(**dict(data))


PRESETS: dict[str, WorkloadConfig] = {
    # BlazeFL's published benchmark (benchmarks/blazefl-case defaults).
    "paper": WorkloadConfig(num_train=50_000, num_test=10_000, num_clients=100, rounds=5, epochs=5),
    # Same shape, two CPU cores: 100 clients of 50 images, one epoch, three rounds.
    "small": WorkloadConfig(num_train=5_000, num_test=1_000, num_clients=100, rounds=3, epochs=1),
    # Cross-device: 1,000 clients of 20 images, 10 of them per round, 20 rounds.
    "cross-device": WorkloadConfig(
        num_train=20_000,
        num_test=1_000,
        num_clients=1_000,
        rounds=20,
        epochs=1,
        sample_ratio=0.01,
    ),
    # For the smoke test: seconds.
    "tiny": WorkloadConfig(num_train=200, num_test=100, num_clients=4, rounds=2, epochs=1),
}


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class TutorialCNN(nn.Module):
    """The CNN of PyTorch's "Training a classifier" tutorial (62,006 parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        """Create the layers.

        Args:
            num_classes: Output classes.
        """
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of ``(N, 3, 32, 32)`` images."""
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 with torchvision's layer layout (11,181,642 parameters for 10 classes)."""

    def __init__(self, num_classes: int = 10) -> None:
        """Create the layers.

        Args:
            num_classes: Output classes.
        """
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(
                nn.Sequential(
                    _BasicBlock(in_planes, planes, stride), _BasicBlock(planes, planes, 1)
                )
            )
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of images."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(name: str, *, seed: int, num_classes: int = 10) -> nn.Module:
    """Build a model initialised from ``seed`` (bitwise equal in every environment).

    The global random state is forked, so callers' generators are not disturbed.

    Args:
        name: ``"cnn"`` or ``"resnet18"``.
        seed: Initialisation seed.
        num_classes: Output classes.

    Returns:
        The model, on the CPU.

    Raises:
        ValueError: For an unknown name.
    """
    classes: dict[str, type[nn.Module]] = {"cnn": TutorialCNN, "resnet18": ResNet18}
    if name not in classes:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return classes[name](num_classes)


@dataclass(frozen=True)
class WorkloadModelSelector:
    """A picklable model selector (emberfl's and BlazeFL's ``ModelSelector`` protocol).

    Attributes:
        seed: Initialisation seed of every model it builds.
        num_classes: Output classes.
    """

    seed: int
    num_classes: int = 10

    def select_model(self, model_name: str) -> nn.Module:
        """Return a fresh model named ``model_name`` (see :func:`build_model`)."""
        return build_model(str(model_name), seed=self.seed, num_classes=self.num_classes)


def model_checksum(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Return the sha256 of the model's floating-point state, as float32, in state order.

    Args:
        model: A module or a state dict.

    Returns:
        The hex digest.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    digest = hashlib.sha256()
    for tensor in state.values():
        if torch.is_floating_point(tensor):
            digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

_ARRAYS = ("train_x", "train_y", "test_x", "test_y", "owner")


@dataclass(frozen=True)
class WorkloadData:
    """The benchmark's data, in memory.

    Attributes:
        train_x: Training images, float32 ``(N, 3, 32, 32)``.
        train_y: Training labels, int64 ``(N,)``.
        test_x: Test images.
        test_y: Test labels.
        client_indices: For each client, its training-sample positions (sorted).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    client_indices: list[np.ndarray]

    @property
    def num_clients(self) -> int:
        """The number of clients."""
        return len(self.client_indices)


def save_workload_data(
    directory: Path, arrays: Mapping[str, np.ndarray], config: WorkloadConfig
) -> None:
    """Write the data as ``.npy`` files plus a ``meta.json``.

    Args:
        directory: Where to write (created).
        arrays: ``train_x``, ``train_y``, ``test_x``, ``test_y`` and ``owner`` (the client
            of each training sample).
        config: The workload the data were made for.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name in _ARRAYS:
        np.save(directory / f"{name}.npy", np.ascontiguousarray(arrays[name]))
    meta = {"config": config.to_dict(), "digest": data_digest(directory)}
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))


def data_digest(directory: Path) -> str:
    """Return the sha256 over the data files (the same data give the same digest)."""
    digest = hashlib.sha256()
    for name in _ARRAYS:
        digest.update((directory / f"{name}.npy").read_bytes())
    return digest.hexdigest()


def load_workload_data(directory: Path) -> WorkloadData:
    """Read the data written by :func:`save_workload_data`.

    Args:
        directory: The data directory.

    Returns:
        The data, with one index array per client.
    """
    arrays = {name: np.load(directory / f"{name}.npy") for name in _ARRAYS}
    owner = arrays["owner"].astype(np.int64)
    num_clients = int(owner.max()) + 1
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(num_clients + 1))
    indices = [order[bounds[c] : bounds[c + 1]] for c in range(num_clients)]
    return WorkloadData(
        train_x=torch.from_numpy(arrays["train_x"]),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=torch.from_numpy(arrays["test_x"]),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        client_indices=indices,
    )


class InMemoryPartitionedDataset:
    """Client splits as contiguous tensors, for emberfl's and BlazeFL's FedAvg.

    ``type_`` is compared by value (``"train"``/``"test"``), so the class serves both
    frameworks' ``FedAvgPartitionType``. The server's split (``cid=None``) is the test set.
    Loaders shuffle the training split with the caller's generator and keep the test
    split in order.
    """

    def __init__(self, data: WorkloadData) -> None:
        """Slice the clients' tensors once.

        Args:
            data: The workload data.
        """
        self._train: dict[int, Dataset[Any]] = {}
        for cid, idx in enumerate(data.client_indices):
            index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
            self._train[cid] = TensorDataset(
                data.train_x[index].contiguous(), data.train_y[index].contiguous()
            )
        self._test: Dataset[Any] = TensorDataset(data.test_x, data.test_y)

    def get_dataset(self, type_: str, cid: int | None) -> Dataset[Any]:
        """Return client ``cid``'s training split, or the test set.

        Args:
            type_: ``"train"`` or ``"test"``.
            cid: The client (``None``: the server's split, the test set).

        Returns:
            The data set.

        Raises:
            KeyError: For an unknown split or client.
        """
        if str(type_) == "test" or cid is None:
            return self._test
        if str(type_) != "train":
            raise KeyError(f"unknown split {type_!r}")
        return self._train[cid]

    def set_dataset(self, type_: str, cid: int | None, dataset: Dataset[Any]) -> None:
        """Replace a client's training split (BlazeFL's workers call it after training)."""
        if str(type_) == "train" and cid is not None:
            self._train[cid] = dataset

    def get_dataloader(
        self,
        type_: str,
        cid: int | None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> DataLoader[Any]:
        """Return a loader over a split (training splits are shuffled with ``generator``).

        Args:
            type_: ``"train"`` or ``"test"``.
            cid: The client, or ``None`` for the test set.
            batch_size: The batch size (default 50).
            generator: Drives the shuffling.

        Returns:
            The loader.
        """
        dataset = self.get_dataset(type_, cid)
        train = str(type_) == "train" and cid is not None
        return DataLoader(dataset, batch_size=batch_size or 50, shuffle=train, generator=generator)


class LazyPartitionedDataset(InMemoryPartitionedDataset):
    """:class:`InMemoryPartitionedDataset` that reads each split on first use and pickles
    as its directory name.

    The files are memory-mapped and a client's samples copied out when it first asks, in
    each process, so a framework that pickles the data set into every job (BlazeFL's
    process pool does, as part of each client's config) sends a path, not the images. This
    mirrors BlazeFL's own benchmark data set, which reads each client's split from disk.
    """

    def __init__(self, directory: Path) -> None:
        """Remember where the data are; nothing is read yet.

        Args:
            directory: A directory written by :func:`save_workload_data`.
        """
        self.directory = Path(directory)
        self._train = {}
        self._test_set: Dataset[Any] | None = None
        self._owner: np.ndarray | None = None

    def _array(self, name: str) -> np.ndarray:
        return np.load(self.directory / f"{name}.npy", mmap_mode="r")

    def get_dataset(self, type_: str, cid: int | None) -> Dataset[Any]:
        """Return a split (see :meth:`InMemoryPartitionedDataset.get_dataset`)."""
        if str(type_) == "test" or cid is None:
            if self._test_set is None:
                x = torch.from_numpy(np.array(self._array("test_x")))
                y = torch.from_numpy(np.array(self._array("test_y"), dtype=np.int64))
                self._test_set = TensorDataset(x, y)
            return self._test_set
        if cid not in self._train:
            if self._owner is None:
                self._owner = np.array(self._array("owner"))
            idx = np.flatnonzero(self._owner == cid)
            x = torch.from_numpy(np.ascontiguousarray(self._array("train_x")[idx]))
            y = torch.from_numpy(np.array(self._array("train_y")[idx], dtype=np.int64))
            self._train[cid] = TensorDataset(x, y)
        return self._train[cid]

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the directory only."""
        return {"directory": self.directory, "_train": {}, "_test_set": None, "_owner": None}


# --------------------------------------------------------------------------------------------
# Plain PyTorch loops (Flower's client and the bare baseline)
# --------------------------------------------------------------------------------------------


def local_sgd(model: nn.Module, loader: DataLoader[Any], epochs: int, lr: float) -> float:
    """Train ``model`` with SGD (the loop FedAvg's clients run); return the mean loss.

    Args:
        model: The model (trained in place).
        loader: Yields ``(images, labels)``.
        epochs: Epochs.
        lr: Learning rate.

    Returns:
        The mean training loss over all batches.
    """
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    total, batches = 0.0, 0
    for _ in range(epochs):
        for data, target in loader:
            loss = criterion(model(data), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.item())
            batches += 1
    return total / max(batches, 1)


def evaluate(model: nn.Module, loader: DataLoader[Any]) -> tuple[float, float]:
    """Return ``(mean loss, accuracy)`` of ``model`` on ``loader``."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for data, target in loader:
            out = model(data)
            loss += float(criterion(out, target).item())
            correct += int((out.argmax(1) == target).sum().item())
            count += int(target.numel())
    return loss / max(count, 1), correct / max(count, 1)


# --------------------------------------------------------------------------------------------
# Threads and results
# --------------------------------------------------------------------------------------------


def warm_up_torch() -> None:
    """Pay PyTorch's one-time lazy imports now, outside the timed rounds.

    The first ``torch.optim.SGD(...)`` in a process imports ``torch._dynamo`` and friends
    (1 s to 10 s on a busy machine). Every runner calls this before its round loop, so the
    main process's first round is not charged for it; worker processes that a framework
    starts inside its rounds still pay it there, as part of their start-up.
    """
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    param.sum().backward()
    optimizer.step()


def pin_threads(num_threads: int) -> None:
    """Set PyTorch's intra-op threads here and (via the environment) in child processes.

    Args:
        num_threads: Intra-op threads per training client.
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(num_threads)
    torch.set_num_threads(num_threads)


def result_record(
    *,
    framework: str,
    framework_version: str,
    mode: str,
    parallelism: int,
    config: WorkloadConfig,
    threads: int,
    round_seconds: Sequence[float],
    checksum: str,
    data_dir: Path | None,
    summary: Mapping[str, float] | None = None,
    breakdown: Sequence[Mapping[str, float]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the JSON record every runner writes.

    Args:
        framework: ``"emberfl"``, ``"blazefl"`` or ``"flower"``.
        framework_version: Its version.
        mode: The execution mode (``serial``, ``thread``, ``process``, ``ray``).
        parallelism: Clients trained at once.
        config: The workload.
        threads: PyTorch intra-op threads per client.
        round_seconds: Wall time of each round (training, aggregation, evaluation).
        checksum: :func:`model_checksum` of the final global model.
        data_dir: Where the data came from (its digest is recorded).
        summary: The last round's evaluation (accuracy, loss).
        breakdown: Per-round components, where the runner measures them.
        extra: Anything else worth keeping.

    Returns:
        The record.
    """
    digest = None
    if data_dir is not None and (data_dir / "meta.json").exists():
        digest = json.loads((data_dir / "meta.json").read_text()).get("digest")
    return {
        "benchmark": "fl_workload",
        "framework": framework,
        "framework_version": framework_version,
        "mode": mode,
        "parallelism": parallelism,
        "config": config.to_dict(),
        "threads_per_client": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "executable": sys.executable,
        "data_digest": digest,
        "round_seconds": [float(t) for t in round_seconds],
        "total_seconds": float(sum(round_seconds)),
        "checksum": checksum,
        "summary": dict(summary or {}),
        "breakdown": [dict(b) for b in (breakdown or [])],
        **dict(extra or {}),
    }

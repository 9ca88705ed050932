"""Data sets as in-memory tensors, including two that work offline.

Every loader returns an :class:`FLDataset`: float32 image tensors of shape ``(N, C, H, W)``
and int64 label tensors, for a train and a test split.

* ``"digits"`` (:func:`load_digits_dataset`): the UCI handwritten digits shipped with
  scikit-learn (1797 8x8 grey images, 10 classes), scaled to ``[0, 1]`` with a seeded,
  stratified train/test split. Needs no download; the default data set of ``emberfl run``.
* ``"synthetic-cifar10"`` (:func:`synthetic_cifar10`): CIFAR-10-shaped images generated from
  the seed. Each class has a smooth colour pattern; a sample is that pattern, randomly shifted
  and scaled, plus Gaussian noise, so models learn it and a CNN beats a linear model.
* ``"cifar10"``, ``"cifar100"``, ``"mnist"``, ``"fashion-mnist"``: the real data sets, read
  with torchvision (``pip install "emberfl[vision]"``) from files already under ``data_root``;
  nothing is downloaded. Images are normalised with the usual per-channel mean and std.

All randomness comes from ``emberfl.rng.numpy_generator(seed, purpose=Purpose.SYNTHETIC_DATA,
...)``; numpy's, Python's and torch's global random states are never touched.

Example:
    >>> from emberfl.data.datasets import load_dataset
    >>> ds = load_dataset("digits", seed=0)
    >>> tuple(ds.train_x.shape), ds.num_classes, ds.input_shape
    ((1437, 1, 8, 8), 10, (1, 8, 8))
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from emberfl.data._options import check_options, unknown_name
from emberfl.data.partition import _apportion
from emberfl.errors import ConfigError, DatasetNotFoundError
from emberfl.rng import Purpose, numpy_generator, stream

__all__ = [
    "DATASET_NAMES",
    "FLDataset",
    "INPUT_DTYPES",
    "LEAF_DATASETS",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "synthetic_cifar10",
    "synthetic_fedprox",
    "fcube",
]

PathArg = str | os.PathLike[str]

INPUT_DTYPES = (torch.float32, torch.uint8, torch.int64)
"""The input dtypes of an :class:`FLDataset`: numbers, bytes of images, token ids."""


@dataclass(frozen=True, eq=False)
class FLDataset:
    """A data set held in memory as tensors, split into train and test.

    Attributes:
        name: The data set's name, as :func:`load_dataset` knows it.
        train_x: Training images, float32 ``(N_train, C, H, W)``.
        train_y: Training labels, int64 ``(N_train,)`` in ``0..num_classes-1``.
        test_x: Test images, float32 ``(N_test, C, H, W)``.
        test_y: Test labels, int64 ``(N_test,)``.
        num_classes: The number of classes.
        train_owner: For a data set that comes split by client (``synthetic``, LEAF's):
            the client of every training sample, int64 ``(N_train,)``; ``None`` otherwise.
        test_owner: For a data set whose clients come with test samples of their own
            (LEAF's): the client of every test sample, ``-1`` for a test user that has no
            training data; ``None`` otherwise.
        client_names: The clients' names in the data set (LEAF's user ids), or ``None``.
        vocab_size: For inputs of token ids (int64): the number of ids; ``None`` for
            numeric inputs.

    Inputs are float32, uint8 (images stored as bytes, served to models as float32 in
    ``[0, 1]`` by :class:`~emberfl.data.partitioned.TensorSplit`) or int64 token ids.

    Raises:
        ValueError: On construction, if the tensors' dtypes or lengths do not match.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    train_owner: torch.Tensor | None = None
    test_owner: torch.Tensor | None = None
    client_names: tuple[str, ...] | None = None
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        """Check dtypes and that images and labels have matching lengths."""
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
        ):
            if x.dtype not in INPUT_DTYPES or y.dtype != torch.int64:
                raise ValueError(
                    f"{self.name} {split}: inputs must be float32, uint8 or int64 and labels "
                    f"int64, got {x.dtype} and {y.dtype}"
                )
            if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{self.name} {split}: {tuple(x.shape)} images do not match "
                    f"{tuple(y.shape)} labels"
                )
        owner = self.train_owner
        if owner is not None and (owner.dtype != torch.int64 or owner.shape != self.train_y.shape):
            raise ValueError(
                f"{self.name}: train_owner must be int64 with one entry per training sample"
            )
        test_owner = self.test_owner
        if test_owner is not None and (
            test_owner.dtype != torch.int64 or test_owner.shape != self.test_y.shape
        ):
            raise ValueError(
                f"{self.name}: test_owner must be int64 with one entry per test sample"
            )
        if self.train_x.dtype != self.test_x.dtype:
            raise ValueError(
                f"{self.name}: train inputs are {self.train_x.dtype}, test inputs "
                f"{self.test_x.dtype}"
            )
        if (self.train_x.dtype == torch.int64) != (self.vocab_size is not None):
            raise ValueError(
                f"{self.name}: token-id (int64) inputs need vocab_size, and only they take it"
            )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"{self.name}: train images {tuple(self.train_x.shape[1:])} and test images "
                f"{tuple(self.test_x.shape[1:])} differ in shape"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one image, e.g. ``(3, 32, 32)``."""
        return tuple(int(d) for d in self.train_x.shape[1:])

    @property
    def num_train(self) -> int:
        """The number of training samples."""
        return int(self.train_x.shape[0])

    @property
    def num_test(self) -> int:
        """The number of test samples."""
        return int(self.test_x.shape[0])


# --------------------------------------------------------------------------------------------
# UCI digits (scikit-learn, offline)
# --------------------------------------------------------------------------------------------


def _stratified_test_mask(
    labels: npt.NDArray[np.int64], test_fraction: float, rng: np.random.Generator
) -> npt.NDArray[np.bool_]:
    """Pick ``ceil(test_fraction * N)`` test samples, shared among classes by class size."""
    classes, class_of = np.unique(labels, return_inverse=True)
    class_sizes = np.bincount(class_of.ravel())
    n_test = _apportion(math.ceil(test_fraction * labels.size), class_sizes.astype(np.float64))
    mask = np.zeros(labels.size, dtype=bool)
    for k in range(classes.size):
        members = np.flatnonzero(class_of.ravel() == k)
        mask[rng.choice(members, size=int(n_test[k]), replace=False)] = True
    return mask


def load_digits_dataset(*, seed: int = 0, test_fraction: float = 0.2) -> FLDataset:
    """Load scikit-learn's copy of the UCI handwritten digits (no download needed).

    Args:
        seed: Seeds the stratified train/test split.
        test_fraction: The share of each class put in the test split.

    Returns:
        The data set: 1797 images of shape ``(1, 8, 8)`` in ``[0, 1]``, 10 classes, split
        per class (1437 train and 360 test at the default fraction), each split in the
        original sample order.

    Raises:
        ConfigError: If ``test_fraction`` is not strictly between 0 and 1.
    """
    from sklearn.datasets import load_digits

    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    bunch = load_digits()
    images = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    rng = numpy_generator(seed, purpose=Purpose.SYNTHETIC_DATA)
    test = _stratified_test_mask(labels, float(test_fraction), rng)
    return FLDataset(
        name="digits",
        train_x=torch.from_numpy(np.ascontiguousarray(images[~test])),
        train_y=torch.from_numpy(labels[~test]),
        test_x=torch.from_numpy(np.ascontiguousarray(images[test])),
        test_y=torch.from_numpy(labels[test]),
        num_classes=10,
    )


# --------------------------------------------------------------------------------------------
# Synthetic CIFAR-10
# --------------------------------------------------------------------------------------------

# Streams of Purpose.SYNTHETIC_DATA: client 0 holds the class patterns; client 1 (train) and
# client 2 (test) hold a split's labels and nuisances in round 0 and the noise of chunk i in
# round 1 + i, so chunks can be filled in parallel and the test split does not depend on
# num_train.
_PATTERN_STREAM, _TRAIN_STREAM, _TEST_STREAM = 0, 1, 2
_CHUNK = 2048
_SIDE = 32
_SHIFT_STEP = 4
_SHIFTS = _SIDE // _SHIFT_STEP


def _class_patterns(seed: int, num_classes: int, signal: float) -> npt.NDArray[np.float32]:
    """Return every class pattern at every shift: ``(classes * shifts * shifts, 3 * 32 * 32)``."""
    rng = numpy_generator(seed, purpose=Purpose.SYNTHETIC_DATA, client=_PATTERN_STREAM)
    grid = np.arange(_SIDE, dtype=np.float64)
    gratings = 4
    amp = rng.standard_normal((num_classes, 3, gratings))
    freq = rng.integers(-3, 4, size=(num_classes, 3, gratings, 2))
    freq[..., 0] = np.where((freq[..., 0] == 0) & (freq[..., 1] == 0), 1, freq[..., 0])
    phase = rng.uniform(0.0, 2 * math.pi, size=(num_classes, 3, gratings))
    colour = rng.standard_normal((num_classes, 3))
    angle = (
        2
        * math.pi
        / _SIDE
        * (freq[..., 0, None, None] * grid[:, None] + freq[..., 1, None, None] * grid[None, :])
        + phase[..., None, None]
    )  # (classes, 3, gratings, 32, 32)
    pattern = (amp[..., None, None] * np.cos(angle)).sum(axis=2) / math.sqrt(gratings)
    pattern += 0.5 * colour[..., None, None]
    pattern *= signal / pattern.std(axis=(1, 2, 3), keepdims=True)
    shifts = range(0, _SIDE, _SHIFT_STEP)
    bank = np.stack(
        [np.roll(pattern, (dy, dx), axis=(2, 3)) for dy in shifts for dx in shifts], axis=1
    )  # (classes, shifts*shifts, 3, 32, 32)
    return np.ascontiguousarray(bank.reshape(num_classes * _SHIFTS * _SHIFTS, -1), np.float32)


def _synthetic_split(
    bank: npt.NDArray[np.float32],
    num: int,
    *,
    seed: int,
    stream: int,
    num_classes: int,
    noise: float,
    pool: ThreadPoolExecutor,
) -> tuple[torch.Tensor, torch.Tensor]:
    rng = numpy_generator(seed, purpose=Purpose.SYNTHETIC_DATA, client=stream)
    labels = rng.permutation(np.arange(num, dtype=np.int64) % num_classes)
    shift = rng.integers(0, _SHIFTS * _SHIFTS, size=num)
    contrast = rng.uniform(0.5, 1.5, size=num).astype(np.float32)
    rows = labels * (_SHIFTS * _SHIFTS) + shift
    out = np.empty((num, 3 * _SIDE * _SIDE), dtype=np.float32)

    def fill(chunk: int) -> None:
        lo, hi = chunk * _CHUNK, min(num, (chunk + 1) * _CHUNK)
        view = out[lo:hi]
        gen = numpy_generator(seed, purpose=Purpose.SYNTHETIC_DATA, client=stream, round=1 + chunk)
        gen.standard_normal(out=view, dtype=np.float32)
        if noise != 1.0:
            view *= np.float32(noise)
        signal = np.take(bank, rows[lo:hi], axis=0)
        signal *= contrast[lo:hi, None]
        view += signal

    list(pool.map(fill, range(math.ceil(num / _CHUNK))))
    images = torch.from_numpy(out.reshape(num, 3, _SIDE, _SIDE))
    return images, torch.from_numpy(labels)


def synthetic_cifar10(
    num_train: int = 50000,
    num_test: int = 10000,
    *,
    seed: int,
    noise: float = 1.0,
    signal: float = 0.25,
) -> FLDataset:
    """Generate a learnable, CIFAR-10-shaped data set from the seed (no download needed).

    Each of the 10 classes gets a smooth random colour texture (a sum of low-frequency
    gratings plus a colour offset). A sample of class ``k`` is that texture circularly shifted
    by a random multiple of 4 pixels in each direction and scaled by a contrast in
    ``[0.5, 1.5]``, plus i.i.d. Gaussian pixel noise. Averaged over shifts a texture is just
    its colour, so a linear model must learn many modes per class while a small CNN learns
    the textures directly: at the defaults, on 5000 training images, logistic regression
    reaches about 75% test accuracy and a two-layer CNN about 90% after two epochs.

    Values are roughly standardised (mean 0, std about ``sqrt(noise**2 + signal**2)``).
    Classes are balanced exactly, as in CIFAR-10. 50k + 10k images take a couple of seconds
    on two cores; the chunks are filled on a few threads, each from its own stream, so the
    result does not depend on the thread count.

    Args:
        num_train: The number of training images.
        num_test: The number of test images.
        seed: The experiment seed.
        noise: The standard deviation of the pixel noise.
        signal: The standard deviation of a class pattern; lower makes the task harder.

    Returns:
        The data set (name ``"synthetic-cifar10"``), images ``(N, 3, 32, 32)`` float32.

    Raises:
        ConfigError: For a negative size, or a negative or non-finite ``noise``/``signal``.
    """
    for what, count in (("num_train", num_train), ("num_test", num_test)):
        if int(count) < 0:
            raise ConfigError(f"{what} must be >= 0, got {count}")
    for what, value in (("noise", noise), ("signal", signal)):
        if not (math.isfinite(float(value)) and float(value) >= 0):
            raise ConfigError(f"{what} must be a finite number >= 0, got {value}")
    num_classes = 10
    bank = _class_patterns(seed, num_classes, float(signal))
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="emberfl-synth") as pool:
        common: dict[str, Any] = {
            "seed": seed,
            "num_classes": num_classes,
            "noise": float(noise),
            "pool": pool,
        }
        train_x, train_y = _synthetic_split(bank, int(num_train), stream=_TRAIN_STREAM, **common)
        test_x, test_y = _synthetic_split(bank, int(num_test), stream=_TEST_STREAM, **common)
    return FLDataset("synthetic-cifar10", train_x, train_y, test_x, test_y, num_classes)


# --------------------------------------------------------------------------------------------
# torchvision data sets, read from disk
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _VisionSet:
    name: str
    title: str
    tv_class: str
    files: tuple[str, ...]
    fetch: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MNIST_GZ = ", ".join(f"{f}.gz" for f in _MNIST_FILES)

_CIFAR10 = _VisionSet(
    name="cifar10",
    title="CIFAR-10",
    tv_class="CIFAR10",
    files=tuple(
        f"cifar-10-batches-py/{f}"
        for f in ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
    ),
    fetch="download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
    "and extract it into {root}",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
_CIFAR100 = _VisionSet(
    name="cifar100",
    title="CIFAR-100",
    tv_class="CIFAR100",
    files=("cifar-100-python/meta", "cifar-100-python/train", "cifar-100-python/test"),
    fetch="download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
    "and extract it into {root}",
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)
_MNIST = _VisionSet(
    name="mnist",
    title="MNIST",
    tv_class="MNIST",
    files=tuple(f"MNIST/raw/{f}" for f in _MNIST_FILES),
    fetch=f"download {_MNIST_GZ} from https://ossci-datasets.s3.amazonaws.com/mnist/ "
    "and gunzip them into {root}/MNIST/raw",
    num_classes=10,
    mean=(0.1307,),
    std=(0.3081,),
)
_FASHION_MNIST = _VisionSet(
    name="fashion-mnist",
    title="Fashion-MNIST",
    tv_class="FashionMNIST",
    files=tuple(f"FashionMNIST/raw/{f}" for f in _MNIST_FILES),
    fetch=f"download {_MNIST_GZ} from "
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ "
    "and gunzip them into {root}/FashionMNIST/raw",
    num_classes=10,
    mean=(0.2860,),
    std=(0.3530,),
)


def _to_tensors(
    data: Any, targets: Any, spec: _VisionSet, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    raw = torch.as_tensor(np.asarray(data))  # uint8, (N, H, W) or (N, H, W, C)
    x = raw.unsqueeze(1) if raw.ndim == 3 else raw.permute(0, 3, 1, 2)
    x = x.to(torch.float32).div_(255.0)
    if normalize:
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        x = x.sub_(mean).div_(std)
    y = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    return x.contiguous(), y


# What torchvision raises on absent, truncated or corrupt files: RuntimeError from its own
# checks, ValueError/IndexError/EOFError from parsing idx files, UnpicklingError for CIFAR.
_READ_ERRORS = (RuntimeError, ValueError, IndexError, EOFError, OSError, pickle.UnpicklingError)


def _load_vision(spec: _VisionSet, data_root: PathArg, normalize: bool) -> FLDataset:
    root = Path(data_root).expanduser()
    fetch = spec.fetch.format(root=root)
    missing = [f for f in spec.files if not (root / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{spec.title} not found under {root} (no {missing[0]}): {fetch}"
        )
    try:
        import torchvision.datasets as tv_datasets
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"{spec.title} is read with torchvision, which is not installed: "
            f'pip install "emberfl[vision]" (or pip install torchvision)',
            name="torchvision",
        ) from exc
    cls = getattr(tv_datasets, spec.tv_class)
    splits = []
    for train in (True, False):
        try:
            ds = cls(root=str(root), train=train, download=False)
        except _READ_ERRORS as exc:
            raise DatasetNotFoundError(
                f"{spec.title} under {root} is incomplete or corrupted "
                f"({type(exc).__name__}: {' '.join(str(exc).split())}): {fetch}"
            ) from exc
        splits.append(_to_tensors(ds.data, ds.targets, spec, normalize))
    (train_x, train_y), (test_x, test_y) = splits
    return FLDataset(spec.name, train_x, train_y, test_x, test_y, spec.num_classes)


def load_cifar10(data_root: PathArg, *, normalize: bool = True) -> FLDataset:
    """Load CIFAR-10 (50k/10k images ``(3, 32, 32)``, 10 classes) from ``data_root``.

    Args:
        data_root: The folder holding ``cifar-10-batches-py/`` (the extracted
            ``cifar-10-python.tar.gz``).
        normalize: Standardise each channel with CIFAR-10's mean and std; otherwise the
            images are in ``[0, 1]``.

    Returns:
        The data set.

    Raises:
        DatasetNotFoundError: If the files are missing or corrupt; the message says what to
            download and where to put it.
        ModuleNotFoundError: If torchvision is not installed.
    """
    return _load_vision(_CIFAR10, data_root, normalize)


def load_cifar100(data_root: PathArg, *, normalize: bool = True) -> FLDataset:
    """Load CIFAR-100 (50k/10k images ``(3, 32, 32)``, 100 fine classes) from ``data_root``.

    Args:
        data_root: The folder holding ``cifar-100-python/`` (the extracted
            ``cifar-100-python.tar.gz``).
        normalize: Standardise each channel with CIFAR-100's mean and std; otherwise the
            images are in ``[0, 1]``.

    Returns:
        The data set.

    Raises:
        DatasetNotFoundError: If the files are missing or corrupt; the message says what to
            download and where to put it.
        ModuleNotFoundError: If torchvision is not installed.
    """
    return _load_vision(_CIFAR100, data_root, normalize)


def load_mnist(data_root: PathArg, *, normalize: bool = True) -> FLDataset:
    """Load MNIST (60k/10k images ``(1, 28, 28)``, 10 classes) from ``data_root``.

    Args:
        data_root: The folder holding ``MNIST/raw/`` with the four unzipped idx files.
        normalize: Standardise with MNIST's mean and std; otherwise the images are in
            ``[0, 1]``.

    Returns:
        The data set.

    Raises:
        DatasetNotFoundError: If the files are missing or corrupt; the message says what to
            download and where to put it.
        ModuleNotFoundError: If torchvision is not installed.
    """
    return _load_vision(_MNIST, data_root, normalize)


def load_fashion_mnist(data_root: PathArg, *, normalize: bool = True) -> FLDataset:
    """Load Fashion-MNIST (60k/10k images ``(1, 28, 28)``, 10 classes) from ``data_root``.

    Args:
        data_root: The folder holding ``FashionMNIST/raw/`` with the four unzipped idx files.
        normalize: Standardise with Fashion-MNIST's mean and std; otherwise the images are
            in ``[0, 1]``.

    Returns:
        The data set.

    Raises:
        DatasetNotFoundError: If the files are missing or corrupt; the message says what to
            download and where to put it.
        ModuleNotFoundError: If torchvision is not installed.
    """
    return _load_vision(_FASHION_MNIST, data_root, normalize)


# --------------------------------------------------------------------------------------------
# FedProx's Synthetic(alpha, beta)
# --------------------------------------------------------------------------------------------

SYNTHETIC_DIM = 60
"""Synthetic(alpha, beta)'s input dimension."""
SYNTHETIC_CLASSES = 10
"""Synthetic(alpha, beta)'s classes."""


def synthetic_fedprox(
    *,
    seed: int,
    num_clients: int = 30,
    alpha: float = 1.0,
    beta: float = 1.0,
    test_fraction: float = 0.1,
) -> FLDataset:
    """Generate FedProx's Synthetic(alpha, beta) data, split by client (Li et al., 2020).

    Client ``k`` draws, from its own stream ``(seed, SYNTHETIC_DATA, k)``:

    * its size ``n_k = floor(exp(4 + 2 z)) + 50`` (``z`` standard normal: power-law sizes);
    * a model ``W_k`` (10 x 60) and ``b_k`` (10) with entries ``N(u_k, 1)``, ``u_k ~ N(0,
      alpha^2)``;
    * a feature mean ``v_k`` with entries ``N(B_k, 1)``, ``B_k ~ N(0, beta^2)`` (how far its
      inputs are from the others');
    * ``n_k`` inputs ``x ~ N(v_k, diag(j^-1.2))`` and labels ``y = argmax(W_k x + b_k)``.

    ``alpha`` and ``beta`` are standard deviations, as in FedProx's own generator. Two
    properties of the definition worth knowing: the clients' models are independent
    draws at every ``alpha``, and since ``x`` stays close to ``v_k`` each client's labels
    are concentrated on a few classes (about 84% on its most frequent one) whatever
    ``alpha`` and ``beta``; and a scalar ``u_k`` adds ``u_k (1 + sum_j x_j)`` to every
    class's score alike, so ``alpha`` changes the models' spread but not the labels.
    ``beta`` moves the clients' inputs apart. Each client's last ``test_fraction`` of
    samples (at least one when it has two) goes to the test split, so the test set follows
    the clients' mixture.

    Args:
        seed: The experiment seed.
        num_clients: The number of clients (>= 1).
        alpha: The spread of the clients' models (>= 0).
        beta: The spread of the clients' feature means (>= 0).
        test_fraction: Each client's share of test samples, in ``[0, 1)``.

    Returns:
        The data set (name ``"synthetic"``), inputs ``(N, 60)`` float32, with
        :attr:`FLDataset.train_owner` naming every training sample's client.

    Raises:
        ConfigError: For a value out of range.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    for what, value in (("synthetic_alpha", alpha), ("synthetic_beta", beta)):
        if not (math.isfinite(float(value)) and float(value) >= 0):
            raise ConfigError(f"{what} must be a number >= 0, got {value}")
    if not (math.isfinite(float(test_fraction)) and 0 <= float(test_fraction) < 1):
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
    d, c = SYNTHETIC_DIM, SYNTHETIC_CLASSES
    scale = np.power(np.arange(1, d + 1, dtype=np.float64), -1.2) ** 0.5
    parts: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], int, bool]] = []
    for k in range(num_clients):
        draw = stream(seed, purpose=Purpose.SYNTHETIC_DATA, client=k)
        z, u_raw, b_raw = draw.normal(3)
        n = math.floor(math.exp(4.0 + 2.0 * float(z))) + 50
        u = float(alpha) * float(u_raw)
        big_b = float(beta) * float(b_raw)
        w = u + draw.normal(c * d).reshape(c, d)
        bias = u + draw.normal(c)
        v = big_b + draw.normal(d)
        x = v + draw.normal(n * d).reshape(n, d) * scale
        y = np.argmax(x @ w.T + bias, axis=1)
        n_test = round(n * float(test_fraction))
        if float(test_fraction) > 0 and n >= 2:
            n_test = min(max(n_test, 1), n - 1)
        cut = n - n_test
        parts.append((x[:cut], y[:cut], k, True))
        parts.append((x[cut:], y[cut:], k, False))
    train = [(x, y, k) for x, y, k, is_train in parts if is_train]
    test = [(x, y) for x, y, _, is_train in parts if not is_train]

    def tensors(chunks: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        xs = np.concatenate([ch[0] for ch in chunks]) if chunks else np.zeros((0, d))
        ys = np.concatenate([ch[1] for ch in chunks]) if chunks else np.zeros(0)
        return (
            torch.from_numpy(xs.astype(np.float32)),
            torch.from_numpy(ys.astype(np.int64)),
        )

    train_x, train_y = tensors(train)
    test_x, test_y = tensors(test)
    owner = np.concatenate([np.full(len(y), k, dtype=np.int64) for _, y, k in train])
    return FLDataset(
        name="synthetic",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=c,
        train_owner=torch.from_numpy(owner),
    )


def fcube(num_train: int = 4000, num_test: int = 1000, *, seed: int) -> FLDataset:
    """Generate NIID-Bench's FCUBE data (Li et al., 2022): feature skew in a cube.

    Points are uniform in ``[-1, 1]^3`` and labelled by the plane ``x_1 = 0`` (class 1 when
    ``x_1 > 0``). The natural split (``--partition natural``, four clients) cuts the cube
    into its eight octants and gives each client two octants symmetric about the origin,
    so every client sees both classes but a different region of the inputs:
    :attr:`FLDataset.train_owner` is ``min(o, 7 - o)`` for octant ``o = 4 [x_1 > 0] +
    2 [x_2 > 0] + [x_3 > 0]``.

    Args:
        num_train: Training points (>= 1).
        num_test: Test points (>= 0).
        seed: The experiment seed (train and test from separate streams).

    Returns:
        The data set (name ``"fcube"``), inputs ``(N, 3)`` float32, two classes.

    Raises:
        ConfigError: For a size out of range.
    """
    if int(num_train) < 1 or int(num_test) < 0:
        raise ConfigError(
            f"fcube needs num_train >= 1 and num_test >= 0, got {num_train}, {num_test}"
        )

    def points(n: int, part: int) -> npt.NDArray[np.float64]:
        rng = numpy_generator(seed, purpose=Purpose.SYNTHETIC_DATA, client=part)
        return rng.uniform(-1.0, 1.0, size=(n, 3))

    train, test = points(int(num_train), 0), points(int(num_test), 1)
    octant = 4 * (train[:, 0] > 0) + 2 * (train[:, 1] > 0) + (train[:, 2] > 0)
    owner = np.minimum(octant, 7 - octant).astype(np.int64)
    return FLDataset(
        name="fcube",
        train_x=torch.from_numpy(train.astype(np.float32)),
        train_y=torch.from_numpy((train[:, 0] > 0).astype(np.int64)),
        test_x=torch.from_numpy(test.astype(np.float32)),
        test_y=torch.from_numpy((test[:, 0] > 0).astype(np.int64)),
        num_classes=2,
        train_owner=torch.from_numpy(owner),
    )


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------

_SEEDED: dict[str, Callable[..., FLDataset]] = {
    "digits": load_digits_dataset,
    "synthetic-cifar10": synthetic_cifar10,
    "synthetic": synthetic_fedprox,
    "fcube": fcube,
}
_ON_DISK: dict[str, Callable[..., FLDataset]] = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
}

LEAF_DATASETS: tuple[str, ...] = (
    "femnist",
    "shakespeare",
    "sent140",
    "celeba",
    "reddit",
    "synthetic-leaf",
)
"""LEAF's data sets (:func:`emberfl.data.leaf.load_leaf`), read from disk."""

DATASET_NAMES: tuple[str, ...] = (*_SEEDED, *_ON_DISK, *LEAF_DATASETS)
"""The names :func:`load_dataset` accepts."""


def load_dataset(
    name: str, *, data_root: PathArg | None = None, seed: int = 0, **kw: Any
) -> FLDataset:
    """Load a data set by name (the entry point of the CLI).

    Args:
        name: One of :data:`DATASET_NAMES`.
        data_root: The folder the on-disk data sets (``cifar10``, ``cifar100``, ``mnist``,
            ``fashion-mnist`` and LEAF's, :data:`LEAF_DATASETS`) are read from; unused by
            the generated ones.
        seed: Seeds the generated or split data sets (the on-disk ones have a fixed split).
        **kw: Options of the loader, e.g. ``num_train=5000`` for ``synthetic-cifar10``,
            ``test_fraction=0.25`` for ``digits`` or ``normalize=False`` for the others.

    Returns:
        The data set.

    Raises:
        ConfigError: For an unknown name or option, or an on-disk data set without
            ``data_root``.
        DatasetNotFoundError: If an on-disk data set's files are missing.
        ModuleNotFoundError: If an on-disk data set is asked for and torchvision is missing.
    """
    what = f"data set {name!r}"
    if name in _SEEDED:
        func = _SEEDED[name]
        check_options(func, kw, what=what, exclude=("seed",))
        return func(seed=seed, **kw)
    if name in LEAF_DATASETS:
        from emberfl.data.leaf import load_leaf

        check_options(load_leaf, kw, what=what, positional=2)
        if data_root is None:
            raise ConfigError(
                f"{what} is read from LEAF's files: pass data_root=<folder> (it downloads nothing)"
            )
        return load_leaf(name, data_root, **kw)
    if name in _ON_DISK:
        func = _ON_DISK[name]
        check_options(func, kw, what=what, positional=1)
        if data_root is None:
            raise ConfigError(
                f"{what} is read from disk: pass data_root=<folder> (it downloads nothing)"
            )
        return func(data_root, **kw)
    raise unknown_name("data set", name, DATASET_NAMES)

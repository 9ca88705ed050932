"""Tests of emberfl.data.datasets: offline data sets, torchvision loaders and the dispatcher."""

from __future__ import annotations

import importlib.util
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from emberfl.data.datasets import (
    DATASET_NAMES,
    FLDataset,
    load_dataset,
    load_digits_dataset,
    synthetic_cifar10,
)
from emberfl.errors import ConfigError, DatasetNotFoundError

HAVE_TORCHVISION = importlib.util.find_spec("torchvision") is not None

# name -> (a file the loader needs, words its "not found" message must contain)
ON_DISK: dict[str, tuple[str, tuple[str, ...]]] = {
    "cifar10": (
        "cifar-10-batches-py/data_batch_1",
        ("CIFAR-10", "cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar.html"),
    ),
    "cifar100": (
        "cifar-100-python/train",
        ("CIFAR-100", "cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar.html"),
    ),
    "mnist": (
        "MNIST/raw/train-images-idx3-ubyte",
        ("MNIST", "train-images-idx3-ubyte.gz", "MNIST/raw"),
    ),
    "fashion-mnist": (
        "FashionMNIST/raw/train-images-idx3-ubyte",
        ("Fashion-MNIST", "train-images-idx3-ubyte.gz", "FashionMNIST/raw"),
    ),
}


def check_format(ds: FLDataset, shape: tuple[int, ...], num_classes: int) -> None:
    assert ds.input_shape == shape
    assert ds.num_classes == num_classes
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        assert x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert x.shape == (y.shape[0], *shape)
        assert x.is_contiguous()
        assert bool(torch.isfinite(x).all())
        assert int(y.min()) >= 0
        assert int(y.max()) < num_classes


def fit_linear(ds: FLDataset, *, steps: int, lr: float) -> float:
    """Full-batch softmax regression by gradient descent from zero (no RNG); test accuracy.

    Plain gradient steps rather than ``torch.optim`` (whose first step imports a lot), on one
    intra-op thread: tiny matmuls on a busy 2-core machine are many times slower with two
    OpenMP threads spinning against each other.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, xt = ds.train_x.flatten(1), ds.test_x.flatten(1)
        w = torch.zeros(x.shape[1], ds.num_classes, requires_grad=True)
        b = torch.zeros(ds.num_classes, requires_grad=True)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(x @ w + b, ds.train_y)
            grad_w, grad_b = torch.autograd.grad(loss, [w, b])
            with torch.no_grad():
                w -= lr * grad_w
                b -= lr * grad_b
        with torch.no_grad():
            return float(((xt @ w + b).argmax(1) == ds.test_y).float().mean())
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_digits_format_and_split() -> None:
    from sklearn.datasets import load_digits

    ds = load_digits_dataset(seed=0)
    assert ds.name == "digits"
    check_format(ds, (1, 8, 8), 10)
    assert (ds.num_train, ds.num_test) == (1437, 360)
    assert float(ds.train_x.min()) >= 0.0
    assert float(ds.train_x.max()) == 1.0
    # Stratified: every class is in both splits at about 20%.
    test_share = torch.bincount(ds.test_y, minlength=10) / (
        torch.bincount(ds.test_y, minlength=10) + torch.bincount(ds.train_y, minlength=10)
    )
    assert bool(((test_share - 0.2).abs() < 0.01).all())
    # The two splits together are exactly the original images.
    everything = torch.cat([ds.train_x, ds.test_x]).flatten(1).numpy() * 16
    original = np.asarray(load_digits().data, dtype=np.float32)
    assert np.array_equal(np.unique(everything, axis=0), np.unique(original, axis=0))
    assert everything.shape == original.shape


def test_digits_split_is_seeded() -> None:
    a, b, c = load_digits_dataset(seed=1), load_digits_dataset(seed=1), load_digits_dataset(seed=2)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)


def test_digits_is_learnable() -> None:
    assert fit_linear(load_digits_dataset(seed=0), steps=100, lr=0.5) > 0.85


def test_digits_rejects_a_bad_fraction() -> None:
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        load_digits_dataset(test_fraction=1.0)


# --------------------------------------------------------------------------------------------
# synthetic CIFAR-10
# --------------------------------------------------------------------------------------------


def test_synthetic_format() -> None:
    ds = synthetic_cifar10(3000, 1000, seed=0)  # several chunks
    assert ds.name == "synthetic-cifar10"
    check_format(ds, (3, 32, 32), 10)
    assert (ds.num_train, ds.num_test) == (3000, 1000)
    assert torch.bincount(ds.train_y).tolist() == [300] * 10  # balanced, like CIFAR-10
    assert abs(float(ds.train_x.mean())) < 0.1
    assert 0.8 < float(ds.train_x.std()) < 1.5


def test_synthetic_is_deterministic() -> None:
    a = synthetic_cifar10(2500, 300, seed=5)
    b = synthetic_cifar10(2500, 300, seed=5)
    c = synthetic_cifar10(2500, 300, seed=6)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    # The test split does not depend on the size of the training split.
    d = synthetic_cifar10(100, 300, seed=5)
    assert torch.equal(a.test_x, d.test_x) and torch.equal(a.test_y, d.test_y)


def test_synthetic_is_learnable() -> None:
    ds = synthetic_cifar10(1000, 500, seed=3)
    assert fit_linear(ds, steps=30, lr=0.05) > 0.3  # chance is 0.1


def test_synthetic_rejects_bad_options() -> None:
    with pytest.raises(ConfigError, match="num_train must be >= 0"):
        synthetic_cifar10(-1, 10, seed=0)
    with pytest.raises(ConfigError, match="noise must be a finite number"):
        synthetic_cifar10(10, 10, seed=0, noise=float("nan"))


def test_generation_leaves_global_random_state_alone() -> None:
    np_before, py_before = pickle.dumps(np.random.get_state()), random.getstate()
    torch_before = torch.random.get_rng_state()
    synthetic_cifar10(500, 100, seed=1)
    load_digits_dataset(seed=1)
    assert pickle.dumps(np.random.get_state()) == np_before
    assert random.getstate() == py_before
    assert torch.equal(torch.random.get_rng_state(), torch_before)


# --------------------------------------------------------------------------------------------
# torchvision data sets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ON_DISK))
def test_missing_files_say_what_to_download(name: str, tmp_path: Path) -> None:
    _, words = ON_DISK[name]
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, data_root=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "download" in message
    assert str(tmp_path) in message
    for word in words:
        assert word in message
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("name", list(ON_DISK))
def test_present_but_unreadable_files(name: str, tmp_path: Path) -> None:
    """With every expected file present (empty), what fails depends on torchvision."""
    some_file, words = ON_DISK[name]
    loader_files = {
        "cifar10": [
            f"cifar-10-batches-py/{f}"
            for f in ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
        ],
        "cifar100": [f"cifar-100-python/{f}" for f in ("meta", "train", "test")],
        "mnist": [f"MNIST/raw/{f}" for f in IDX_FILES],
        "fashion-mnist": [f"FashionMNIST/raw/{f}" for f in IDX_FILES],
    }[name]
    assert some_file in loader_files
    for rel in loader_files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    if HAVE_TORCHVISION:
        with pytest.raises(DatasetNotFoundError, match="incomplete or corrupted") as info:
            load_dataset(name, data_root=tmp_path)
        assert words[1] in str(info.value)
        assert "\n" not in str(info.value)
    else:
        with pytest.raises(ImportError, match=r'pip install "emberfl\[vision\]"'):
            load_dataset(name, data_root=tmp_path)


IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the idx format MNIST ships in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.skipif(not HAVE_TORCHVISION, reason="needs torchvision (emberfl[vision])")
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_like_files_are_read(name: str, tmp_path: Path) -> None:
    folder = tmp_path / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
    gen = np.random.default_rng(0)
    train = gen.integers(0, 256, size=(12, 28, 28))
    test = gen.integers(0, 256, size=(5, 28, 28))
    write_idx(folder / IDX_FILES[0], train)
    write_idx(folder / IDX_FILES[1], np.arange(12) % 10)
    write_idx(folder / IDX_FILES[2], test)
    write_idx(folder / IDX_FILES[3], np.arange(5))
    raw = load_dataset(name, data_root=tmp_path, normalize=False)
    check_format(raw, (1, 28, 28), 10)
    assert raw.name == name
    assert torch.equal(raw.train_y, torch.arange(12) % 10)
    assert torch.allclose(raw.train_x[:, 0] * 255, torch.from_numpy(train).float())
    normed = load_dataset(name, data_root=tmp_path)
    assert not torch.allclose(normed.train_x, raw.train_x)


# --------------------------------------------------------------------------------------------
# Dispatcher and container
# --------------------------------------------------------------------------------------------


def test_load_dataset_dispatches() -> None:
    leaf = {"femnist", "shakespeare", "sent140", "celeba", "reddit", "synthetic-leaf"}
    assert set(DATASET_NAMES) == {
        "digits",
        "synthetic-cifar10",
        "synthetic",
        "fcube",
        *ON_DISK,
        *leaf,
    }
    a = load_dataset("digits", seed=4)
    b = load_digits_dataset(seed=4)
    assert torch.equal(a.train_x, b.train_x)
    s = load_dataset("synthetic-cifar10", seed=4, num_train=100, num_test=50)
    assert (s.num_train, s.num_test) == (100, 50)


def test_load_dataset_errors() -> None:
    with pytest.raises(ConfigError, match="unknown data set 'imagenet'") as info:
        load_dataset("imagenet")
    for name in DATASET_NAMES:
        assert name in str(info.value)
    with pytest.raises(ConfigError, match=r"does not take option.*'num_train'"):
        load_dataset("digits", num_train=10)
    with pytest.raises(ConfigError, match="pass data_root"):
        load_dataset("cifar10")


def test_fldataset_checks_its_tensors() -> None:
    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="float32, uint8 or int64 and labels int64"):
        FLDataset("t", x, y.int(), x, y, 2)
    with pytest.raises(ValueError, match="float32, uint8 or int64"):
        FLDataset("t", x.double(), y, x.double(), y, 2)
    with pytest.raises(ValueError, match="train inputs are"):
        FLDataset("t", x, y, x.to(torch.uint8), y, 2)
    ids = torch.zeros(4, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="need vocab_size"):
        FLDataset("t", ids, y, ids, y, 2)
    with pytest.raises(ValueError, match="test_owner"):
        FLDataset("t", x, y, x, y, 2, test_owner=y[:2])
    assert FLDataset("t", ids, y, ids, y, 2, vocab_size=9).input_shape == (5,)
    with pytest.raises(ValueError, match="do not match"):
        FLDataset("t", x, y[:3], x, y, 2)

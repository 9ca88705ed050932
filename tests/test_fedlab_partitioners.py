"""FedLab's partitioner classes: FedLab's call signatures, each scheme's documented
properties, reproducibility without numpy's global RNG, and FedLab's report format."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest

from emberfl.data.partitioners import (
    BasicPartitioner,
    CIFAR10Partitioner,
    CIFAR100Partitioner,
    FMNISTPartitioner,
    MNISTPartitioner,
    VisionPartitioner,
    partition_report,
)
from emberfl.errors import ConfigError, PartitionError

LABELS = np.repeat(np.arange(10), 100)  # 1,000 samples, 10 balanced classes
rng = np.random.default_rng(7)
SHUFFLED = rng.permutation(LABELS)


def _assigned_once(part: object, n: int) -> None:
    every = np.concatenate([part[c] for c in range(len(part))])  # type: ignore[index, arg-type]
    assert np.array_equal(np.sort(every), np.arange(n))


def _tv(part: object, labels: np.ndarray) -> float:
    pooled = np.bincount(labels, minlength=10) / len(labels)
    out = []
    for c in range(len(part)):  # type: ignore[arg-type]
        y = labels[part[c]]  # type: ignore[index]
        out.append(0.5 * np.abs(np.bincount(y, minlength=10) / len(y) - pooled).sum())
    return float(np.mean(out))


def test_cifar10_schemes_have_their_documented_properties() -> None:
    iid = CIFAR10Partitioner(SHUFFLED, 10, balance=True, partition="iid", seed=1)
    assert len(iid) == 10 and {len(iid[c]) for c in range(10)} == {100}
    _assigned_once(iid, 1000)
    unbal = CIFAR10Partitioner(SHUFFLED, 10, balance=False, partition="iid", unbalance_sgm=0.8,
                               seed=1)  # fmt: skip
    sizes = [len(unbal[c]) for c in range(10)]
    assert sum(sizes) == 1000 and max(sizes) > 1.5 * min(sizes)
    even = CIFAR10Partitioner(SHUFFLED, 10, balance=False, partition="iid", unbalance_sgm=0)
    assert {len(even[c]) for c in range(10)} == {100}  # sigma 0 is balanced, as FedLab says
    shards = CIFAR10Partitioner(LABELS, 100, balance=None, partition="shards", num_shards=200,
                                seed=2)  # fmt: skip
    assert all(len(set(LABELS[shards[c]].tolist())) <= 2 for c in range(100))
    _assigned_once(shards, 1000)
    inner = CIFAR10Partitioner(SHUFFLED, 10, balance=True, partition="dirichlet", dir_alpha=0.3)
    assert {len(inner[c]) for c in range(10)} == {100}
    inner_u = CIFAR10Partitioner(SHUFFLED, 10, balance=False, partition="dirichlet",
                                 dir_alpha=0.3, unbalance_sgm=0.5)  # fmt: skip
    _assigned_once(inner_u, 1000)
    skewed = CIFAR10Partitioner(SHUFFLED, 10, balance=None, partition="dirichlet", dir_alpha=0.1)
    flat = CIFAR10Partitioner(SHUFFLED, 10, balance=None, partition="dirichlet", dir_alpha=100)
    assert _tv(skewed, SHUFFLED) > 0.4 > 0.15 > _tv(flat, SHUFFLED)
    assert min(len(skewed[c]) for c in range(10)) >= 10  # hetero-dir's minimum: the classes
    assert CIFAR100Partitioner.num_classes == 100


def test_basic_and_vision_schemes_have_their_documented_properties() -> None:
    label = VisionPartitioner(SHUFFLED, 20, partition="noniid-#label", major_classes_num=3)
    assert all(len(set(SHUFFLED[label[c]].tolist())) == 3 for c in range(20))
    labeldir = MNISTPartitioner(SHUFFLED, 10, partition="noniid-labeldir", dir_alpha=0.2)
    assert _tv(labeldir, SHUFFLED) > 0.3
    quantity = FMNISTPartitioner(SHUFFLED, 10, partition="unbalance", dir_alpha=0.5)
    sizes = [len(quantity[c]) for c in range(10)]
    assert sum(sizes) == 1000 and max(sizes) > 2 * min(sizes)
    assert _tv(quantity, SHUFFLED) < 0.5 * _tv(labeldir, SHUFFLED)  # quantity skew, IID labels
    basic = BasicPartitioner(SHUFFLED % 2, 4, partition="iid", seed=3)
    assert {len(basic[c]) for c in range(4)} == {250}


def test_partitions_are_reproducible_and_leave_numpys_global_rng_alone() -> None:
    np.random.seed(123)
    state = np.random.get_state()
    a = CIFAR10Partitioner(SHUFFLED, 10, balance=None, partition="dirichlet", dir_alpha=0.5,
                           seed=5)  # fmt: skip
    after = np.random.get_state()
    assert all(np.array_equal(x, y) for x, y in zip(state[1:2], after[1:2], strict=True))
    assert state[2:] == after[2:]
    b = CIFAR10Partitioner(SHUFFLED, 10, balance=None, partition="dirichlet", dir_alpha=0.5,
                           seed=5)  # fmt: skip
    assert all(np.array_equal(a[c], b[c]) for c in range(10))
    none = VisionPartitioner(SHUFFLED, 10, partition="noniid-#label", major_classes_num=2)
    zero = VisionPartitioner(SHUFFLED, 10, partition="noniid-#label", major_classes_num=2, seed=0)
    assert all(np.array_equal(none[c], zero[c]) for c in range(10))


def test_partition_report_is_fedlabs_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    part = CIFAR10Partitioner(SHUFFLED, 5, balance=True, partition="dirichlet", dir_alpha=0.5)
    path = tmp_path / "report.csv"
    text = partition_report(SHUFFLED, part.client_dict, class_num=10, verbose=True, file=path)
    assert capsys.readouterr().out == text == path.read_text()
    lines = text.splitlines()
    assert lines[0] == "Class frequencies:"
    rows = list(csv.reader(io.StringIO("\n".join(lines[1:]))))
    assert rows[0] == ["client", *(f"class{k}" for k in range(10)), "Amount"]
    for cid, row in enumerate(rows[1:]):
        assert row[0] == f"Client {cid:4d}"
        shares = [float(v) for v in row[1:-1]]
        assert int(row[-1]) == len(part[cid]) and abs(sum(shares) - 1) < 6e-3
        counts = np.bincount(SHUFFLED[part[cid]], minlength=10)
        assert shares == [round(c / len(part[cid]), 3) for c in counts]


def test_bad_schemes_and_options_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="has no scheme balance=True, partition='shards'"):
        CIFAR10Partitioner(LABELS, 10, balance=True, partition="shards", num_shards=20)
    with pytest.raises(ConfigError, match="needs num_shards"):
        CIFAR10Partitioner(LABELS, 10, balance=None, partition="shards")
    with pytest.raises(ConfigError, match="needs dir_alpha"):
        CIFAR10Partitioner(LABELS, 10, balance=None, partition="dirichlet")
    with pytest.raises(PartitionError, match="alpha"):
        CIFAR10Partitioner(LABELS, 10, balance=None, partition="dirichlet", dir_alpha=0.0)
    with pytest.raises(ConfigError, match="has no partition 'shards'"):
        BasicPartitioner(LABELS, 10, partition="shards")
    with pytest.raises(ConfigError, match="num_clients must be an integer"):
        CIFAR10Partitioner(LABELS, 0)
    with pytest.raises(PartitionError):  # more clients than samples
        CIFAR10Partitioner(LABELS[:5], 10, balance=True, partition="iid")


def test_fcube_and_its_partitioner_split_the_cube_by_symmetric_octants() -> None:
    from emberfl.data import fcube
    from emberfl.data.partitioners import FCUBEPartitioner

    data = fcube(num_train=2000, num_test=100, seed=1)
    x, y = data.train_x.numpy(), data.train_y.numpy()
    assert x.shape == (2000, 3) and float(np.abs(x).max()) <= 1.0
    assert np.array_equal(y, (x[:, 0] > 0).astype(np.int64))  # labels by the plane x1 = 0
    part = FCUBEPartitioner(x, "synthetic")
    assert len(part) == 4
    owner = np.empty(2000, dtype=np.int64)
    for c in range(4):
        owner[part[c]] = c
        assert set(y[part[c]].tolist()) == {0, 1}  # both classes on every client
        signs = np.sign(x[part[c]])
        # two octants, mirror images of each other through the origin
        assert len({tuple(s) for s in signs.tolist()}) == 2
    assert np.array_equal(owner, data.train_owner.numpy())  # type: ignore[union-attr]
    iid = FCUBEPartitioner(x, "iid", seed=2)
    assert {len(iid[c]) for c in range(4)} == {500}
    with pytest.raises(ConfigError, match="has no partition 'shards'"):
        FCUBEPartitioner(x, "shards")

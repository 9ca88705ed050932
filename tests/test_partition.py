"""Tests of emberfl.data.partition (partitioners) and emberfl.data.report (partition reports)."""

from __future__ import annotations

import csv
import math
import pickle
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emberfl.data.partition import (
    PARTITION_METHODS,
    Partition,
    client_dirichlet_partition,
    dirichlet_partition,
    dirichlet_sizes,
    iid_lognormal_partition,
    iid_partition,
    label_quantity_partition,
    lognormal_sizes,
    partition,
    shards_partition,
)
from emberfl.data.report import (
    class_counts,
    partition_stats,
    plot_partition_heatmap,
    read_partition_csv,
    write_partition_csv,
)
from emberfl.errors import ConfigError, PartitionError

NUM_CLASSES = 10

# Options that make every method feasible on LABELS with 20 clients.
PARAMS: dict[str, dict[str, Any]] = {
    "iid": {},
    "iid-lognormal": {"sigma": 1.0},
    "iid-dirichlet": {"alpha": 1.0},
    "dirichlet": {"alpha": 0.5},
    "shards": {"shards_per_client": 2},
    "label-quantity": {"classes_per_client": 3},
    "client-dirichlet": {"alpha": 0.5},
}


def make_labels(per_class: int = 100, num_classes: int = NUM_CLASSES) -> npt.NDArray[np.int64]:
    """Balanced labels in a fixed shuffled order (a local generator; no global state)."""
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    return np.random.default_rng(1234).permutation(labels)


LABELS = make_labels()


def check_valid(parts: Partition, num_samples: int, num_clients: int) -> None:
    """Every sample in exactly one client; arrays int64, sorted and read-only."""
    assert parts.num_clients == len(parts) == num_clients
    assert parts.num_samples == num_samples
    assert int(parts.sizes.sum()) == num_samples
    flat = np.concatenate(list(parts))
    assert np.array_equal(np.sort(flat), np.arange(num_samples))
    for idx in parts:
        assert idx.dtype == np.int64
        assert np.all(np.diff(idx) > 0)
        assert not idx.flags.writeable


def classes_per_client(labels: npt.NDArray[np.int64], parts: Partition) -> npt.NDArray[np.int64]:
    return np.array([np.unique(labels[idx]).size for idx in parts], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Every method: validity, determinism, global state
# --------------------------------------------------------------------------------------------


def test_methods_cover_the_documented_names() -> None:
    assert set(PARTITION_METHODS) == set(PARAMS)


@pytest.mark.parametrize("method", PARTITION_METHODS)
def test_every_method_is_complete_and_disjoint(method: str) -> None:
    parts = partition(LABELS, 20, method=method, seed=0, **PARAMS[method])
    check_valid(parts, LABELS.size, 20)
    assert int(parts.sizes.min()) >= 1


@pytest.mark.parametrize("method", PARTITION_METHODS)
def test_same_seed_same_partition_other_seed_other(method: str) -> None:
    a = partition(LABELS, 20, method=method, seed=7, **PARAMS[method])
    b = partition(LABELS, 20, method=method, seed=7, **PARAMS[method])
    c = partition(LABELS, 20, method=method, seed=8, **PARAMS[method])
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("method", PARTITION_METHODS)
def test_global_random_state_is_untouched(method: str) -> None:
    np_before = pickle.dumps(np.random.get_state())
    py_before = random.getstate()
    partition(LABELS, 20, method=method, seed=3, **PARAMS[method])
    assert pickle.dumps(np.random.get_state()) == np_before
    assert random.getstate() == py_before


def test_dispatcher_matches_the_functions() -> None:
    direct = dirichlet_partition(LABELS, 10, alpha=0.3, seed=5, min_size=5)
    named = partition(LABELS, 10, method="dirichlet", seed=5, alpha=0.3, min_size=5)
    assert all(np.array_equal(x, y) for x, y in zip(direct, named, strict=True))
    direct_iid = iid_partition(LABELS.size, 10, seed=5)
    named_iid = partition(LABELS, 10, method="iid", seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(direct_iid, named_iid, strict=True))


def test_torch_labels_are_accepted() -> None:
    torch = pytest.importorskip("torch")
    parts = partition(torch.from_numpy(LABELS), 5, method="shards", seed=0, shards_per_client=2)
    check_valid(parts, LABELS.size, 5)


# --------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------


@st.composite
def problems(draw: st.DrawFn) -> tuple[npt.NDArray[np.int64], int, str, dict[str, Any]]:
    num_classes = draw(st.integers(1, 8))
    num_samples = draw(st.integers(1, 300))
    labels = np.array(
        draw(st.lists(st.integers(0, num_classes - 1), min_size=num_samples, max_size=num_samples)),
        dtype=np.int64,
    )
    num_clients = draw(st.integers(1, min(num_samples, 40)))
    method = draw(st.sampled_from(PARTITION_METHODS))
    alpha = draw(st.floats(0.05, 20.0))
    most = num_samples // num_clients
    params: dict[str, Any]
    if method == "iid":
        params = {}
    elif method == "iid-lognormal":
        params = {"sigma": draw(st.floats(0.0, 3.0)), "min_size": draw(st.integers(0, most))}
    elif method == "iid-dirichlet":
        params = {"alpha": alpha, "min_size": draw(st.integers(0, most))}
    elif method == "dirichlet":
        params = {"alpha": alpha, "min_size": draw(st.integers(0, min(most, 2))), "max_retries": 20}
    elif method == "shards":
        params = {"shards_per_client": draw(st.integers(1, most))}
    elif method == "label-quantity":
        distinct = np.unique(labels).size
        low = math.ceil(distinct / num_clients)
        params = {"classes_per_client": draw(st.integers(low, distinct))}
    else:
        sizes = None
        if draw(st.booleans()):
            sizes = lognormal_sizes(
                num_samples, num_clients, sigma=1.0, seed=draw(st.integers(0, 9))
            )
        params = {"alpha": alpha, "client_sizes": sizes}
    return labels, num_clients, method, params


@settings(max_examples=150, deadline=None)
@given(problem=problems(), seed=st.integers(0, 2**64 - 1))
def test_property_every_sample_in_exactly_one_client(
    problem: tuple[npt.NDArray[np.int64], int, str, dict[str, Any]], seed: int
) -> None:
    labels, num_clients, method, params = problem
    try:
        parts = partition(labels, num_clients, method=method, seed=seed, **params)
    except PartitionError as exc:
        # The only failures a feasible request may meet are the bounded, documented ones.
        if method == "dirichlet":
            assert "raise alpha, lower min_size or use fewer clients" in str(exc)
        else:
            assert method == "label-quantity"
            assert "gets no samples" in str(exc)
        return
    check_valid(parts, labels.size, num_clients)
    sizes = parts.sizes
    assert int(sizes.min()) >= params.get("min_size", 1)
    held = classes_per_client(labels, parts)
    if method == "shards" and num_clients * params["shards_per_client"] >= np.unique(labels).size:
        assert int(held.max()) <= params["shards_per_client"]
    if method == "label-quantity":
        assert int(held.max()) <= params["classes_per_client"]
    if method == "client-dirichlet" and params["client_sizes"] is not None:
        assert np.array_equal(sizes, params["client_sizes"])
    if method == "iid":
        assert int(sizes.max() - sizes.min()) <= 1
    again = partition(labels, num_clients, method=method, seed=seed, **params)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))


@settings(max_examples=50, deadline=None)
@given(
    num_samples=st.integers(1, 5000),
    data=st.data(),
    sigma=st.floats(0.0, 4.0),
    alpha=st.floats(0.01, 50.0),
)
def test_property_unbalanced_sizes_add_up(
    num_samples: int, data: st.DataObject, sigma: float, alpha: float
) -> None:
    num_clients = data.draw(st.integers(1, min(num_samples, 200)))
    min_size = data.draw(st.integers(0, num_samples // num_clients))
    for sizes in (
        lognormal_sizes(num_samples, num_clients, sigma=sigma, seed=1, min_size=min_size),
        dirichlet_sizes(num_samples, num_clients, alpha=alpha, seed=1, min_size=min_size),
    ):
        assert sizes.dtype == np.int64
        assert sizes.shape == (num_clients,)
        assert int(sizes.sum()) == num_samples
        assert int(sizes.min()) >= min_size


def test_partition_from_owner_round_trip() -> None:
    owner = np.random.default_rng(0).integers(0, 7, size=500)
    parts = Partition.from_owner(owner, 9)
    check_valid(parts, 500, 9)
    assert np.array_equal(parts.owner(), owner)
    assert parts.sizes[7] == parts.sizes[8] == 0
    assert np.array_equal(parts[3], np.flatnonzero(owner == 3))


# --------------------------------------------------------------------------------------------
# What each method promises
# --------------------------------------------------------------------------------------------


def test_iid_is_balanced_and_mixed() -> None:
    parts = iid_partition(1003, 10, seed=0)
    assert sorted(parts.sizes.tolist()) == [100] * 7 + [101] * 3
    assert int(classes_per_client(LABELS, iid_partition(LABELS.size, 10, seed=0)).min()) == 10


def test_lognormal_sigma_controls_imbalance() -> None:
    assert lognormal_sizes(1000, 10, sigma=0.0, seed=0).tolist() == [100] * 10
    flat = lognormal_sizes(10000, 100, sigma=0.1, seed=0).std()
    skewed = lognormal_sizes(10000, 100, sigma=2.0, seed=0).std()
    assert skewed > 5 * flat
    parts = iid_lognormal_partition(10000, 100, sigma=2.0, seed=0, min_size=20)
    assert int(parts.sizes.min()) >= 20


def test_dirichlet_alpha_controls_label_skew() -> None:
    labels = make_labels(per_class=300)
    skewed = dirichlet_partition(labels, 20, alpha=0.05, seed=0, min_size=5)
    mixed = dirichlet_partition(labels, 20, alpha=100.0, seed=0, min_size=5)
    assert classes_per_client(labels, skewed).mean() < 4
    assert classes_per_client(labels, mixed).mean() > 9
    tv_skewed = partition_stats(class_counts(labels, skewed, 10))["mean_tv_distance"]
    tv_mixed = partition_stats(class_counts(labels, mixed, 10))["mean_tv_distance"]
    assert tv_skewed > 0.6 > 0.2 > tv_mixed


def test_dirichlet_min_size_is_met() -> None:
    parts = dirichlet_partition(LABELS, 20, alpha=0.3, seed=1, min_size=25)
    assert int(parts.sizes.min()) >= 25


def test_dirichlet_gives_up_instead_of_looping_forever() -> None:
    start = time.perf_counter()
    with pytest.raises(PartitionError, match="raise alpha, lower min_size or use fewer clients"):
        # 100 clients x 9 of 1000 samples is feasible in principle but not at alpha=0.01.
        dirichlet_partition(LABELS, 100, alpha=0.01, seed=0, min_size=9, max_retries=200)
    assert time.perf_counter() - start < 10


def test_shards_hold_at_most_shards_per_client_classes() -> None:
    labels = make_labels(per_class=601)  # 6010 samples: cuts cannot all be equal
    parts = shards_partition(labels, 100, shards_per_client=2, seed=0)
    check_valid(parts, labels.size, 100)
    assert int(classes_per_client(labels, parts).max()) <= 2
    assert int(parts.sizes.max() - parts.sizes.min()) <= 4  # shards of 60 or 61 samples


def test_shards_with_fewer_shards_than_classes_still_cover_everything() -> None:
    parts = shards_partition(LABELS, 2, shards_per_client=2, seed=0)
    check_valid(parts, LABELS.size, 2)
    assert parts.sizes.tolist() == [500, 500]


def test_shards_error_when_more_shards_than_samples() -> None:
    with pytest.raises(PartitionError, match="use at most 2 shards per client"):
        shards_partition(np.zeros(10, dtype=np.int64), 5, shards_per_client=3, seed=0)


def test_label_quantity_gives_exactly_k_classes() -> None:
    parts = label_quantity_partition(LABELS, 20, classes_per_client=3, seed=0)
    held = classes_per_client(LABELS, parts)
    assert held.tolist() == [3] * 20
    owners = (class_counts(LABELS, parts, 10) > 0).sum(axis=0)
    assert owners.tolist() == [6] * 10  # 20 clients x 3 classes spread evenly over 10 classes


def test_label_quantity_errors() -> None:
    with pytest.raises(PartitionError, match=r"classes_per_client must be in 1\.\.10"):
        label_quantity_partition(LABELS, 20, classes_per_client=11, seed=0)
    with pytest.raises(PartitionError, match="use at least 5 clients"):
        label_quantity_partition(LABELS, 4, classes_per_client=2, seed=0)


def test_client_dirichlet_respects_sizes_and_skews() -> None:
    labels = make_labels(per_class=200)
    sizes = lognormal_sizes(labels.size, 25, sigma=0.8, seed=0, min_size=10)
    parts = client_dirichlet_partition(labels, 25, alpha=0.1, seed=0, client_sizes=sizes)
    check_valid(parts, labels.size, 25)
    assert np.array_equal(parts.sizes, sizes)
    balanced = client_dirichlet_partition(labels, 25, alpha=0.1, seed=0)
    assert int(balanced.sizes.max() - balanced.sizes.min()) <= 1
    mixed = client_dirichlet_partition(labels, 25, alpha=100.0, seed=0)
    assert classes_per_client(labels, balanced).mean() < classes_per_client(labels, mixed).mean()


def test_client_dirichlet_size_errors() -> None:
    with pytest.raises(PartitionError, match="must add up exactly"):
        client_dirichlet_partition(LABELS, 2, alpha=1.0, seed=0, client_sizes=[500, 499])
    with pytest.raises(PartitionError, match="has 3 entries but there are 2 clients"):
        client_dirichlet_partition(LABELS, 2, alpha=1.0, seed=0, client_sizes=[500, 499, 1])
    with pytest.raises(PartitionError, match=">= 1"):
        client_dirichlet_partition(LABELS, 2, alpha=1.0, seed=0, client_sizes=[1000, 0])


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["iid-dirichlet", "dirichlet", "client-dirichlet"])
@pytest.mark.parametrize("alpha", [0.0, -1.0, math.nan, math.inf])
def test_bad_alpha(method: str, alpha: float) -> None:
    with pytest.raises(PartitionError, match="alpha must be a positive finite number"):
        partition(LABELS, 5, method=method, seed=0, alpha=alpha)


@pytest.mark.parametrize("method", PARTITION_METHODS)
@pytest.mark.parametrize("num_clients", [0, -3])
def test_bad_num_clients(method: str, num_clients: int) -> None:
    with pytest.raises(PartitionError, match="num_clients must be at least 1"):
        partition(LABELS, num_clients, method=method, seed=0, **PARAMS[method])


@pytest.mark.parametrize("method", PARTITION_METHODS)
def test_more_clients_than_samples(method: str) -> None:
    labels = np.arange(5, dtype=np.int64) % 2
    with pytest.raises(PartitionError, match="use at most 5 clients"):
        partition(labels, 6, method=method, seed=0, **PARAMS[method])


def test_unreachable_min_size() -> None:
    with pytest.raises(PartitionError, match="lower min_size to at most 50"):
        dirichlet_partition(LABELS, 20, alpha=1.0, seed=0, min_size=51)
    with pytest.raises(PartitionError, match="lower min_size to at most 50"):
        lognormal_sizes(1000, 20, sigma=1.0, seed=0, min_size=51)


def test_bad_sigma() -> None:
    with pytest.raises(PartitionError, match="sigma must be a finite number >= 0"):
        iid_lognormal_partition(100, 5, sigma=-1.0, seed=0)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros((4, 4), dtype=np.int64), "1-D"),
        (np.array([0.0, 1.0, 2.0]), "integer"),
        (np.array([0, -1, 2]), "non-negative"),
    ],
)
def test_bad_labels(labels: npt.NDArray[Any], message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        dirichlet_partition(labels, 1, alpha=1.0, seed=0, min_size=1)


def test_messages_are_one_line() -> None:
    with pytest.raises(PartitionError) as info:
        dirichlet_partition(LABELS, 100, alpha=0.01, seed=0, min_size=9, max_retries=5)
    assert "\n" not in str(info.value)


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="unknown partition method 'noniid'") as info:
        partition(LABELS, 5, method="noniid", seed=0)
    for name in PARTITION_METHODS:
        assert name in str(info.value)


def test_unknown_and_missing_options() -> None:
    with pytest.raises(ConfigError, match=r"does not take option.*'sigma'.*alpha, min_size"):
        partition(LABELS, 5, method="dirichlet", seed=0, alpha=1.0, sigma=2.0)
    with pytest.raises(ConfigError, match=r"needs option.*'alpha'"):
        partition(LABELS, 5, method="dirichlet", seed=0)


def test_partition_rejects_invalid_index_sets() -> None:
    with pytest.raises(PartitionError, match="assigned to 2 clients"):
        Partition((np.array([0, 1]), np.array([1, 2])), 3)
    with pytest.raises(PartitionError, match="assigned to no client"):
        Partition((np.array([0]), np.array([2])), 3)
    with pytest.raises(PartitionError, match=r"outside 0\.\.2"):
        Partition((np.array([0, 1, 2, 3]),), 3)


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def test_class_counts_match_the_partition() -> None:
    parts = partition(LABELS, 20, method="dirichlet", seed=0, alpha=0.5)
    counts = class_counts(LABELS, parts, NUM_CLASSES)
    assert counts.shape == (20, NUM_CLASSES)
    assert np.array_equal(counts.sum(axis=1), parts.sizes)
    assert np.array_equal(counts.sum(axis=0), np.bincount(LABELS))
    with pytest.raises(PartitionError, match=r"labels must lie in 0\.\.4"):
        class_counts(LABELS, parts, 5)


def test_csv_round_trip(tmp_path: Path) -> None:
    parts = partition(LABELS, 20, method="shards", seed=0, shards_per_client=2)
    counts = class_counts(LABELS, parts, NUM_CLASSES)
    path = tmp_path / "partition.csv"
    write_partition_csv(path, counts)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["client", *(f"class_{k}" for k in range(NUM_CLASSES)), "total"]
    assert len(rows) == 21
    body = np.array(rows[1:], dtype=np.int64)
    assert body[:, 0].tolist() == list(range(20))
    assert np.array_equal(body[:, -1], body[:, 1:-1].sum(axis=1))
    assert int(body[:, -1].sum()) == LABELS.size
    assert np.array_equal(read_partition_csv(path), counts)


def test_read_partition_csv_checks_totals(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("client,class_0,class_1,total\n0,1,2,4\n")
    with pytest.raises(PartitionError, match="total is not the sum"):
        read_partition_csv(path)


@pytest.mark.parametrize("num_clients", [10, 1000])
def test_heatmap_is_a_png(tmp_path: Path, num_clients: int) -> None:
    labels = make_labels(per_class=1000)
    parts = partition(labels, num_clients, method="client-dirichlet", seed=0, alpha=0.5)
    path = tmp_path / f"heatmap_{num_clients}.png"
    plot_partition_heatmap(path, class_counts(labels, parts, NUM_CLASSES))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


def test_partition_stats_values() -> None:
    counts = np.array([[3, 0, 1], [0, 0, 0], [2, 2, 2]])
    stats = partition_stats(counts)
    assert stats["num_clients"] == 3
    assert stats["num_classes"] == 3
    assert stats["num_samples"] == 10
    assert stats["min_size"] == 0
    assert stats["max_size"] == 6
    assert stats["mean_size"] == pytest.approx(10 / 3)
    assert stats["std_size"] == pytest.approx(np.std([4, 0, 6]))
    assert stats["empty_clients"] == 1
    assert stats["min_classes_per_client"] == 0
    assert stats["max_classes_per_client"] == 3
    assert stats["mean_classes_per_client"] == pytest.approx(5 / 3)
    overall = np.array([5, 2, 3]) / 10
    tv = (
        0.5 * np.abs(np.array([3, 0, 1]) / 4 - overall).sum()
        + 0.5 * np.abs(np.array([2, 2, 2]) / 6 - overall).sum()
    ) / 2
    assert stats["mean_tv_distance"] == pytest.approx(tv)
    assert partition_stats(np.full((4, 5), 7))["mean_tv_distance"] == pytest.approx(0.0)

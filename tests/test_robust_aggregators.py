"""Byzantine-robust aggregators against brute-force references written here in float64.

Krum, Multi-Krum and Bulyan against a direct transcription of their papers' rules (every
pair's distance, every neighbour set, each Bulyan pick recomputed on what is left); the
geometric median against Weiszfeld's iterations in float64 and against its defining
property; the clipped mean against its formula. Identities: one update is its own
aggregate for every rule, identical honest updates give that update, Multi-Krum of all
updates is their mean, the clipped mean with an infinite bound is the mean bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from emberfl.aggregation import (
    AGGREGATORS,
    Aggregator,
    Bulyan,
    ClippedMean,
    GeometricMedian,
    Krum,
    Mean,
    Median,
    MultiKrum,
    TrimmedMean,
    UpdateSet,
)
from emberfl.errors import InvalidArgumentError


def _set(x: torch.Tensor, weights: list[float] | None = None) -> UpdateSet:
    updates = UpdateSet(x.shape[0], x.shape[1])
    for i, row in enumerate(x):
        updates.add(row, 1.0 if weights is None else weights[i], source=f"client {i}")
    return updates


def _combine(rule: Aggregator, x: torch.Tensor, weights: list[float] | None = None) -> torch.Tensor:
    out = torch.empty(x.shape[1], dtype=torch.float32)
    with _set(x, weights) as updates:
        rule.combine(updates, out, num_threads=2)
    return out


def _updates(m: int, d: int, seed: int, outliers: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g) * 0.1 + 1.0
    x[:outliers] = -5.0 * torch.rand(outliers, d, generator=g) - 3.0  # a Byzantine cluster
    return x


def _ref_scores(x: np.ndarray, f: int) -> np.ndarray:
    m = len(x)
    scores = []
    for i in range(m):
        d = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in range(m) if j != i)
        scores.append(sum(d[: max(m - f - 2, 0)]))
    return np.array(scores)


def _ref_krum(x: np.ndarray, f: int) -> int:
    return int(np.argmin(_ref_scores(x, f)))  # first of equal scores


def _ref_bulyan(x: np.ndarray, f: int) -> np.ndarray:
    pool = list(range(len(x)))
    picked = []
    for _ in range(len(x) - 2 * f):
        best = _ref_krum(x[pool], f)
        picked.append(pool.pop(best))
    chosen = np.sort(x[sorted(picked)], axis=0)
    return chosen[f : len(picked) - f].mean(axis=0)


@pytest.mark.parametrize(("m", "f", "seed"), [(7, 2, 0), (10, 3, 1), (12, 1, 2), (5, 0, 3)])
def test_krum_picks_the_brute_force_choice(m: int, f: int, seed: int) -> None:
    x = _updates(m, 300, seed, outliers=f)
    x64 = x.double().numpy()
    out = _combine(Krum(f), x)
    expected = _ref_krum(x64, f)
    assert expected >= f  # the reference never picks the Byzantine cluster here
    assert torch.equal(out, x[expected])


@pytest.mark.parametrize(("m", "f", "k"), [(9, 2, None), (9, 2, 3), (11, 4, 1)])
def test_multi_krum_is_the_mean_of_the_best_scores(m: int, f: int, k: int | None) -> None:
    x = _updates(m, 250, m + f, outliers=f)
    x64 = x.double().numpy()
    keep = k if k is not None else m - f
    best = np.argsort(_ref_scores(x64, f), kind="stable")[:keep]
    expected = torch.from_numpy(x64[np.sort(best)].mean(axis=0))
    out = _combine(MultiKrum(f, k), x)
    assert float((out.double() - expected).abs().max() / expected.abs().max()) <= 1e-6


@pytest.mark.parametrize(("m", "f", "seed"), [(7, 1, 0), (11, 2, 1), (15, 3, 2), (3, 0, 3)])
def test_bulyan_matches_the_brute_force_rule(m: int, f: int, seed: int) -> None:
    x = _updates(m, 400, seed, outliers=f)
    expected = torch.from_numpy(_ref_bulyan(x.double().numpy(), f))
    out = _combine(Bulyan(f), x)
    assert float((out.double() - expected).abs().max() / expected.abs().max()) <= 1e-6
    # The Byzantine cluster (far below) does not pull the result.
    assert float(out.min()) > 0.5


def _weiszfeld(x: np.ndarray, a: np.ndarray, iterations: int, nu: float = 1e-6) -> np.ndarray:
    a = a / a.sum()
    v = (a[:, None] * x).sum(0)
    for _ in range(iterations):
        b = a / np.maximum(nu, np.sqrt(((x - v) ** 2).sum(1)))
        v = (b[:, None] * x).sum(0) / b.sum()
    return v


def _objective(x: np.ndarray, a: np.ndarray, v: np.ndarray) -> float:
    return float((a * np.sqrt(((x - v) ** 2).sum(1))).sum())


def test_geometric_median_is_weiszfelds_and_minimises_the_distance_sum() -> None:
    x = _updates(9, 50, 4, outliers=3)
    weights = [1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 2.0, 1.0, 1.0]
    rule = GeometricMedian(max_iterations=200, tolerance=0.0)
    out = _combine(rule, x, weights).double().numpy()
    x64, a = x.double().numpy(), np.array(weights)
    reference = _weiszfeld(x64, a, 500)
    assert np.abs(out - reference).max() / np.abs(reference).max() <= 1e-4
    best = _objective(x64, a, out)
    rng = np.random.default_rng(0)
    for _ in range(20):  # no nearby point is better (up to float32 rounding)
        assert best <= _objective(x64, a, out + 1e-3 * rng.standard_normal(out.shape)) + 1e-6
    assert best < _objective(x64, a, (a[:, None] * x64).sum(0) / a.sum())  # beats the mean
    # Few iterations already give the float64 iterations' point.
    short = GeometricMedian(max_iterations=3, tolerance=0.0)
    three = _combine(short, x, weights).double().numpy()
    assert short.last_iterations == 3
    assert np.abs(three - _weiszfeld(x64, a, 3)).max() / np.abs(reference).max() <= 1e-5


def test_clipped_mean_is_its_formula_and_the_mean_without_a_bound() -> None:
    x = _updates(6, 100, 5)
    x[0] *= 50.0  # a boosted update
    weights = [3.0, 1.0, 2.0, 1.0, 1.0, 2.0]
    c = 5.0
    out = _combine(ClippedMean(c), x, weights)
    x64, w = x.double(), torch.tensor(weights, dtype=torch.float64)
    scale = (c / x64.norm(dim=1)).clamp(max=1.0)
    expected = (w[:, None] * scale[:, None] * x64).sum(0) / w.sum()
    assert float((out.double() - expected).abs().max() / expected.abs().max()) <= 1e-6
    assert torch.equal(_combine(ClippedMean(math.inf), x, weights), _combine(Mean(), x, weights))


RULES = {
    "mean": Mean,
    "median": Median,
    "trimmed-mean": lambda: TrimmedMean(0.0),
    "krum": lambda: Krum(0),
    "multi-krum": lambda: MultiKrum(0),
    "bulyan": lambda: Bulyan(0),
    "geometric-median": GeometricMedian,
    "clipped-mean": lambda: ClippedMean(1e30),
}


def test_every_rule_is_named_for_the_cli() -> None:
    assert set(RULES) == set(AGGREGATORS)
    for name, cls in AGGREGATORS.items():
        assert cls.name == name


@pytest.mark.parametrize("name", sorted(RULES))
def test_one_update_is_its_own_aggregate(name: str) -> None:
    x = _updates(1, 64, 6)
    assert torch.equal(_combine(RULES[name](), x, [3.0]), x[0])


@pytest.mark.parametrize("name", sorted(RULES))
def test_identical_honest_updates_give_that_update(name: str) -> None:
    row = _updates(1, 64, 7)[0]
    x = row.repeat(7, 1)
    out = _combine(RULES[name](), x, [1.0, 2.0, 1.0, 1.0, 3.0, 1.0, 1.0])
    assert float((out - row).abs().max()) <= 1e-6 * float(row.abs().max())


def test_multi_krum_of_every_update_is_their_mean() -> None:
    x = _updates(8, 80, 8)
    out = _combine(MultiKrum(f=0, k=8), x)
    assert torch.equal(out, _combine(Mean(), x))  # both the uniform mean, one kernel


@pytest.mark.parametrize("name", ["krum", "multi-krum", "bulyan", "geometric-median"])
def test_the_thread_count_does_not_change_the_bits(name: str) -> None:
    rule = {"krum": Krum(2), "multi-krum": MultiKrum(2), "bulyan": Bulyan(2)}.get(
        name, GeometricMedian()
    )
    x = _updates(13, 70_000, 9, outliers=2)
    outs = []
    for threads in (1, 2, 3):
        out = torch.empty(x.shape[1], dtype=torch.float32)
        with _set(x) as updates:
            rule.combine(updates, out, num_threads=threads)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_too_many_byzantine_clients_is_a_clear_error() -> None:
    x = _updates(6, 10, 10)
    with pytest.raises(InvalidArgumentError, match=r"krum with f=2 needs at least 2f \+ 3 = 7"):
        _combine(Krum(2), x)
    with pytest.raises(InvalidArgumentError, match=r"bulyan with f=1 needs at least 4f \+ 3 = 7"):
        _combine(Bulyan(1), x)
    with pytest.raises(InvalidArgumentError, match="multi-krum averages k=9 of 6"):
        _combine(MultiKrum(0, 9), x)
    with pytest.raises(InvalidArgumentError, match="clip_norm must be > 0"):
        ClippedMean(0.0)
    with pytest.raises(InvalidArgumentError, match="f"):
        Krum(-1)

"""Aggregation kernels: float64 references, bitwise thread-count independence, bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emberfl import aggregation as agg
from emberfl import errors, rng
from emberfl.arena import ParamArena

THREADS = (1, 2, 3, 8)


def make_arena(k: int, dim: int, seed: int = 0, *, extra: int = 1) -> ParamArena:
    arena = ParamArena.from_model(
        {"a": torch.zeros(dim // 2), "b": torch.zeros(dim - dim // 2)}, k + extra
    )
    data = rng.stream(seed, purpose=99).normal(k * dim).reshape(k, dim).astype(np.float32)
    arena.tensor[:k] = torch.from_numpy(data)
    return arena


def rel_close(got: torch.Tensor, ref: np.ndarray, tol: float = 1e-6) -> None:
    g = got.double().numpy()
    np.testing.assert_allclose(g, ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 9),
    dim=st.integers(2, 30_000),
    weights=st.lists(st.floats(0.0, 1e4), min_size=9, max_size=9),
    seed=st.integers(0, 2**32),
)
def test_weighted_mean_matches_float64(k: int, dim: int, weights: list[float], seed: int) -> None:
    w = weights[:k]
    if sum(w) == 0:
        w[0] = 1.0
    with make_arena(k, dim, seed) as arena:
        agg.weighted_mean(arena, list(range(k)), w, out=k)
        x = arena.tensor[:k].double().numpy()
        ref = (np.asarray(w)[:, None] * x).sum(0) / sum(w)
        rel_close(arena.slot(k), ref)


def test_all_kernels_bitwise_identical_across_thread_counts() -> None:
    k, dim = 7, 100_003
    with make_arena(k, dim, 3, extra=2) as arena:
        slots = [6, 0, 3, 1, 5, 2, 4]  # order matters, not slot ids
        w = [float(i + 1) ** 1.5 for i in range(k)]
        results = []
        for t in THREADS:
            agg.weighted_mean(arena, slots, w, out=k, num_threads=t)
            agg.median(arena, slots, out=k + 1, num_threads=t)
            tm = torch.empty(dim)
            agg.trimmed_mean(arena, slots, tm, 0.2, num_threads=t)
            results.append(
                (
                    arena.slot(k).clone(),
                    arena.slot(k + 1).clone(),
                    tm,
                    agg.norms(arena, slots, num_threads=t),
                    agg.pairwise_sq_dists(arena, slots, num_threads=t),
                )
            )
        for other in results[1:]:
            for a, b in zip(results[0], other, strict=True):
                assert torch.equal(a, b)  # bitwise, not approximately


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_median_and_trimmed_mean_match_numpy(k: int) -> None:
    dim = 5000
    with make_arena(k, dim, k) as arena:
        x = arena.tensor[:k].double().numpy()
        agg.median(arena, range(k), out=k)
        rel_close(arena.slot(k), np.median(x, axis=0))
        for beta in (0.0, 0.1, 0.25, 0.49):
            cut = int(beta * k)
            if k - 2 * cut < 1:
                continue
            agg.trimmed_mean(arena, range(k), k, beta)
            ref = np.sort(x, axis=0)[cut : k - cut].mean(0)
            rel_close(arena.slot(k), ref)


def test_norms_and_distances_match_numpy() -> None:
    k, dim = 6, 40_000
    with make_arena(k, dim, 1) as arena:
        x = arena.tensor[:k].double().numpy()
        np.testing.assert_allclose(
            agg.norms(arena, range(k)).numpy(), np.linalg.norm(x, axis=1), rtol=1e-12
        )
        d = agg.pairwise_sq_dists(arena, range(k)).numpy()
        ref = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        np.testing.assert_allclose(d, ref, rtol=1e-12)
        assert (np.diag(d) == 0).all() and (d == d.T).all()


def test_output_targets() -> None:
    with make_arena(3, 1000, 5) as arena:
        x = arena.tensor[:3].double().numpy()
        ref = x.mean(0)
        ext = torch.empty(1000)
        agg.weighted_mean(arena, [0, 1, 2], [1, 1, 1], ext)
        rel_close(ext, ref)
        agg.weighted_mean(arena, [0, 1, 2], [1, 1, 1], arena.slot(3))  # a view of a slot
        assert torch.equal(arena.slot(3), ext)
        agg.weighted_mean(arena, [0, 1, 2], np.ones(3), out=0)  # in place over an input
        assert torch.equal(arena.slot(0), ext)


def test_zero_weight_slot_is_skipped() -> None:
    with make_arena(3, 100, 2) as arena:
        arena.slot(2).fill_(float("nan"))
        agg.weighted_mean(arena, [0, 1, 2], [1.0, 3.0, 0.0], out=3)
        ref = (arena.tensor[0].double() + 3 * arena.tensor[1].double()) / 4
        rel_close(arena.slot(3), ref.numpy())


def test_bad_weights_leave_output_untouched() -> None:
    with make_arena(2, 100) as arena:
        arena.slot(2).fill_(9.0)
        cases = [
            ([float("nan"), 1.0], "weight 0 is NaN"),
            ([1.0, -2.0], "weight 1 is negative"),
            ([0.0, 0.0], "sum to zero"),
            ([1.0], "got 1 weights for 2 slots"),
            ([1.0, float("inf")], "infinite"),
        ]
        for w, msg in cases:
            with pytest.raises(errors.InvalidWeightsError, match=msg):
                agg.weighted_mean(arena, [0, 1], w, out=2)
        with pytest.raises(errors.InvalidWeightsError, match=r"weights\[0\] must be a number"):
            agg.weighted_mean(arena, [0, 1], ["a", "b"], out=2)  # type: ignore[list-item]
        assert torch.all(arena.slot(2) == 9.0)


def test_non_finite_update_is_named_and_output_untouched() -> None:
    with make_arena(3, 5000, 4) as arena:
        arena.slot(3).fill_(9.0)
        arena.slot(1)[4000] = float("inf")
        with pytest.raises(errors.NonFiniteError, match=r"slot 1 .*'b' \[index 1500\] is inf"):
            agg.weighted_mean(arena, [0, 1, 2], [1, 1, 1], out=3)
        arena.slot(1)[4000] = float("nan")
        with pytest.raises(errors.NonFiniteError, match="slot 1"):
            agg.median(arena, [0, 1, 2], out=3)
        with pytest.raises(errors.NonFiniteError, match="slot 1"):
            agg.trimmed_mean(arena, [2, 1], 3, 0.0)
        assert torch.all(arena.slot(3) == 9.0)


def test_bad_slots_and_outputs() -> None:
    with make_arena(2, 64) as arena:
        with pytest.raises(errors.SlotIndexError, match="slot 7 is out of range"):
            agg.weighted_mean(arena, [0, 7], [1, 1], out=2)
        with pytest.raises(errors.SlotIndexError):
            agg.weighted_mean(arena, [0, 1], [1, 1], out=9)
        with pytest.raises(errors.SlotIndexError, match="slot -1 is out of range"):
            agg.weighted_mean(arena, [0, -1], [1, 1], out=2)
        with pytest.raises(errors.InvalidArgumentError, match="slot list is empty"):
            agg.weighted_mean(arena, [], [], out=2)
        with pytest.raises(errors.InvalidArgumentError, match="empty"):
            agg.norms(arena, [])
        with pytest.raises(errors.TensorMismatchError, match="float32"):
            agg.median(arena, [0, 1], torch.empty(64, dtype=torch.float64))
        with pytest.raises(errors.TensorMismatchError, match="64 elements"):
            agg.median(arena, [0, 1], torch.empty(63))
        with pytest.raises(errors.TensorMismatchError, match="contiguous"):
            agg.median(arena, [0, 1], torch.empty(128)[::2])
        with pytest.raises(errors.TensorMismatchError, match="aligned"):
            agg.median(arena, [0, 1], arena.tensor.view(-1)[1:65])
        with pytest.raises(errors.InvalidArgumentError, match="beta"):
            agg.trimmed_mean(arena, [0, 1], 2, 0.5)
        with pytest.raises(errors.InvalidArgumentError, match=r"num_threads must be .*, got 0"):
            agg.median(arena, [0, 1], 2, num_threads=0)
        with pytest.raises(errors.InvalidArgumentError, match="out must be a slot index"):
            agg.median(arena, [0, 1], "2")  # type: ignore[arg-type]


def test_concurrent_calls_from_python_threads() -> None:
    arenas = [make_arena(4, 50_000, s) for s in range(4)]
    expected = []
    for a in arenas:
        agg.weighted_mean(a, range(4), [1, 2, 3, 4], out=4)
        expected.append(a.slot(4).clone())
        a.slot(4).zero_()
    errors_seen: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                agg.weighted_mean(arenas[i], range(4), [1, 2, 3, 4], out=4, num_threads=2)
                agg.norms(arenas[(i + 1) % 4], range(4))
        except BaseException as e:  # pragma: no cover - reported below
            errors_seen.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors_seen
    for a, e in zip(arenas, expected, strict=True):
        assert torch.equal(a.slot(4), e)
        a.close()

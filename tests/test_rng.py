"""Philox streams: known answers, bit-identity with numpy, state and determinism."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emberfl import rng

U64 = st.integers(min_value=0, max_value=2**64 - 1)


def numpy_philox(seed: int, purpose: int = 0, client: int = 0, round: int = 0) -> np.random.Philox:
    key = np.array([seed, purpose], dtype=np.uint64)
    counter = np.array([0, client, round, 0], dtype=np.uint64)
    return np.random.Philox(key=key, counter=counter)


def test_philox4x64_known_answers() -> None:
    # Random123 tests/kat_vectors.
    assert rng.philox4x64_10([0, 0, 0, 0], [0, 0]) == [
        0x16554D9ECA36314C,
        0xDB20FE9D672D0FDC,
        0xD7E772CEE186176B,
        0x7E68B68AEC7BA23B,
    ]
    ones = 2**64 - 1
    assert rng.philox4x64_10([ones] * 4, [ones] * 2) == [
        0x87B092C3013FE90B,
        0x438C3C67BE8D0224,
        0x9CC7D7C69CD777B6,
        0xA09CAEBF594F0BA0,
    ]


def test_philox4x32_known_answers() -> None:
    assert rng.philox4x32_10([0, 0, 0, 0], [0, 0]) == [
        0x6627E8D5,
        0xE169C58D,
        0xBC57AC4C,
        0x9B00DBD8,
    ]


def test_block_function_agrees_with_stream() -> None:
    # A stream's first block is the block function at counter + 1.
    s = rng.stream(5, purpose=6, client=7, round=8)
    assert s.random_raw(4).tolist() == rng.philox4x64_10([1, 7, 8, 0], [5, 6])


@settings(max_examples=60, deadline=None)
@given(seed=U64, purpose=U64, client=U64, round=U64, n=st.integers(0, 3000))
def test_random_raw_matches_numpy(seed: int, purpose: int, client: int, round: int, n: int) -> None:
    ours = rng.stream(seed, purpose=purpose, client=client, round=round).random_raw(n)
    ref = numpy_philox(seed, purpose, client, round).random_raw(n)
    assert ours.dtype == np.uint64
    np.testing.assert_array_equal(ours, ref)


@settings(max_examples=40, deadline=None)
@given(seed=U64, client=U64, sizes=st.lists(st.integers(0, 9), min_size=1, max_size=8))
def test_split_draws_match_one_draw(seed: int, client: int, sizes: list[int]) -> None:
    s = rng.stream(seed, client=client)
    parts = np.concatenate([s.random_raw(k) for k in sizes])
    np.testing.assert_array_equal(parts, numpy_philox(seed, 0, client).random_raw(sum(sizes)))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 255, 256, 1000, 65_539])
@pytest.mark.parametrize("key", [(0, 0, 0, 0), (42, 1, 3, 2), (2**64 - 1, 7, 2**40, 9)])
def test_permutation_matches_numpy(n: int, key: tuple[int, int, int, int]) -> None:
    seed, purpose, client, round = key
    ours = rng.stream(seed, purpose=purpose, client=client, round=round).permutation(n)
    ref = np.random.Generator(numpy_philox(seed, purpose, client, round)).permutation(n)
    np.testing.assert_array_equal(ours, ref)


@settings(max_examples=40, deadline=None)
@given(seed=U64, n=st.integers(0, 5000))
def test_permutation_matches_numpy_many_keys(seed: int, n: int) -> None:
    ref = np.random.Generator(numpy_philox(seed)).permutation(n)
    np.testing.assert_array_equal(rng.stream(seed).permutation(n), ref)


@pytest.mark.parametrize(
    ("low", "high"),
    [(0, 1), (0, 2), (3, 1000), (-50, 50), (0, 2**32), (0, 2**32 + 1), (-(2**62), 2**62), (0, 7)],
)
def test_random_and_integers_match_numpy_generator(low: int, high: int) -> None:
    s = rng.stream(11, purpose=2, client=5)
    g = np.random.Generator(numpy_philox(11, 2, 5))
    # Interleave 32-bit and 64-bit consumers: the pending half word must behave like numpy's.
    for _ in range(3):
        np.testing.assert_array_equal(s.integers(low, high, 37), g.integers(low, high, 37))
        np.testing.assert_array_equal(s.random(5), g.random(5))
        np.testing.assert_array_equal(s.random_raw(3), g.bit_generator.random_raw(3))


def test_numpy_generator_is_the_same_stream() -> None:
    g = rng.numpy_generator(9, purpose=rng.Purpose.PARTITION, client=4, round=1)
    s = rng.stream(9, purpose=rng.Purpose.PARTITION, client=4, round=1)
    np.testing.assert_array_equal(g.bit_generator.random_raw(100), s.random_raw(100))


def test_normal_moments_and_determinism() -> None:
    x = rng.stream(3).normal(200_001)
    assert x.dtype == np.float64 and x.shape == (200_001,)
    assert abs(x.mean()) < 0.01
    assert abs(x.std() - 1.0) < 0.01
    assert abs(float(np.mean(x**3))) < 0.03  # symmetric
    np.testing.assert_array_equal(x, rng.stream(3).normal(200_001))


def test_random_range() -> None:
    x = rng.stream(1).random(100_000)
    assert x.min() >= 0.0 and x.max() < 1.0
    assert abs(x.mean() - 0.5) < 0.01


@pytest.mark.parametrize(("n", "k"), [(10, 10), (10, 0), (1000, 3), (100_000, 40), (50, 49)])
def test_choice_distinct_in_range(n: int, k: int) -> None:
    c = rng.stream(8, client=2).choice(n, k)
    assert c.shape == (k,) and c.dtype == np.int64
    assert len(set(c.tolist())) == k
    assert all(0 <= v < n for v in c.tolist())
    np.testing.assert_array_equal(c, rng.stream(8, client=2).choice(n, k))


def test_choice_is_uniform() -> None:
    counts = np.zeros(20)
    for client in range(2000):
        counts[rng.stream(1, client=client).choice(20, 5)] += 1
    expected = 2000 * 5 / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50.0  # 19 dof: p < 1e-4 beyond ~43.8


def test_bad_arguments() -> None:
    s = rng.stream(0)
    with pytest.raises(ValueError, match="low=5 must be smaller than high=5"):
        s.integers(5, 5, 1)
    with pytest.raises(ValueError, match="k=11 distinct values out of n=10"):
        s.choice(10, 11)
    with pytest.raises(ValueError, match=r"seed must be an integer in 0\.\.2\*\*64-1, got -1"):
        rng.stream(-1)
    with pytest.raises(ValueError, match="client"):
        rng.numpy_generator(0, client=2**64)


def test_torch_seed_per_client() -> None:
    seeds = {rng.stream(0, purpose=3, client=c).torch_seed() for c in range(1000)}
    assert len(seeds) == 1000
    assert (
        rng.stream(0, purpose=3, client=7).torch_seed()
        == rng.stream(0, purpose=3, client=7).torch_seed()
    )
    assert all(0 <= s < 2**64 for s in seeds)


def test_state_round_trip_and_pickle() -> None:
    s = rng.stream(21, client=4)
    s.random_raw(5)
    s.integers(0, 10, 1)  # leaves a pending 32-bit half word
    restored = rng.Stream.from_state(s.state())
    pickled = pickle.loads(pickle.dumps(s))
    copied = s.copy()
    expected = s.integers(0, 1000, 9)
    for other in (restored, pickled, copied):
        np.testing.assert_array_equal(other.integers(0, 1000, 9), expected)
    with pytest.raises(ValueError, match="buffer position"):
        rng.Stream.from_state((0, 0, 0, 0, 0, 0, 9, False, 0))


def test_streams_are_thread_independent() -> None:
    expected = {c: rng.stream(5, client=c).random_raw(20_000) for c in range(8)}
    got: dict[int, np.ndarray] = {}

    def draw(c: int) -> None:
        got[c] = rng.stream(5, client=c).random_raw(20_000)

    threads = [threading.Thread(target=draw, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in range(8):
        np.testing.assert_array_equal(got[c], expected[c])


def test_shared_stream_under_threads_gives_each_word_once() -> None:
    s = rng.stream(77)
    out: list[np.ndarray] = []
    lock = threading.Lock()

    def draw() -> None:
        for _ in range(50):
            x = s.random_raw(100)
            with lock:
                out.append(x)

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    words = np.sort(np.concatenate(out))
    np.testing.assert_array_equal(words, np.sort(numpy_philox(77).random_raw(20_000)))

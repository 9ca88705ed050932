"""emberfl.reproducibility, and FedAvg's bitwise determinism across runs, P and modes."""

from __future__ import annotations

import multiprocessing
import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from emberfl.reproducibility import (
    RandomStateSnapshot,
    RNGSuite,
    client_rng_suite,
    create_rng_suite,
    seed_everything,
    setup_reproducibility,
)
from emberfl.rng import Purpose, stream
from test_fedavg import TinyDataset, make_trainer, run_fedavg


def _draw(suite: RNGSuite) -> tuple[float, float, list[float]]:
    return (
        suite.python.random(),
        float(suite.numpy.random()),
        torch.rand(3, generator=suite.torch_cpu).tolist(),
    )


def _draw_in_child(args: tuple[int, int, int]) -> tuple[float, float, list[float]]:
    return _draw(client_rng_suite(*args))


def _global_state() -> tuple[Any, ...]:
    return (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state())


def test_client_rng_suite_is_a_pure_function_of_seed_cid_round() -> None:
    assert _draw(client_rng_suite(7, 3, 2)) == _draw(client_rng_suite(7, 3, 2))
    draws = {str(_draw(client_rng_suite(7, c, r))) for c in range(4) for r in range(3)}
    draws.add(str(_draw(client_rng_suite(8, 0, 0))))
    assert len(draws) == 13


def test_client_rng_suite_comes_from_the_client_training_stream() -> None:
    suite = client_rng_suite(11, 5, 4)
    s = stream(11, purpose=Purpose.CLIENT_TRAINING, client=5, round=4)
    assert suite.torch_cpu.initial_seed() == s.torch_seed()
    ref = np.random.Generator(
        np.random.Philox(key=[11, int(Purpose.CLIENT_TRAINING)], counter=[0, 5, 4, 0])
    )
    ref.bit_generator.random_raw(4)
    assert suite.numpy.random() == ref.random()


@pytest.mark.timeout(120)
def test_client_rng_suite_is_the_same_in_threads_and_processes() -> None:
    args = [(3, cid, 1) for cid in range(4)]
    expected = [_draw(client_rng_suite(*a)) for a in args]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(_draw_in_child, args)) == expected
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.map(_draw_in_child, args) == expected


def test_create_rng_suite_follows_blazefl() -> None:
    suite = create_rng_suite(5)
    assert suite.python.random() == random.Random(5).random()
    assert suite.numpy.random() == np.random.default_rng(5).random()
    assert torch.equal(
        torch.rand(2, generator=suite.torch_cpu),
        torch.rand(2, generator=torch.Generator().manual_seed(5)),
    )


def test_snapshot_restores_the_global_state() -> None:
    before = RandomStateSnapshot.capture()
    try:
        seed_everything(123)
        snap = RandomStateSnapshot.capture()
        expected = (random.random(), np.random.rand(), torch.rand(1).item())
        random.random()
        RandomStateSnapshot.restore(snap)
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
        assert os.environ["PYTHONHASHSEED"] == "123"
    finally:
        RandomStateSnapshot.restore(before)


def test_setup_reproducibility_sets_hash_seed_and_cudnn() -> None:
    old = os.environ.get("PYTHONHASHSEED")
    try:
        setup_reproducibility(9)
        assert os.environ["PYTHONHASHSEED"] == "9"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        if old is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = old


# -- FedAvg determinism ----------------------------------------------------------------
# (mode, parallelism, clients finish out of order)
CONFIGS = [
    ("serial", 1, False),
    ("thread", 1, False),
    ("thread", 2, True),
    ("thread", 4, True),
    ("process", 1, False),
    ("process", 2, True),
    ("process", 4, True),
    ("process-spawn", 2, True),
    ("process-forkserver", 2, False),
]


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    dataset = TinyDataset()
    model, _ = run_fedavg(make_trainer("serial", 1, dataset), dataset)
    return model


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("mode", "parallel", "out_of_order"), CONFIGS)
def test_fedavg_is_bitwise_identical_across_modes_and_parallelism(
    reference: torch.Tensor, mode: str, parallel: int, out_of_order: bool
) -> None:
    dataset = TinyDataset()
    state = _global_state()
    threads = torch.get_num_threads()
    mode, _, start_method = mode.partition("-")
    trainer = make_trainer(
        mode, parallel, dataset, out_of_order=out_of_order, start_method=start_method or "auto"
    )
    try:
        model, uplinks = run_fedavg(trainer, dataset)
        assert torch.equal(model, reference), f"{mode} P={parallel} differs from serial"
        if mode == "process":
            expected = start_method or "fork"  # auto forks here: Linux, CPU, one thread
            assert trainer._emberfl_process_pool.start_method == expected
        if mode != "serial":
            # A second run on the same (warm) trainer gives the same bits again.
            again, uplinks = run_fedavg(trainer, dataset)
            assert torch.equal(again, reference)
        if out_of_order:
            # The clients really did finish in reverse order, results came back in order.
            # Checked on the warm run: in a first run a spawned worker still importing
            # PyTorch can leave the other worker to take every client, in order.
            for packages in uplinks:
                finished = [p.metadata["finished_at"] for p in packages]
                assert finished != sorted(finished)
    finally:
        if mode == "process":
            trainer.shutdown()
    # The framework never touches global random state nor leaves the thread count changed.
    assert torch.equal(_global_state()[2], state[2]) and _global_state()[:2] == state[:2]
    assert torch.get_num_threads() == threads


def test_fedavg_repeated_serial_runs_are_identical(reference: torch.Tensor) -> None:
    dataset = TinyDataset()
    model, _ = run_fedavg(make_trainer("serial", 1, dataset), dataset)
    assert torch.equal(model, reference)


def test_a_different_seed_gives_a_different_model(reference: torch.Tensor) -> None:
    dataset = TinyDataset()
    trainer = make_trainer("serial", 1, dataset)
    trainer.seed = 43
    model, _ = run_fedavg(trainer, dataset)
    assert not torch.equal(model, reference)

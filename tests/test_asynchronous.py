"""Asynchronous FL on a virtual clock: FedBuff and FedAsync against their definitions.

FedBuff with equal client speeds and K = concurrency = m is synchronous FedAvg with the
same server learning rate; the event sequence (and so the model) is the same bits in
serial, thread and process mode at every parallelism; FedAsync's mixing and staleness
functions against the paper's formulas; staleness grows with speed heterogeneity.
"""

from __future__ import annotations

import math

import pytest
import torch

from emberfl.algorithms import FedAvg, Scaffold
from emberfl.asynchronous import (
    AsyncSimulation,
    ClientClock,
    FedAsync,
    FedBuff,
    staleness_weight,
)
from emberfl.errors import CheckpointError, ConfigError
from emberfl.executors import ClientSetup, make_executor
from emberfl.simulation import Simulation
from fl_testkit import LazyData, linear_model

SEED = 11
N = 10


def _setup() -> ClientSetup:
    return ClientSetup(LazyData(N), linear_model(), batch_size=4, seed=SEED)


def test_fedbuff_with_equal_speeds_is_synchronous_fedavg() -> None:
    m, lr = 4, 0.7
    with Simulation(
        FedAvg(lr=0.1, server_lr=lr), make_executor("serial", _setup()), num_clients=N,
        clients_per_round=m,
    ) as sync:  # fmt: skip
        for _ in range(3):
            sync.run_round()
        expected = sync.state.model.clone()
    sim = AsyncSimulation(
        FedAvg(lr=0.1), make_executor("serial", _setup()), FedBuff(buffer_size=m, server_lr=lr),
        num_clients=N, concurrency=m, clock=ClientClock(mu=0.0, sigma=0.0),
    )  # fmt: skip
    history = sim.run(3)
    assert [h["reports"] for h in history] == [m] * 3
    assert [h["virtual_time_s"] for h in history] == [1.0, 2.0, 3.0]
    assert set(sim.staleness) == {0}
    assert float((sim.model - expected).abs().max()) <= 1e-6 * float(expected.abs().max())


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "server", [FedBuff(buffer_size=3), FedAsync(staleness="hinge", a=2.0, b=1.0)]
)
def test_the_event_sequence_and_model_are_the_same_in_every_mode(
    server: FedAsync | FedBuff,
) -> None:
    def run(mode: str, p: int) -> tuple[torch.Tensor, list[int]]:
        with AsyncSimulation(
            FedAvg(lr=0.1, epochs=2), make_executor(mode, _setup(), parallelism=p), server,
            num_clients=N, concurrency=5, clock=ClientClock(mu=0.0, sigma=0.8),
        ) as sim:  # fmt: skip
            sim.run(6)
            return sim.model.clone(), list(sim.staleness)

    reference, staleness = run("serial", 1)
    assert max(staleness) > 0  # heterogeneous speeds make reports stale
    for mode, p in [("thread", 2), ("thread", 4), ("process", 2), ("process", 4)]:
        model, seen = run(mode, p)
        assert torch.equal(model, reference), (mode, p)
        assert seen == staleness


def test_fedasync_mixes_each_report_by_its_staleness_weight() -> None:
    server = FedAsync(alpha=0.5, staleness="polynomial", a=0.5)
    sim = AsyncSimulation(
        FedAvg(lr=0.1), make_executor("serial", _setup()), server, num_clients=N,
        concurrency=3, clock=ClientClock(sigma=0.5),
    )  # fmt: skip
    sim._start_wave()
    task = sim._flight[0]
    before = sim.model.clone()
    sim.version = 2  # the client started two versions ago
    sim._report(task)
    w = 0.5 * (2 + 1) ** -0.5
    y = task.start + task.result.uplink["delta"]
    assert torch.allclose(sim.model, (1 - w) * before + w * y, atol=1e-7)


def test_staleness_functions_are_the_papers() -> None:
    assert staleness_weight("constant", 7, 0.5, 4) == 1.0
    assert staleness_weight("polynomial", 3, 0.5, 4) == pytest.approx(4**-0.5)
    assert staleness_weight("hinge", 4, 0.5, 4) == 1.0
    assert staleness_weight("hinge", 6, 0.5, 4) == pytest.approx(1 / (0.5 * 2 + 1))
    with pytest.raises(ConfigError, match="unknown staleness function"):
        staleness_weight("linear", 1, 1, 1)  # type: ignore[arg-type]


def test_speeds_come_from_each_clients_stream() -> None:
    clock = ClientClock(mu=0.1, sigma=0.5)
    durations = [clock.duration(SEED, c) for c in range(N)]
    assert len(set(durations)) == N and durations == [clock.duration(SEED, c) for c in range(N)]
    assert ClientClock(mu=0.3).duration(SEED, 4) == pytest.approx(math.exp(0.3))


def test_bad_configurations_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"concurrency must be in 1\.\.10"):
        AsyncSimulation(FedAvg(lr=0.1), make_executor("serial", _setup()), FedBuff(),
                        num_clients=N, concurrency=11)  # fmt: skip
    with pytest.raises(ConfigError, match="send one delta and keep no client state"):
        AsyncSimulation(Scaffold(lr=0.1), make_executor("serial", _setup()), FedBuff(),
                        num_clients=N, concurrency=2)  # fmt: skip
    with pytest.raises(ConfigError, match="alpha must be in"):
        AsyncSimulation(FedAvg(lr=0.1), make_executor("serial", _setup()), FedAsync(alpha=0),
                        num_clients=N, concurrency=2)  # fmt: skip


@pytest.mark.parametrize(
    "server", [FedBuff(buffer_size=3, server_lr=0.8), FedAsync(staleness="polynomial")]
)
def test_saving_and_restoring_between_updates_gives_the_uninterrupted_bits(
    server: FedAsync | FedBuff,
) -> None:
    def fresh() -> AsyncSimulation:
        return AsyncSimulation(
            FedAvg(lr=0.1), make_executor("serial", _setup()), server, num_clients=N,
            concurrency=4, clock=ClientClock(mu=0.2, sigma=0.9),
        )  # fmt: skip

    with fresh() as whole:
        expected = whole.run(7)
        model = whole.model.clone()
    with fresh() as first:
        first.run(3)
        saved = {k: v.clone() for k, v in first.state_tensors().items()}
        assert saved["async/flight"].shape[0] > 0  # the clients in flight are saved
    with fresh() as second:
        second.load_state_tensors(saved, 3)
        assert second.run(4) == expected[3:]
        assert torch.equal(second.model, model)
        assert second.staleness == whole.staleness


def test_a_damaged_asynchronous_state_is_a_checkpoint_error() -> None:
    sim = AsyncSimulation(
        FedAvg(lr=0.1), make_executor("serial", _setup()), FedBuff(buffer_size=2),
        num_clients=N, concurrency=3,
    )  # fmt: skip
    sim.run(1)
    saved = sim.state_tensors()
    del saved["async/delta/0"]
    with pytest.raises(CheckpointError, match="asynchronous state is missing or malformed"):
        sim.load_state_tensors(saved, 1)


def test_each_update_reports_its_traffic_and_loss() -> None:
    sim = AsyncSimulation(
        FedAvg(lr=0.1), make_executor("serial", _setup()), FedBuff(buffer_size=2),
        num_clients=N, concurrency=3, clock=ClientClock(sigma=0.7),
    )  # fmt: skip
    records = sim.run(4)
    dim = sim.layout.dim
    assert [r["reports"] for r in records] == [2] * 4
    assert all(r["uplink_bytes"] == 2 * 4 * dim for r in records)
    # Every report frees a slot that a later wave fills: 3 at first, then one per report.
    assert sum(r["downlink_bytes"] for r in records) == (3 + 7) * 4 * dim
    assert all(r["train_loss"] > 0 for r in records)
    times = [r["virtual_time_s"] for r in records]
    assert times == sorted(times)


def test_vectorized_mode_gives_the_same_events_and_a_model_within_float_rounding() -> None:
    def run(mode: str) -> tuple[torch.Tensor, list[int]]:
        with AsyncSimulation(
            FedAvg(lr=0.1), make_executor(mode, _setup(), parallelism=2), FedBuff(buffer_size=2),
            num_clients=N, concurrency=4, clock=ClientClock(sigma=0.8),
        ) as sim:  # fmt: skip
            sim.run(5)
            return sim.model.clone(), list(sim.staleness)

    (serial, stale), (vectorized, stale_v) = run("serial"), run("vectorized")
    assert stale_v == stale  # the clock does not depend on the mode
    assert float((vectorized - serial).abs().max()) <= 1e-5 * float(serial.abs().max())

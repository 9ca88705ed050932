"""The algorithm layer: one definition, every executor, checked against the equations."""

from __future__ import annotations

import copy
import gc
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from emberfl.aggregation import Median, TrimmedMean
from emberfl.aggregation import aggregators as aggregators_module
from emberfl.algorithms import ALGORITHMS, Client, ClientResult, FedAvg, ModelLayout
from emberfl.core import deserialize_model, serialize_model
from emberfl.errors import (
    ClientError,
    ConfigError,
    EmberflError,
    NonFiniteError,
    SharedMemoryError,
    TensorMismatchError,
)
from emberfl.executors import ClientSetup, Executor, make_executor
from emberfl.reproducibility import client_rng_suite
from emberfl.simulation import Simulation, sample_clients
from fl_testkit import (
    CLASSES,
    BrokenData,
    ControlVariates,
    Distill,
    Diverges,
    LazyData,
    Prox,
    WrongShape,
    WrongState,
    conv_model,
    linear_model,
)

SEED = 11
NUM_CLIENTS = 8
PER_ROUND = 5
EXACT_MODES = [("serial", 1), ("thread", 1), ("thread", 3), ("process", 1), ("process", 2)]


def _setup(data: Any = None, model: torch.nn.Module | None = None, seed: int = SEED) -> ClientSetup:
    return ClientSetup(
        data or LazyData(NUM_CLIENTS), model or linear_model(), batch_size=3, seed=seed
    )


def _simulate(
    algorithm: Any,
    mode: str,
    parallelism: int,
    *,
    rounds: int = 3,
    model: Callable[[], torch.nn.Module] = linear_model,
    data: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[dict[str, float]]]:
    executor = make_executor(mode, _setup(data, model()), parallelism=parallelism)
    with Simulation(
        algorithm, executor, num_clients=NUM_CLIENTS, clients_per_round=PER_ROUND, **kwargs
    ) as sim:
        history = sim.run(rounds)
        return sim.state.model.clone(), sim.state_tensors(), history


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------
# One definition, every mode
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAvg(lr=0.1, epochs=2),
        lambda: FedAvg(lr=0.05, epochs=1, momentum=0.9, weight_decay=1e-3, server_lr=0.7),
        lambda: Prox(lr=0.1, epochs=2, mu=0.5),
        lambda: ControlVariates(lr=0.1, epochs=2),
    ],
    ids=["fedavg", "fedavg-momentum", "prox", "scaffold"],
)
def test_every_mode_gives_the_same_bits_and_vectorized_the_same_numbers(
    make: Callable[[], Any],
) -> None:
    reference, ref_state, ref_history = _simulate(make(), "serial", 1)
    for mode, p in EXACT_MODES[1:]:
        got, state, history = _simulate(make(), mode, p)
        assert torch.equal(got.view(torch.int32), reference.view(torch.int32)), (mode, p)
        assert state.keys() == ref_state.keys()
        for key, value in state.items():
            assert torch.equal(value, ref_state[key]), (mode, p, key)
        assert history == ref_history
    for p in (1, 2):
        got, state, _ = _simulate(make(), "vectorized", p)
        assert _rel(got, reference) <= 1e-5
        for key, value in state.items():
            if value.is_floating_point() and value.numel() and value.abs().max() > 0:
                assert _rel(value, ref_state[key]) <= 1e-4, key
            else:
                assert torch.equal(value, ref_state[key]), key


def test_vectorized_conv_model_and_chunk_sizes_match_serial() -> None:
    data = LazyData(NUM_CLIENTS, image=True)
    reference, _, _ = _simulate(ControlVariates(lr=0.1), "serial", 1, model=conv_model, data=data)
    for chunk in (1, 2, PER_ROUND):
        executor = make_executor(
            "vectorized", _setup(data, conv_model()), parallelism=2, chunk_size=chunk
        )
        with Simulation(
            ControlVariates(lr=0.1), executor, num_clients=NUM_CLIENTS, clients_per_round=PER_ROUND
        ) as sim:
            sim.run(3)
            assert _rel(sim.state.model, reference) <= 1e-5


# ------------------------------------------------------------------------------------------
# The equations, recomputed with plain tensors
# ------------------------------------------------------------------------------------------


def _reference_round(
    model: torch.nn.Module,
    x: torch.Tensor,
    cid: int,
    round_: int,
    *,
    lr: float,
    epochs: int,
    grad_fn: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> tuple[torch.Tensor, int]:
    """Local SGD on client ``cid`` with plain torch: ``p -= lr * grad_fn(grads, params)``."""
    data = LazyData(NUM_CLIENTS)
    deserialize_model(model, x)
    params = dict(model.named_parameters())
    rng = client_rng_suite(SEED, cid, round_)
    loader = data.get_dataloader("train", cid, 3, rng.torch_cpu)
    steps = 0
    for _ in range(epochs):
        for inputs, targets in loader:
            loss = F.cross_entropy(model(inputs), targets)
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
            step = grad_fn(grads, params)
            with torch.no_grad():
                for n, p in params.items():
                    p.sub_(lr * step[n])
            steps += 1
    return serialize_model(model), steps


def test_fedavg_is_the_data_size_weighted_mean_of_the_client_models() -> None:
    lr, epochs = 0.1, 2
    model = linear_model()
    x = serialize_model(model)
    for r in range(2):
        cids = sample_clients(SEED, r, NUM_CLIENTS, PER_ROUND)
        ys, ns = [], []
        for cid in cids:
            y, _ = _reference_round(model, x, cid, r, lr=lr, epochs=epochs, grad_fn=lambda g, _p: g)
            ys.append(y.double())
            ns.append(len(LazyData(NUM_CLIENTS).get_dataset("train", cid)))
        x = (sum(n * y for n, y in zip(ns, ys, strict=True)) / sum(ns)).float()
    got, _, history = _simulate(FedAvg(lr=lr, epochs=epochs), "serial", 1, rounds=2)
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-7)
    assert history[0]["num_clients"] == PER_ROUND and history[0]["train_loss"] > 0


def test_scaffold_matches_its_equations_over_two_rounds() -> None:
    """SCAFFOLD option II recomputed with plain tensors, partial participation included."""
    lr, epochs = 0.1, 2
    model = linear_model()
    layout = ModelLayout.of(model)
    x = serialize_model(model)
    c = torch.zeros(layout.dim)
    ck: dict[int, torch.Tensor] = {}
    for r in range(2):
        cids = sample_clients(SEED, r, NUM_CLIENTS, PER_ROUND)
        deltas, dcs = [], []
        for cid in cids:
            mine = ck.get(cid, torch.zeros(layout.dim))
            mine_t, c_t = layout.tree(mine), layout.tree(c)
            y, steps = _reference_round(
                model,
                x,
                cid,
                r,
                lr=lr,
                epochs=epochs,
                grad_fn=lambda g, _p, m=mine_t, s=c_t: {n: g[n] - m[n] + s[n] for n in g},
            )
            new = mine - c + (x - y) / (steps * lr)
            deltas.append(y - x)
            dcs.append(new - mine)
            ck[cid] = new
        x = x + torch.stack(deltas).double().mean(0).float()
        c = c + (PER_ROUND / NUM_CLIENTS) * torch.stack(dcs).double().mean(0).float()
    executor = make_executor("serial", _setup())
    with Simulation(
        ControlVariates(lr=lr, epochs=epochs),
        executor,
        num_clients=NUM_CLIENTS,
        clients_per_round=PER_ROUND,
    ) as sim:
        sim.run(2)
        torch.testing.assert_close(sim.state.model, x, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sim.state.tensors["c"], c, rtol=1e-5, atol=1e-6)
        store = sim.client_state
        assert store is not None and sorted(store) == sorted(ck)
        for cid, want in ck.items():
            torch.testing.assert_close(store.views(cid)["c"], want, rtol=1e-5, atol=1e-6)


def test_scaffold_first_round_is_uniform_fedavg() -> None:
    """With c = c_k = 0 the correction vanishes: the first round is uniformly weighted FedAvg."""
    lr = 0.1
    model = linear_model()
    x = serialize_model(model)
    cids = sample_clients(SEED, 0, NUM_CLIENTS, PER_ROUND)
    ys = [
        _reference_round(model, x, c, 0, lr=lr, epochs=1, grad_fn=lambda g, _p: g)[0] for c in cids
    ]
    want = torch.stack(ys).double().mean(0).float()
    got, _, _ = _simulate(ControlVariates(lr=lr), "serial", 1, rounds=1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_prox_with_mu_zero_is_fedavg_bit_for_bit_and_mu_changes_the_update() -> None:
    fedavg, _, _ = _simulate(FedAvg(lr=0.1, epochs=2), "serial", 1)
    zero, _, _ = _simulate(Prox(lr=0.1, epochs=2, mu=0.0), "serial", 1)
    strong, _, _ = _simulate(Prox(lr=0.1, epochs=2, mu=1.0), "serial", 1)
    assert torch.equal(fedavg, zero)
    assert not torch.allclose(fedavg, strong)
    x0 = serialize_model(linear_model())
    assert (strong - x0).norm() < (fedavg - x0).norm()  # the proximal term pulls towards x


# ------------------------------------------------------------------------------------------
# The escape hatch
# ------------------------------------------------------------------------------------------


def test_a_distillation_algorithm_runs_in_every_per_client_mode() -> None:
    public = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    results = []
    for mode, p in EXACT_MODES:
        executor = make_executor(mode, _setup(), parallelism=p)
        with Simulation(
            Distill(public), executor, num_clients=NUM_CLIENTS, clients_per_round=PER_ROUND
        ) as sim:
            initial = sim.state.model.clone()
            sim.run(3)
            soft = sim.state.tensors["soft"].view(-1, CLASSES)
            assert torch.allclose(soft.sum(1), torch.ones(6))
            assert torch.equal(sim.state.model, initial)  # no parameter went up
            assert sim.client_state is not None and len(sim.client_state) >= PER_ROUND
            results.append(sim.state_tensors())
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        assert all(torch.equal(other[k], results[0][k]) for k in other)
    executor = make_executor("vectorized", _setup())
    with (
        Simulation(Distill(public), executor, num_clients=NUM_CLIENTS) as sim,
        pytest.raises(ConfigError, match=r"not a local-SGD algorithm.*serial, thread or process"),
    ):
        sim.run_round()


def test_the_algorithm_table_lists_fedavg_with_a_summary() -> None:
    assert ALGORITHMS["fedavg"] is FedAvg
    assert all(cls.summary for cls in ALGORITHMS.values())


# ------------------------------------------------------------------------------------------
# Streaming: memory bounded by the parallelism
# ------------------------------------------------------------------------------------------

_LIVE: list[int] = [0]


class _Counted(FedAvg):
    """FedAvg whose uplink tensors count themselves while alive (in-process executors)."""

    def client_update(self, client: Client) -> ClientResult:
        result = super().client_update(client)
        _LIVE[0] += 1
        weakref.finalize(result.uplink["delta"], _LIVE.__setitem__, 0, 0)
        weakref.finalize(result, lambda: _LIVE.__setitem__(0, _LIVE[0] - 1))
        return result


@pytest.mark.parametrize(("mode", "parallelism"), [("serial", 1), ("thread", 2)])
def test_results_held_at_once_are_bounded_by_the_parallelism(mode: str, parallelism: int) -> None:
    data = LazyData(40)
    executor = make_executor(mode, _setup(data), parallelism=parallelism)
    peak = [0]

    def watch(_position: int, _cid: int) -> None:
        gc.collect()
        peak[0] = max(peak[0], _LIVE[0])

    _LIVE[0] = 0
    with Simulation(_Counted(lr=0.1), executor, num_clients=40) as sim:
        sim.run_round(on_result=watch)
    assert 1 <= peak[0] <= 2 * parallelism + 1


def test_process_mode_folds_uplinks_from_2p_shared_slots() -> None:
    data = LazyData(30)
    executor = make_executor("process", _setup(data), parallelism=2)
    with Simulation(FedAvg(lr=0.1), executor, num_clients=30) as sim:
        sim.run_round()
        pool = executor._pool  # type: ignore[attr-defined]
        assert pool is not None and pool._up_arena.num_slots == 2 * 2 + 1


# ------------------------------------------------------------------------------------------
# Aggregators that need every update
# ------------------------------------------------------------------------------------------


def test_median_and_trimmed_mean_aggregators_against_torch(tmp_path: Path) -> None:
    deltas: list[torch.Tensor] = []

    class Recording(FedAvg):
        pass

    def capture(sim: Simulation) -> None:
        executor = sim.executor
        original = executor.run

        def run(plan: Any, consume: Any) -> None:
            def keep(position: int, cid: int, result: ClientResult) -> None:
                deltas.append(result.uplink["delta"].clone())
                consume(position, cid, result)

            original(plan, keep)

        executor.run = run  # type: ignore[method-assign]

    for aggregator, reduce in (
        (Median(), lambda d: d.sort(0).values[3:5].double().mean(0).float()),  # 8 updates
        (TrimmedMean(0.2), lambda d: d.sort(0).values[1:-1].double().mean(0).float()),
    ):
        deltas.clear()
        executor = make_executor("serial", _setup())
        with Simulation(
            Recording(lr=0.1), executor, num_clients=NUM_CLIENTS, aggregator=aggregator
        ) as sim:
            x0 = sim.state.model.clone()
            capture(sim)
            sim.run_round()
            stacked = torch.stack(deltas)
            torch.testing.assert_close(sim.state.model - x0, reduce(stacked), rtol=1e-5, atol=1e-6)


def test_an_update_set_larger_than_memory_goes_to_a_file_and_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aggregators_module, "MEMORY_FRACTION", 0.0)
    executor = make_executor("serial", _setup())
    seen: list[bool] = []
    original = aggregators_module.UpdateSet.__init__

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        seen.append(self.spilled)
        assert list(tmp_path.iterdir())  # the file is there while the round runs

    monkeypatch.setattr(aggregators_module.UpdateSet, "__init__", spy)
    with Simulation(
        FedAvg(lr=0.1), executor, num_clients=NUM_CLIENTS, aggregator=Median(), spill_dir=tmp_path
    ) as sim:
        sim.run_round()
    assert seen == [True]
    assert list(tmp_path.iterdir()) == []


def test_updates_that_fit_neither_in_memory_nor_on_disk_are_a_clear_error(tmp_path: Path) -> None:
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(SharedMemoryError, match=r"needs all 4 updates.*neither memory nor"):
        aggregators_module.UpdateSet(4, 1 << 42, spill_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert set(os.listdir("/dev/shm")) == before


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "parallelism"), [*EXACT_MODES[:3], ("process", 2), ("vectorized", 2)]
)
def test_a_misshapen_update_names_the_client_and_the_stream(mode: str, parallelism: int) -> None:
    executor = make_executor(mode, _setup(), parallelism=parallelism)
    with Simulation(WrongShape(lr=0.1), executor, num_clients=NUM_CLIENTS) as sim:
        x0 = sim.state.model.clone()
        with pytest.raises((TensorMismatchError, ClientError), match=r"client \d+.*'delta'.*\b5\b"):
            sim.run_round()
        assert torch.equal(sim.state.model, x0) and sim.round == 0


@pytest.mark.parametrize(
    ("mode", "parallelism"), [("serial", 1), ("process", 2), ("vectorized", 1)]
)
def test_a_state_of_the_wrong_size_is_an_error(mode: str, parallelism: int) -> None:
    executor = make_executor(mode, _setup(), parallelism=parallelism)
    with Simulation(WrongState(lr=0.1), executor, num_clients=NUM_CLIENTS) as sim:
        with pytest.raises(ClientError, match=r"client \d+"):
            sim.run_round()
        with pytest.raises(EmberflError, match="restore a checkpoint"):
            sim.run_round()


@pytest.mark.parametrize(("mode", "parallelism"), [("serial", 1), ("thread", 2), ("process", 2)])
def test_a_non_finite_update_names_the_client_and_the_tensor(mode: str, parallelism: int) -> None:
    executor = make_executor(mode, _setup(), parallelism=parallelism)
    with Simulation(Diverges(lr=0.1), executor, num_clients=NUM_CLIENTS) as sim:
        x0 = sim.state.model.clone()
        with pytest.raises(
            NonFiniteError,
            match=r"client 2 sent a non-finite update: stream 'delta', layer '2\.bias'",
        ):
            sim.run_round()
        assert torch.equal(sim.state.model, x0) and sim.round == 0
        sim.run_round(cids=[0, 1, 3])  # the simulation is still usable
        assert sim.round == 1


def test_bad_simulation_arguments() -> None:
    executor = make_executor("serial", _setup())
    with pytest.raises(ConfigError, match="clients_per_round"):
        Simulation(FedAvg(lr=0.1), executor, num_clients=4, clients_per_round=5)
    with pytest.raises(ConfigError, match="num_clients"):
        Simulation(FedAvg(lr=0.1), executor, num_clients=0)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        FedAvg(lr=0.0)
    with pytest.raises(ConfigError, match="epochs"):
        FedAvg(lr=0.1, epochs=0)
    with pytest.raises(ConfigError, match="num_parallels"):
        make_executor("thread", _setup(), parallelism=0)
    with (
        Simulation(FedAvg(lr=0.1), executor, num_clients=4) as sim,
        pytest.raises(ConfigError, match="client 9 does not exist"),
    ):
        sim.run_round(cids=[0, 9])


def test_a_failing_client_leaves_the_server_state_unchanged() -> None:
    for mode, p in (("serial", 1), ("thread", 2), ("process", 2)):
        executor = make_executor(mode, _setup(BrokenData(NUM_CLIENTS)), parallelism=p)
        with Simulation(FedAvg(lr=0.1), executor, num_clients=NUM_CLIENTS) as sim:
            x0 = sim.state.model.clone()
            with pytest.raises(ClientError, match="client 3: RuntimeError: disk on fire"):
                sim.run_round()
            assert torch.equal(sim.state.model, x0)


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_continues_bit_for_bit(tmp_path: Path) -> None:
    def make() -> Simulation:
        return Simulation(
            ControlVariates(lr=0.1),
            make_executor("thread", _setup(), parallelism=2),
            num_clients=NUM_CLIENTS,
            clients_per_round=PER_ROUND,
        )

    with make() as straight:
        straight.run(4)
        want = straight.state_tensors()
    with make() as first:
        first.run(2)
        first.save_checkpoint(tmp_path / "ckpt.safetensors")
    with make() as second:
        second.load_checkpoint(tmp_path / "ckpt.safetensors")
        assert second.round == 2
        second.run(2)
        got = second.state_tensors()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with make() as other, pytest.raises(EmberflError, match="not a valid safetensors file"):
        (tmp_path / "bad.safetensors").write_bytes(b"garbage")
        other.load_checkpoint(tmp_path / "bad.safetensors")


def test_executor_base_is_abstract() -> None:
    with pytest.raises(TypeError):
        Executor(_setup())  # type: ignore[abstract]
    copy.deepcopy(_setup())  # setups are plain data

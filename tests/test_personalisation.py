"""Personalisation: clients' own test splits and Ditto.

Ditto's global model is FedAvg's bit for bit; its personal models follow the paper's
update recomputed here in float64; the personal state has the same bits in serial, thread
and process mode; the CLI judges personal models on each client's own held-out data.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from emberfl.algorithms import IFCA, Ditto, FedAvg, FedBN, PerFedAvg
from emberfl.algorithms.base import Split
from emberfl.algorithms.fedbn import batch_norm_index
from emberfl.cli import main
from emberfl.data import FLDataset, Partition
from emberfl.data.partitioned import TensorPartitionedDataset
from emberfl.errors import ConfigError
from emberfl.rng import Purpose, stream
from test_algorithms_optim import (
    CIDS,
    LR,
    NUM_CLIENTS,
    OrderedData,
    _batches,
    _bits,
    _forward,
    _local,
    _rel,
    _simulate,
    _x0,
)


def _data(n: int = 60) -> FLDataset:
    g = torch.Generator().manual_seed(0)
    return FLDataset(
        name="toy",
        train_x=torch.randn(n, 2, generator=g),
        train_y=torch.arange(n) % 3,
        test_x=torch.randn(10, 2, generator=g),
        test_y=torch.arange(10) % 3,
        num_classes=3,
    )


def _partition(sizes: list[int]) -> Partition:
    bounds = np.cumsum([0, *sizes])
    arrays = tuple(np.arange(a, b) for a, b in itertools.pairwise(bounds))
    return Partition(arrays, int(bounds[-1]))


def test_client_test_splits_are_a_seeded_disjoint_share() -> None:
    sizes = [1, 2, 5, 10, 42]
    data = _data()
    split = TensorPartitionedDataset(data, _partition(sizes), client_test_fraction=0.2, seed=3)
    again = TensorPartitionedDataset(data, _partition(sizes), client_test_fraction=0.2, seed=3)
    other = TensorPartitionedDataset(data, _partition(sizes), client_test_fraction=0.2, seed=4)
    start = 0
    for cid, n in enumerate(sizes):
        train = split.get_dataset(Split.TRAIN, cid).index
        test = split.get_dataset(Split.TEST, cid).index
        assert train is not None and test is not None
        share = set(range(start, start + n))
        assert set(train.tolist()) | set(test.tolist()) == share
        assert not set(train.tolist()) & set(test.tolist())
        expected = 0 if n < 2 else min(n - 1, max(1, round(0.2 * n)))
        assert len(test) == expected, cid
        assert torch.equal(test, again.get_dataset(Split.TEST, cid).index)
        start += n
    assert any(
        not torch.equal(split.client_test_index[c], other.client_test_index[c]) for c in (3, 4)
    )
    assert split.get_dataset(Split.TEST, None).index is None  # the global test split
    plain = TensorPartitionedDataset(data, _partition(sizes))
    assert not plain.has_client_tests
    assert plain.get_dataset(Split.TEST, 2).index is None  # no own tests: the global one
    assert len(plain.get_dataset(Split.TRAIN, 4)) == 42
    with pytest.raises(ConfigError, match=r"client_test_fraction must be in \[0, 1\)"):
        TensorPartitionedDataset(data, _partition(sizes), client_test_fraction=1.0)


def test_ditto_global_model_is_fedavg_bit_for_bit() -> None:
    a = _simulate(Ditto(lr=LR, epochs=2, lam=0.5)).model
    b = _simulate(FedAvg(lr=LR, epochs=2)).model
    assert torch.equal(_bits(a), _bits(b))


def test_ditto_personal_models_reference() -> None:
    lam = 0.5
    run = _simulate(Ditto(lr=LR, epochs=2, lam=lam), rounds=2)
    x = _x0()
    personal: dict[int, torch.Tensor] = {}
    for _ in range(2):
        ys = {}
        for k in CIDS:
            ys[k], _ = _local(x, k, epochs=2)
            start = personal.get(k, x)
            personal[k], _ = _local(start, k, epochs=2, hook=lambda g, w, x0=x: g + lam * (w - x0))
        weights = {k: len(OrderedData(NUM_CLIENTS).get_dataset("train", k)) for k in CIDS}
        total = sum(weights.values())
        x = x + sum((weights[k] / total * (ys[k] - x) for k in CIDS), torch.zeros_like(x))
    for k in CIDS:
        assert _rel(run.states[k]["personal"], personal[k]) <= 1e-6, k
    # lambda pulls the personal models towards the global one.
    loose = _simulate(Ditto(lr=LR, epochs=2, lam=0.0), rounds=2)
    for k in CIDS:
        assert _rel(loose.states[k]["personal"], run.states[k]["personal"]) > 1e-4, k


@pytest.mark.timeout(300)
def test_ditto_has_the_same_bits_in_every_mode() -> None:
    reference = _simulate(Ditto(lr=LR, epochs=2))
    for mode, p in [("thread", 2), ("process", 1), ("process", 2)]:
        got = _simulate(Ditto(lr=LR, epochs=2), mode=mode, parallelism=p)
        assert torch.equal(_bits(got.model), _bits(reference.model)), mode
        for k in CIDS:
            assert torch.equal(got.states[k]["personal"], reference.states[k]["personal"])
    with pytest.raises(ConfigError, match="cannot run it"):
        _simulate(Ditto(lr=LR), mode="vectorized")


TINY = [
    "--num-clients", "6", "--epochs", "2", "--batch-size", "16", "--train-size", "600",
    "--partition", "shards", "--quiet",
]  # fmt: skip


def _rows(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_ditto_logs_personal_and_global_accuracy_on_clients_own_tests(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "ditto"
    assert (
        main(["run", "--algorithm", "ditto", "--rounds", "4", "--output-dir", str(run_dir), *TINY])
        == 0
    )
    rows = _rows(run_dir)
    assert all(0 <= r["personal_test_accuracy"] <= 1 for r in rows)
    # Two label shards per client: a personal model knows its client's labels.
    assert rows[-1]["personal_test_accuracy"] > rows[-1]["client_test_accuracy"]
    fedavg = tmp_path / "fedavg"
    argv = ["run", "--client-test-fraction", "0.2", "--rounds", "1", "--output-dir", str(fedavg)]
    assert main([*argv, *TINY]) == 0
    row = _rows(fedavg)[0]
    assert "client_test_accuracy" in row and "personal_test_accuracy" not in row
    plain = tmp_path / "plain"
    assert main(["run", "--rounds", "1", "--output-dir", str(plain), *TINY]) == 0
    assert "client_test_accuracy" not in _rows(plain)[0]


def test_cli_ditto_needs_client_tests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--algorithm", "ditto", "--client-test-fraction", "0", *TINY]
    assert main([*argv, "--output-dir", str(tmp_path / "run")]) == 2
    assert "client_test_fraction must be > 0" in capsys.readouterr().err


def test_cli_ditto_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    options = ["--algorithm", "ditto", "--checkpoint-every", "1", "--ditto-lambda", "0.5", *TINY]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["run", "--rounds", "3", "--output-dir", str(whole), *options]) == 0
    assert main(["run", "--rounds", "2", "--output-dir", str(part), *options]) == 0
    assert main(["run", "--resume", str(part), "--rounds", "3", "--quiet"]) == 0
    model = (whole / "final_model.safetensors").read_bytes()
    assert (part / "final_model.safetensors").read_bytes() == model
    assert _rows(part)[-1]["personal_test_accuracy"] == _rows(whole)[-1]["personal_test_accuracy"]


# ------------------------------------------------------------------------------------------
# FedBN
# ------------------------------------------------------------------------------------------


def bn_model() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        )


def _simulate_bn(algorithm: Any, mode: str = "serial", parallelism: int = 1) -> Any:
    from emberfl.executors import ClientSetup, make_executor
    from emberfl.simulation import Simulation

    setup = ClientSetup(OrderedData(NUM_CLIENTS), bn_model(), batch_size=16, seed=3)
    with Simulation(
        algorithm, make_executor(mode, setup, parallelism=parallelism), num_clients=NUM_CLIENTS
    ) as sim:
        for _ in range(2):
            sim.run_round(CIDS)
        assert sim.client_state is not None
        states = {c: sim.client_state.views(c)["bn"].clone() for c in CIDS}
        return sim.state.model.clone(), states, sim.layout


def test_fedbn_without_batch_norm_is_fedavg_bit_for_bit() -> None:
    a = _simulate(FedBN(lr=LR, epochs=2)).model
    b = _simulate(FedAvg(lr=LR, epochs=2)).model
    assert torch.equal(_bits(a), _bits(b))


def test_fedbn_reference_with_plain_pytorch() -> None:
    from emberfl.core import serialize_model

    got, states, layout = _simulate_bn(FedBN(lr=LR, epochs=2))
    bn = batch_norm_index(layout)
    assert [i.name for i in layout.items if i.batch_norm] == [
        "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"
    ]  # fmt: skip
    x = serialize_model(bn_model()).to(torch.float64)
    x0 = x.clone()
    own: dict[int, torch.Tensor] = {}
    for _ in range(2):
        total = sum(len(OrderedData(NUM_CLIENTS).get_dataset("train", k)) for k in CIDS)
        update = torch.zeros_like(x)
        for k in CIDS:
            model = bn_model()
            start = x.clone()
            if k in own:
                start[bn] = own[k]
            deserialize(model, start)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            model.train()
            bx, by = OrderedData(NUM_CLIENTS).get_dataset("train", k).tensors
            for _ in range(2):  # epochs, one full batch each
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(bx), by).backward()
                opt.step()
            y = serialize_model(model).to(torch.float64)
            own[k] = y[bn]
            delta = y - x
            delta[bn] = 0
            update += len(by) / total * delta
        x = x + update
    assert _rel(got, x) <= 1e-6
    assert torch.equal(got[bn].double(), x0[bn])  # the global BatchNorm never moves
    for k in CIDS:
        assert _rel(states[k], own[k]) <= 1e-6, k


def deserialize(model: torch.nn.Module, flat: torch.Tensor) -> None:
    from emberfl.core import deserialize_model

    deserialize_model(model, flat.to(torch.float32))


@pytest.mark.timeout(300)
def test_fedbn_has_the_same_bits_in_every_mode() -> None:
    reference, ref_states, _ = _simulate_bn(FedBN(lr=LR, epochs=2))
    for mode, p in [("thread", 2), ("process", 2)]:
        got, states, _ = _simulate_bn(FedBN(lr=LR, epochs=2), mode, p)
        assert torch.equal(_bits(got), _bits(reference)), mode
        for k in CIDS:
            assert torch.equal(states[k], ref_states[k]), (mode, k)


# ------------------------------------------------------------------------------------------
# IFCA
# ------------------------------------------------------------------------------------------


def test_ifca_with_one_cluster_is_fedavg_bit_for_bit() -> None:
    a = _simulate(IFCA(lr=LR, epochs=2, clusters=1)).model
    b = _simulate(FedAvg(lr=LR, epochs=2)).model
    assert torch.equal(_bits(a), _bits(b))


def _mean_loss(w: torch.Tensor, cid: int) -> float:
    bx, by = OrderedData(NUM_CLIENTS).get_dataset("train", cid).tensors
    return float(torch.nn.functional.cross_entropy(_forward(w, bx.double()), by))


def test_ifca_reference() -> None:
    k, scale, seed = 3, 0.5, 9
    run = _simulate(IFCA(lr=LR, epochs=2, clusters=k, init_scale=scale, seed=seed), rounds=2)
    x0 = _x0().float()
    clusters = [x0.clone()]
    for j in range(1, k):
        noise = torch.from_numpy(
            stream(seed, purpose=Purpose.MODEL_INIT, client=j).normal(x0.numel())
        ).to(torch.float32)
        clusters.append(x0 + noise * scale)
    c64 = [c.double() for c in clusters]
    chosen: dict[int, int] = {}
    for _ in range(2):
        sums = [torch.zeros_like(c64[0]) for _ in range(k)]
        weights = [0.0] * k
        for cid in CIDS:
            losses = [_mean_loss(c, cid) for c in c64]
            j = min(range(k), key=lambda i: (losses[i], i))
            chosen[cid] = j
            y, _ = _local(c64[j], cid, epochs=2)
            n = len(OrderedData(NUM_CLIENTS).get_dataset("train", cid))
            sums[j] += n * (y - c64[j])
            weights[j] += n
        c64 = [c + s / w if w else c for c, s, w in zip(c64, sums, weights, strict=True)]
    assert len(set(chosen.values())) > 1, "the clients should not all pick one cluster"
    for j in range(k):
        assert _rel(run.tensors[f"cluster{j}"], c64[j]) <= 1e-6, j
    for cid in CIDS:
        assert int(run.states[cid]["cluster"][0]) == chosen[cid], cid


@pytest.mark.timeout(300)
def test_ifca_has_the_same_bits_in_every_mode() -> None:
    def make() -> IFCA:
        return IFCA(lr=LR, epochs=2, clusters=3, init_scale=0.5, seed=9)

    reference = _simulate(make())
    for mode, p in [("thread", 2), ("process", 2)]:
        got = _simulate(make(), mode=mode, parallelism=p)
        for name, value in reference.all_tensors.items():
            assert torch.equal(got.all_tensors[name], value), (mode, name)


# ------------------------------------------------------------------------------------------
# Per-FedAvg (first-order)
# ------------------------------------------------------------------------------------------


def _grad(w: torch.Tensor, bx: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
    live = w.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(_forward(live, bx.double()), by)
    (g,) = torch.autograd.grad(loss, live)
    return g


def test_perfedavg_reference() -> None:
    alpha, beta, epochs = 0.05, LR, 2
    run = _simulate(PerFedAvg(lr=beta, alpha=alpha, epochs=epochs), rounds=2)
    x = _x0()
    weights = {k: len(OrderedData(NUM_CLIENTS).get_dataset("train", k)) for k in CIDS}
    total = sum(weights.values())
    for _ in range(2):
        update = torch.zeros_like(x)
        for k in CIDS:
            batches = [b for _ in range(epochs) for b in _batches(k)]
            pairs = [
                (batches[i], batches[i + 1] if i + 1 < len(batches) else batches[i])
                for i in range(0, len(batches), 2)
            ]
            w = x.clone()
            for (d, t), (d2, t2) in pairs:
                inner = w - alpha * _grad(w, d, t)
                w = w - beta * _grad(inner, d2, t2)  # first order: applied at w
            update += weights[k] / total * (w - x)
        x = x + update
    assert _rel(run.model, x) <= 1e-6


def test_perfedavg_adapts_with_one_step() -> None:
    from emberfl.core import serialize_model
    from fl_testkit import linear_model

    algorithm = PerFedAvg(lr=LR, alpha=0.3)
    model = linear_model()
    x = serialize_model(model).to(torch.float64)
    bx, by = OrderedData(NUM_CLIENTS).get_dataset("train", 3).tensors
    algorithm.adapt(model, (bx, by))
    expected = x - 0.3 * _grad(x, bx, by)
    assert _rel(serialize_model(model), expected) <= 1e-6


@pytest.mark.timeout(300)
def test_perfedavg_has_the_same_bits_in_every_mode() -> None:
    reference = _simulate(PerFedAvg(lr=LR, epochs=2))
    for mode, p in [("thread", 2), ("process", 2)]:
        got = _simulate(PerFedAvg(lr=LR, epochs=2), mode=mode, parallelism=p)
        assert torch.equal(_bits(got.model), _bits(reference.model)), mode
    with pytest.raises(ConfigError, match="plain SGD"):
        PerFedAvg(lr=LR, momentum=0.9)
    with pytest.raises(ConfigError, match="its equations assume SGD steps"):
        PerFedAvg(lr=LR, optimizer="adam")

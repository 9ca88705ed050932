"""BlazeFL-style FedAvg (emberfl.contrib, on the algorithm layer) end to end on a tiny CNN.

The small model, data set and trainer subclasses defined here are module-level so that
spawned worker processes can import them; the other test modules import them from here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from emberfl.contrib import (
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgClientConfig,
    FedAvgDownlinkPackage,
    FedAvgPartitionType,
    FedAvgProcessPoolClientTrainer,
    FedAvgProcessPoolUplinkPackage,
    FedAvgThreadPoolClientTrainer,
    FedAvgUplinkPackage,
)
from emberfl.core import serialize_model
from emberfl.errors import ConfigError, TensorMismatchError
from emberfl.nn import MaxPool2d

NUM_CLIENTS = 6
SEED = 42


class TinyModelName(StrEnum):
    CNN = "cnn"


class TinySelector:
    """Builds a tiny CNN without touching PyTorch's global generator."""

    def select_model(self, model_name: TinyModelName) -> torch.nn.Module:
        assert model_name == TinyModelName.CNN
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return torch.nn.Sequential(
                torch.nn.Conv2d(3, 6, 3),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
                torch.nn.Flatten(),
                torch.nn.Linear(54, 10),
            )


class TinyDataset:
    """Per-client 3x8x8 images; client c has 8 + 2 * (c % 3) samples."""

    def __init__(self, num_clients: int = NUM_CLIENTS) -> None:
        self.train: dict[int, TensorDataset] = {}
        for cid in range(num_clients):
            g = torch.Generator().manual_seed(cid)
            n = 8 + 2 * (cid % 3)
            self.train[cid] = TensorDataset(
                torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
            )
        g = torch.Generator().manual_seed(10_000)
        self.test = TensorDataset(
            torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        )

    def get_dataset(self, type_: FedAvgPartitionType, cid: int | None) -> TensorDataset:
        if type_ == FedAvgPartitionType.TEST or cid is None:
            return self.test
        return self.train[cid]

    def set_dataset(self, type_: FedAvgPartitionType, cid: int | None, dataset: Any) -> None:
        if cid is not None:
            self.train[cid] = dataset

    def get_dataloader(
        self,
        type_: FedAvgPartitionType,
        cid: int | None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> DataLoader[Any]:
        dataset = self.get_dataset(type_, cid)
        return DataLoader(
            dataset,
            batch_size=batch_size or len(dataset),
            shuffle=type_ == FedAvgPartitionType.TRAIN,
            generator=generator,
        )


def _delay(cid: int) -> float:
    # Later clients finish first: the order of completion is the reverse of cid_list.
    return 0.04 * (NUM_CLIENTS - cid)


class OutOfOrderThreadTrainer(FedAvgThreadPoolClientTrainer):
    """Thread trainer whose clients finish in reverse order."""

    def worker(
        self, cid: int, device: str, payload: FedAvgDownlinkPackage, stop_event: Any
    ) -> FedAvgUplinkPackage:
        time.sleep(_delay(cid))
        package = super().worker(cid, device, payload, stop_event)
        package.metadata = {"finished_at": time.monotonic()}
        return package


class OutOfOrderProcessTrainer(FedAvgProcessPoolClientTrainer):
    """Process trainer whose clients finish in reverse order."""

    @staticmethod
    def worker(
        config: FedAvgClientConfig,
        payload: FedAvgDownlinkPackage,
        device: str,
        stop_event: Any,
        *,
        shm_buffer: FedAvgProcessPoolUplinkPackage | None = None,
    ) -> FedAvgProcessPoolUplinkPackage:
        time.sleep(_delay(config.cid))
        package = FedAvgProcessPoolClientTrainer.worker(
            config, payload, device, stop_event, shm_buffer=shm_buffer
        )
        package.metadata = {"finished_at": time.monotonic()}
        return package


def make_server(
    dataset: TinyDataset, *, rounds: int = 3, sample_ratio: float = 1.0
) -> FedAvgBaseServerHandler:
    return FedAvgBaseServerHandler(
        model_selector=TinySelector(),
        model_name=TinyModelName.CNN,
        dataset=dataset,
        global_round=rounds,
        num_clients=NUM_CLIENTS,
        sample_ratio=sample_ratio,
        device="cpu",
        batch_size=4,
        seed=SEED,
    )


def make_trainer(
    mode: str,
    parallel: int,
    dataset: TinyDataset,
    *,
    out_of_order: bool = False,
    epochs: int = 2,
    fast_layers: bool = True,
    start_method: str = "auto",
) -> Any:
    common: dict[str, Any] = {
        "fast_layers": fast_layers,
        "model_selector": TinySelector(),
        "model_name": TinyModelName.CNN,
        "dataset": dataset,
        "device": "cpu",
        "num_clients": NUM_CLIENTS,
        "epochs": epochs,
        "batch_size": 4,
        "lr": 0.1,
        "seed": SEED,
    }
    if mode == "serial":
        return FedAvgBaseClientTrainer(**common)
    if mode == "thread":
        cls = OutOfOrderThreadTrainer if out_of_order else FedAvgThreadPoolClientTrainer
        return cls(**common, num_parallels=parallel)
    if mode == "process":
        pcls = OutOfOrderProcessTrainer if out_of_order else FedAvgProcessPoolClientTrainer
        return pcls(**common, state_dir=None, num_parallels=parallel, start_method=start_method)
    raise ValueError(mode)


def run_fedavg(
    trainer: Any, dataset: TinyDataset, *, rounds: int = 3
) -> tuple[torch.Tensor, list[list[FedAvgUplinkPackage]]]:
    """Run ``rounds`` FedAvg rounds; return the final global model and every round's uplinks."""
    server = make_server(dataset, rounds=rounds)
    trainer.round = 0
    uplinks = []
    with server:
        while not server.is_stopped():
            cids = server.sample_clients()
            trainer.local_process(server.downlink_package(), cids)
            packages = trainer.uplink_package()
            assert [p.cid for p in packages] == cids
            uplinks.append(packages)
            for package in packages:
                server.load(package)
        return serialize_model(server.model), uplinks


# --------------------------------------------------------------------------------------


def test_contrib_exports_blazefl_names() -> None:
    import emberfl.contrib as contrib
    import emberfl.contrib.fedavg as module
    from emberfl.contrib.fedavg import FedAvgBaseServerHandler as Handler

    assert Handler is contrib.FedAvgBaseServerHandler
    assert contrib.fedavg.FedAvgUplinkPackage is module.FedAvgUplinkPackage
    assert contrib.FedAvgProcessPoolClientTrainer is module.FedAvgProcessPoolClientTrainer
    for name in contrib.__all__:
        assert getattr(contrib, name) is not None


@pytest.mark.parametrize(
    ("global_round", "num_clients", "sample_ratio", "message"),
    [
        (0, 10, 0.3, "global_round must be positive"),
        (1, 0, 0.3, "num_clients must be positive"),
        (1, 10, 0.0, "sample_ratio must be in the interval"),
        (1, 10, 1.1, "sample_ratio must be in the interval"),
        (1, 10, 0.05, "sample_ratio selects zero clients per round"),
    ],
)
def test_server_rejects_invalid_configuration(
    global_round: int, num_clients: int, sample_ratio: float, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        FedAvgBaseServerHandler(
            TinySelector(),
            TinyModelName.CNN,
            TinyDataset(),
            global_round,
            num_clients,
            sample_ratio,
            "cpu",
            4,
            SEED,
        )


def test_sample_clients_is_a_function_of_seed_and_round() -> None:
    dataset = TinyDataset()
    a = make_server(dataset, sample_ratio=0.5)
    b = make_server(dataset, sample_ratio=0.5)
    first = a.sample_clients()
    assert first == b.sample_clients() == a.sample_clients()
    assert len(first) == 3 and len(set(first)) == 3 and first == sorted(first)
    assert all(0 <= c < NUM_CLIENTS for c in first)
    draws = set()
    for r in range(8):
        a.round = r
        draws.add(tuple(a.sample_clients()))
    assert len(draws) > 1


def test_one_round_updates_the_model_with_data_size_weights() -> None:
    dataset = TinyDataset()
    server = make_server(dataset, rounds=1)
    trainer = make_trainer("serial", 1, dataset)
    before = serialize_model(server.model)
    cids = server.sample_clients()
    trainer.local_process(server.downlink_package(), cids)
    packages = trainer.uplink_package()
    assert trainer.uplink_package() == []
    assert [p.data_size for p in packages] == [len(dataset.train[c]) for c in cids]
    expected = FedAvgBaseServerHandler.aggregate(
        [p.model_parameters for p in packages], [p.data_size for p in packages]
    )
    done = [server.load(p) for p in packages]
    assert done == [False] * (len(packages) - 1) + [True]
    assert server.round == 1 and server.is_stopped() and server.if_stop()
    after = serialize_model(server.model)
    assert not torch.equal(before, after)
    assert torch.equal(after, expected)
    manual = sum(p.model_parameters.double() * p.data_size for p in packages)
    total = sum(p.data_size for p in packages)
    torch.testing.assert_close(after.double(), manual / total, rtol=1e-6, atol=1e-7)
    summary = server.get_summary()
    assert set(summary) == {"server_acc", "server_loss"}
    assert 0.0 <= summary["server_acc"] <= 1.0


def test_evaluation_threads_give_the_same_numbers() -> None:
    """Batch sums are added in batch order: any thread count gives the same bits."""
    gen = torch.Generator().manual_seed(7)
    data = TensorDataset(torch.randn(203, 3, 8, 8, generator=gen), torch.randint(0, 10, (203,)))
    model = TinySelector().select_model(TinyModelName.CNN)
    results = {
        n: FedAvgBaseServerHandler.evaluate(
            model, DataLoader(data, batch_size=10), "cpu", num_threads=n
        )
        for n in (1, 2, 3, 8)
    }
    assert len(set(results.values())) == 1
    loss, acc = results[1]
    with torch.no_grad():
        logits = model(data.tensors[0])
    ref = torch.nn.functional.cross_entropy(logits.double(), data.tensors[1], reduction="mean")
    assert loss == pytest.approx(float(ref), rel=1e-5)
    assert acc == float((logits.argmax(1) == data.tensors[1]).double().mean())
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        FedAvgBaseServerHandler.evaluate(model, DataLoader(data), "cpu", num_threads=0)
    dataset = TinyDataset()
    with pytest.raises(ConfigError, match="evaluation_threads must be >= 1"):
        FedAvgBaseServerHandler(
            model_selector=TinySelector(),
            model_name=TinyModelName.CNN,
            dataset=dataset,
            global_round=1,
            num_clients=NUM_CLIENTS,
            sample_ratio=1.0,
            device="cpu",
            batch_size=4,
            seed=SEED,
            evaluation_threads=0,
        )


def test_evaluate_rejects_an_empty_loader() -> None:
    empty = TensorDataset(torch.empty(0, 3, 8, 8), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one sample"):
        FedAvgBaseServerHandler.evaluate(
            TinySelector().select_model(TinyModelName.CNN), DataLoader(empty), "cpu"
        )


def test_wrong_uplink_shape_names_the_client_and_layout() -> None:
    dataset = TinyDataset()
    server = make_server(dataset, rounds=1)
    good = FedAvgUplinkPackage(0, serialize_model(server.model), 8)
    bad = FedAvgUplinkPackage(5, torch.zeros(10, dtype=torch.float64), 8)
    with pytest.raises(TensorMismatchError, match=r"client 5 .*float64.*0\.weight \(6, 3, 3, 3\)"):
        server.global_update([good, bad])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["serial", "thread", "process"])
def test_fast_layers_change_nothing_but_the_pool_module(mode: str) -> None:
    """emberfl.nn.MaxPool2d is bitwise torch's: the global model is identical either way."""
    dataset = TinyDataset()
    models = []
    for fast in (True, False):
        trainer = make_trainer(mode, 2, dataset, epochs=1, fast_layers=fast)
        try:
            model, _ = run_fedavg(trainer, dataset, rounds=2)
        finally:
            if mode == "process":
                trainer.shutdown()
        models.append(model)
        if mode == "serial":
            assert (type(trainer.model[2]) is MaxPool2d) is fast
    assert torch.equal(models[0].view(torch.int32), models[1].view(torch.int32))
    server = make_server(dataset)
    assert type(server.model[2]) is MaxPool2d


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["serial", "thread", "process"])
def test_two_rounds_in_each_mode(mode: str) -> None:
    dataset = TinyDataset()
    trainer = make_trainer(mode, 2, dataset, epochs=1)
    try:
        model, uplinks = run_fedavg(trainer, dataset, rounds=2)
    finally:
        if mode == "process":
            trainer.shutdown()
    assert len(uplinks) == 2
    assert all(len(r) == NUM_CLIENTS for r in uplinks)
    assert torch.isfinite(model).all()


def test_local_sgd_matches_torch_optim_sgd() -> None:
    from emberfl.contrib.fedavg import _fedavg_train
    from emberfl.core import deserialize_model

    dataset = TinyDataset()
    selector = TinySelector()
    initial = serialize_model(selector.select_model(TinyModelName.CNN))
    loader = dataset.get_dataloader(
        FedAvgPartitionType.TRAIN, 1, 4, torch.Generator().manual_seed(3)
    )
    ours, size = _fedavg_train(
        selector.select_model(TinyModelName.CNN), initial, loader, "cpu", 2, 0.1, None
    )
    assert size == len(dataset.train[1])
    model = selector.select_model(TinyModelName.CNN)
    deserialize_model(model, initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = torch.nn.CrossEntropyLoss()
    loader = dataset.get_dataloader(
        FedAvgPartitionType.TRAIN, 1, 4, torch.Generator().manual_seed(3)
    )
    for _ in range(2):
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert torch.equal(ours, serialize_model(model))


README = Path(__file__).parents[1] / "examples" / "quickstart_fedavg" / "README.md"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quickstart_readme_commands_agree() -> None:
    """The README's determinism commands run and print the same model hash."""
    commands = [
        line.split()
        for line in README.read_text().splitlines()
        if line.startswith("python examples/quickstart_fedavg/main.py --clients 4")
    ]
    assert len(commands) == 3
    root = README.parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    hashes = set()
    for command in commands:
        done = subprocess.run(
            [sys.executable, *command[1:]],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        last = done.stdout.strip().splitlines()[-1]
        assert last.startswith("model sha256: ")
        hashes.add(last)
    assert len(hashes) == 1

"""Vectorized execution (emberfl.core.vectorized, FedAvgVectorizedClientTrainer).

The reference is the per-client serial trainer: the plain :class:`FedAvgBaseClientTrainer`
for plain SGD, and the same trainer with ``torch.optim.SGD`` (momentum, weight decay) in
``train`` for the optimiser options the serial trainer does not have.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emberfl.contrib import (
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgDownlinkPackage,
    FedAvgPartitionType,
    FedAvgThreadPoolClientTrainer,
    FedAvgUplinkPackage,
    FedAvgVectorizedClientTrainer,
    FedAvgVectorizedServerHandler,
)
from emberfl.core import deserialize_model, serialize_model
from emberfl.core.vectorized import StackedSGD, check_homogeneous, stack_batches
from emberfl.errors import ClientError, ConfigError, TensorMismatchError

SEED = 7
NUM_CLIENTS = 5
SIZES = [13, 7, 20, 4, 16]  # unequal: short last batches and unequal step counts


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(108, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 5)
    )


MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn": _cnn,
    "mlp": _mlp,
    "bn": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()),
    "dropout": lambda: nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(108, 5)),
    "bn-dropout": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(64, 8),
        nn.Tanh(),
        nn.Linear(8, 5),
    ),
}


class Selector:
    """Builds the named model from a fixed seed, leaving the global generator alone."""

    def select_model(self, model_name: str) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return MODELS[model_name]()


class Data:
    """Client ``c`` has ``SIZES[c]`` random 3x6x6 images and labels in 0..4."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.train = {
            c: TensorDataset(
                torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)
            )
            for c, n in enumerate(SIZES)
        }
        self.test = TensorDataset(
            torch.randn(10, 3, 6, 6, generator=g), torch.randint(0, 5, (10,), generator=g)
        )

    def get_dataset(self, type_: FedAvgPartitionType, cid: int | None) -> Any:
        return self.test if cid is None else self.train[cid]

    def set_dataset(self, type_: FedAvgPartitionType, cid: int | None, dataset: Any) -> None:
        raise NotImplementedError

    def get_dataloader(
        self,
        type_: FedAvgPartitionType,
        cid: int | None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> DataLoader[Any]:
        ds = self.get_dataset(type_, cid)
        return DataLoader(
            ds, batch_size=batch_size or 10, shuffle=cid is not None, generator=generator
        )


class OptimSerialTrainer(FedAvgBaseClientTrainer):
    """The serial trainer with ``torch.optim.SGD(momentum, weight_decay)``."""

    momentum = 0.0
    weight_decay = 0.0

    def train(
        self, model_parameters: torch.Tensor, train_loader: DataLoader[Any], cid: int
    ) -> FedAvgUplinkPackage:
        deserialize_model(self.model, model_parameters)
        self.model.train()
        opt = torch.optim.SGD(
            self.model.parameters(),
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )
        for _ in range(self.epochs):
            for data, target in train_loader:
                opt.zero_grad()
                nn.functional.cross_entropy(self.model(data), target).backward()
                opt.step()
        return FedAvgUplinkPackage(cid, serialize_model(self.model), len(train_loader.dataset))  # type: ignore[arg-type]


COMMON: dict[str, Any] = {
    "dataset": Data(),
    "device": "cpu",
    "num_clients": NUM_CLIENTS,
    "epochs": 2,
    "batch_size": 6,
    "lr": 0.05,
    "seed": SEED,
}


def _server(
    model: str, cls: type[FedAvgBaseServerHandler] = FedAvgBaseServerHandler
) -> FedAvgBaseServerHandler:
    return cls(Selector(), model, COMMON["dataset"], 2, NUM_CLIENTS, 1.0, "cpu", 10, SEED)


def _rounds(
    trainer: Any,
    model: str,
    rounds: int = 1,
    server_cls: type[FedAvgBaseServerHandler] = FedAvgBaseServerHandler,
) -> torch.Tensor:
    server = _server(model, server_cls)
    for _ in range(rounds):
        trainer.local_process(server.downlink_package(), list(range(NUM_CLIENTS)))
        for package in trainer.uplink_package():
            server.load(package)
    server.close()
    return serialize_model(server.model)


def _vectorized(model: str, **kwargs: Any) -> FedAvgVectorizedClientTrainer:
    return FedAvgVectorizedClientTrainer(Selector(), model, **COMMON, **kwargs)


def _assert_close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= rel, f"max relative difference {err:.2e} > {rel:.0e}"


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_plain_sgd_matches_serial_trainer(model: str) -> None:
    serial = FedAvgBaseClientTrainer(Selector(), model, **COMMON)
    want = _rounds(serial, model, rounds=2)
    got = _rounds(_vectorized(model), model, rounds=2)
    _assert_close(got, want, 1e-5)
    assert not torch.equal(want, serialize_model(Selector().select_model(model)))  # it trained


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_momentum_and_weight_decay_match_torch_optim(model: str) -> None:
    serial = OptimSerialTrainer(Selector(), model, **COMMON)
    serial.momentum, serial.weight_decay = 0.9, 1e-3
    want = _rounds(serial, model)
    got = _rounds(_vectorized(model, momentum=0.9, weight_decay=1e-3), model)
    _assert_close(got, want, 1e-5)


def test_per_client_uplinks_match_serial_and_sizes() -> None:
    serial = OptimSerialTrainer(Selector(), "cnn", **COMMON)
    serial.momentum, serial.weight_decay = 0.5, 1e-2
    vec = _vectorized("cnn", momentum=0.5, weight_decay=1e-2, chunk_size=1)
    payload = FedAvgDownlinkPackage(serialize_model(Selector().select_model("cnn")))
    cids = [3, 0, 4]
    before = payload.model_parameters.clone()
    serial.local_process(payload, cids)
    vec.local_process(payload, cids)
    assert torch.equal(payload.model_parameters, before)  # the payload is read-only
    for want, got in zip(serial.uplink_package(), vec.uplink_package(), strict=True):
        assert (got.cid, got.data_size) == (want.cid, want.data_size) == (got.cid, SIZES[got.cid])
        _assert_close(got.model_parameters, want.model_parameters, 1e-5)


def test_deterministic_and_chunk_size_independent() -> None:
    kwargs = {"momentum": 0.9, "weight_decay": 1e-3}
    full = _rounds(_vectorized("cnn", **kwargs), "cnn", rounds=2)
    again = _rounds(_vectorized("cnn", **kwargs), "cnn", rounds=2)
    assert torch.equal(full, again)
    for chunk in (1, 3, NUM_CLIENTS):
        _assert_close(
            _rounds(_vectorized("cnn", chunk_size=chunk, **kwargs), "cnn", rounds=2), full, 1e-6
        )


def test_parallel_chunks_are_bitwise_identical() -> None:
    one = _rounds(_vectorized("cnn", chunk_size=2, momentum=0.9), "cnn", rounds=2)
    two = _rounds(_vectorized("cnn", chunk_size=2, momentum=0.9, num_parallels=2), "cnn", rounds=2)
    assert torch.equal(one, two)


def test_zero_copy_server_matches_copying_server() -> None:
    copied = _rounds(_vectorized("mlp"), "mlp", rounds=2)
    in_place = _rounds(
        _vectorized("mlp"), "mlp", rounds=2, server_cls=FedAvgVectorizedServerHandler
    )
    assert torch.equal(copied, in_place)


def test_uplinks_outlive_the_next_round() -> None:
    trainer = _vectorized("mlp", chunk_size=2)
    payload = FedAvgDownlinkPackage(serialize_model(Selector().select_model("mlp")))
    trainer.local_process(payload, [0, 1, 2])
    first = trainer.uplink_package()
    kept = [p.model_parameters.clone() for p in first]
    trainer.local_process(payload, [3, 4, 0])
    trainer.uplink_package()
    for p, k in zip(first, kept, strict=True):
        assert torch.equal(p.model_parameters, k)


@pytest.mark.parametrize("model", ["bn", "dropout", "bn-dropout"])
def test_batchnorm_and_dropout_match_the_serial_trainer(model: str) -> None:
    """Per-client running statistics, unpadded batch statistics, per-client dropout masks."""
    want = _rounds(FedAvgBaseClientTrainer(Selector(), model, **COMMON), model, rounds=2)
    for chunk in (2, None):
        for parallel in (1, 2):
            trainer = _vectorized(model, chunk_size=chunk, num_parallels=parallel)
            _assert_close(_rounds(trainer, model, rounds=2), want, 1e-5)
    start = serialize_model(Selector().select_model(model))
    assert not torch.equal(want, start)


def test_dropout_masks_come_from_each_clients_stream() -> None:
    """Thread mode gives the serial bits with dropout, and the masks change the result."""
    serial = _rounds(FedAvgBaseClientTrainer(Selector(), "dropout", **COMMON), "dropout", 2)
    again = _rounds(FedAvgBaseClientTrainer(Selector(), "dropout", **COMMON), "dropout", 2)
    threads = _rounds(
        FedAvgThreadPoolClientTrainer(Selector(), "dropout", **COMMON, num_parallels=3),
        "dropout",
        2,
    )
    assert torch.equal(serial, again) and torch.equal(serial, threads)
    MODELS["no-dropout"] = lambda: nn.Sequential(nn.Flatten(), nn.Dropout(0.0), nn.Linear(108, 5))
    try:
        plain = _rounds(
            FedAvgBaseClientTrainer(Selector(), "no-dropout", **COMMON), "no-dropout", 2
        )
    finally:
        del MODELS["no-dropout"]
    assert not torch.allclose(plain, serial)


def test_unsupported_layers_are_rejected_by_name() -> None:
    MODELS["drop2d"] = lambda: nn.Sequential(nn.Dropout2d(0.5), nn.Flatten(), nn.Linear(108, 5))
    MODELS["bn-cma"] = lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.Flatten()
    )
    try:
        with pytest.raises(ConfigError, match=r"layer '0' \(Dropout2d\).*p=0.5"):
            _vectorized("drop2d")
        with pytest.raises(ConfigError, match=r"layer '1' \(BatchNorm2d\).*momentum=None"):
            _vectorized("bn-cma")
    finally:
        del MODELS["drop2d"], MODELS["bn-cma"]


def test_bad_input_gives_clear_errors() -> None:
    for bad in (0, -2):
        with pytest.raises(ConfigError, match="chunk_size must be a positive integer"):
            _vectorized("mlp", chunk_size=bad)
    with pytest.raises(ConfigError, match="num_parallels must be a positive integer"):
        _vectorized("mlp", num_parallels=0)
    trainer = _vectorized("mlp")
    wrong = FedAvgDownlinkPackage(serialize_model(Selector().select_model("cnn")))
    with pytest.raises(TensorMismatchError, match="elements"):
        trainer.local_process(wrong, [0, 1])
    with pytest.raises(ConfigError, match="one architecture"):
        check_homogeneous([_mlp(), _cnn()])
    with pytest.raises(ConfigError, match=r"'1.weight' of model 1 has shape \(8, 108\)"):
        check_homogeneous(
            [
                _mlp(),
                nn.Sequential(
                    nn.Flatten(), nn.Linear(108, 8), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 5)
                ),
            ]
        )
    with pytest.raises(ConfigError, match="momentum"):
        StackedSGD(lr=0.1, momentum=-1.0)


def test_a_failing_chunk_names_its_clients() -> None:
    class Broken(Data):
        def get_dataloader(
            self,
            type_: Any,
            cid: int | None,
            batch_size: int | None = None,
            generator: torch.Generator | None = None,
        ) -> DataLoader[Any]:
            if cid == 2:
                raise RuntimeError("disk on fire")
            return super().get_dataloader(type_, cid, batch_size, generator)

    trainer = FedAvgVectorizedClientTrainer(
        Selector(), "mlp", **{**COMMON, "dataset": Broken()}, chunk_size=2
    )
    payload = FedAvgDownlinkPackage(serialize_model(Selector().select_model("mlp")))
    with pytest.raises(
        ClientError, match=r"client 2: RuntimeError: disk on fire \(chunk of clients \[2, 3\]\)"
    ):
        trainer.local_process(payload, [0, 1, 2, 3])
    assert trainer.uplink_package() == []


def test_stack_batches_pads_and_weights() -> None:
    a = (torch.ones(3, 2), torch.tensor([1, 2, 3]))
    b = (torch.ones(1, 2), torch.tensor([4]))
    x, y, w, active = stack_batches([a, None, b])
    assert x.shape == (3, 3, 2) and y.tolist() == [[1, 2, 3], [0, 0, 0], [4, 0, 0]]
    assert torch.allclose(w, torch.tensor([[1 / 3] * 3, [0.0] * 3, [1.0, 0.0, 0.0]]))
    assert active.tolist() == [True, False, True]


class ListData(Data):
    """The same samples as :class:`Data`, through a plain (non-TensorDataset) data set."""

    def get_dataset(self, type_: FedAvgPartitionType, cid: int | None) -> Any:
        ds = super().get_dataset(type_, cid)
        return [ds[i] for i in range(len(ds))]


def test_generic_loader_path_matches_tensor_fast_path() -> None:
    fast = _rounds(_vectorized("mlp", chunk_size=2), "mlp")
    trainer = FedAvgVectorizedClientTrainer(
        Selector(), "mlp", **{**COMMON, "dataset": ListData()}, chunk_size=2
    )
    generic = _rounds(trainer, "mlp")
    assert torch.equal(fast, generic)


def test_cli_vectorized_mode_matches_serial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    from emberfl.cli import main

    tiny = ["--num-clients", "3", "--rounds", "2", "--epochs", "1", "--batch-size", "16"]
    finals = []
    for mode in ("serial", "vectorized"):
        out = tmp_path / mode
        argv = ["run", "--output-dir", str(out), *tiny, "--mode", mode, "--quiet"]
        assert main([*argv, "--chunk-size", "2"] if mode == "vectorized" else argv) == 0
        state = load_file(str(out / "final_model.safetensors"))
        finals.append(torch.cat([t.reshape(-1) for t in state.values()]))
    _assert_close(finals[1], finals[0], 1e-5)
    assert main(["run", "--mode", "vectorized", "--chunk-size", "0", "--quiet"]) != 0
    assert "chunk_size must be at least 1, got 0" in capsys.readouterr().err


def test_frozen_parameters_and_buffers_come_from_the_global_model() -> None:
    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _mlp()
            self.body[1].requires_grad_(False)
            self.register_buffer("scale", torch.ones(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.body(x) * self.scale
            return out

    MODELS["frozen"] = Frozen
    try:
        start = Selector().select_model("frozen")
        with torch.no_grad():
            for t in start.state_dict().values():
                t.add_(0.1)  # a global model unlike the trainers' own initial one
        payload = FedAvgDownlinkPackage(serialize_model(start))
        results = []
        for trainer in (
            FedAvgBaseClientTrainer(Selector(), "frozen", **COMMON),
            _vectorized("frozen", chunk_size=2),
        ):
            trainer.local_process(payload, [0, 1, 2])
            results.append([p.model_parameters for p in trainer.uplink_package()])
        for want, got in zip(*results, strict=True):
            _assert_close(got, want, 1e-5)
    finally:
        del MODELS["frozen"]

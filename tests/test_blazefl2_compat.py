"""BlazeFL 2.x code on emberfl: IPC modes, the 3-parameter process pool, old module paths,
shared config objects that change between rounds, a ``threading.Event`` stop event.

The trainers below are written the way BlazeFL 2.x's documentation writes them (a static
``worker`` taking paths in storage mode, ``share_dir``, ``ipc_mode``, three type
parameters); they are module-level so that worker processes can import them.
"""

from __future__ import annotations

import importlib
import multiprocessing
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from emberfl.contrib import FedAvgProcessPoolClientTrainer
from emberfl.core import (
    IPCMode,
    ProcessPoolClientTrainer,
    SHMHandle,
    ThreadPoolClientTrainer,
    serialize_model,
)
from emberfl.errors import ClientError, ConfigError
from test_fedavg import NUM_CLIENTS, TinyDataset, make_server, make_trainer

# ------------------------------------------------------------------------------------------
# A small 2.x-style algorithm: each client scales its own rows of a shared table
# ------------------------------------------------------------------------------------------


@dataclass
class SharedTable:
    """A config object shared by every client (BlazeFL pickles it per client)."""

    rows: torch.Tensor
    offsets: np.ndarray
    bias: float = 0.0
    seen: list[int] = field(default_factory=list)


@dataclass
class Up:
    cid: int
    values: torch.Tensor | SHMHandle
    seen_before: int


@dataclass
class Down:
    scale: torch.Tensor


@dataclass
class Config:
    cid: int
    table: SharedTable


def compute(config: Config, payload: Down) -> Up:
    """One client's result; it also records itself in its copy of the shared table."""
    table = config.table
    values = payload.scale * table.rows[config.cid] + float(table.offsets[config.cid]) + table.bias
    seen_before = len(table.seen)
    table.seen.append(config.cid)  # BlazeFL: lost with the client's private copy
    return Up(config.cid, values, seen_before)


class StorageTrainer(ProcessPoolClientTrainer[Up, Down, Config]):
    """The tutorial's shape: 3 type parameters, a path-based worker without ``shm_buffer``."""

    def __init__(self, table: SharedTable, share_dir: Path, num_parallels: int) -> None:
        self.table = table
        self.share_dir = share_dir  # no ipc_mode: a 2.x trainer defaults to storage
        self.num_parallels = num_parallels
        self.device = "cpu"
        self.cache: list[Up] = []
        self.stop_event = multiprocessing.get_context("spawn").Event()  # type: ignore[assignment]

    def get_client_config(self, cid: int) -> Config:
        return Config(cid, self.table)

    def uplink_package(self) -> list[Up]:
        packages, self.cache = self.cache, []
        return packages

    @staticmethod
    def worker(  # type: ignore[override]
        config: Config | Path, payload: Down | Path, device: str, stop_event: threading.Event
    ) -> Path:
        assert isinstance(config, Path) and isinstance(payload, Path)
        package = compute(
            torch.load(config, weights_only=False), torch.load(payload, weights_only=False)
        )
        torch.save(package, config)
        return config


class SharedMemoryTrainer(ProcessPoolClientTrainer[Up, Down, Config]):
    """2.x's shared-memory mode: objects in, results through ``shm_buffer``."""

    def __init__(self, table: SharedTable, num_parallels: int) -> None:
        self.table = table
        self.ipc_mode = IPCMode("SHARED_MEMORY")  # 2.0.2's spelling
        self.num_parallels = num_parallels
        self.device = "cpu"
        self.cache: list[Up] = []
        self.stop_event = threading.Event()  # mirrored into a multiprocessing event

    def get_client_config(self, cid: int) -> Config:
        return Config(cid, self.table)

    def prepare_uplink_package_buffer(self) -> Up:
        return Up(-1, torch.zeros(self.table.rows.shape[1]), 0)

    def uplink_package(self) -> list[Up]:
        packages, self.cache = self.cache, []
        return packages

    @staticmethod
    def worker(
        config: Config | Path,
        payload: Down | Path,
        device: str,
        stop_event: threading.Event,
        *,
        shm_buffer: Up | None = None,
    ) -> Up:
        assert isinstance(config, Config) and isinstance(payload, Down)
        assert shm_buffer is not None
        package = compute(config, payload)
        shm_buffer.values = package.values  # an assignment, as BlazeFL's tests write it
        package.values = SHMHandle()
        return package


class ThreadTrainer(ThreadPoolClientTrainer[Up, Down]):
    def __init__(self, table: SharedTable, num_parallels: int) -> None:
        self.table = table
        self.num_parallels = num_parallels
        self.device = "cpu"
        self.cache: list[Up] = []
        self.stop_event = threading.Event()

    def uplink_package(self) -> list[Up]:
        packages, self.cache = self.cache, []
        return packages

    def worker(self, cid: int, device: str, payload: Down, stop_event: threading.Event) -> Up:
        return compute(Config(cid, self.table), payload)


def make_table() -> SharedTable:
    g = torch.Generator().manual_seed(5)
    return SharedTable(torch.randn(6, 4, generator=g), np.arange(6, dtype=np.float64) / 7)


def serial_reference(table: SharedTable, payload: Down, cids: list[int]) -> list[torch.Tensor]:
    """What BlazeFL shows each client: a private copy of the table as the parent has it."""
    return [payload.scale * table.rows[c] + float(table.offsets[c]) + table.bias for c in cids]


def run_rounds(trainer: Any, table: SharedTable) -> list[list[Up]]:
    """Three rounds; between them the parent changes the shared table, in three ways."""
    cids = [0, 3, 5, 1]
    out = []
    for round_ in range(3):
        payload = Down(torch.full((4,), 1.0 + round_))
        trainer.local_process(payload, cids)
        packages = trainer.uplink_package()
        assert [p.cid for p in packages] == cids
        expected = serial_reference(table, payload, cids)
        for package, want in zip(packages, expected, strict=True):
            assert isinstance(package.values, torch.Tensor)
            assert torch.equal(package.values, want)
        out.append(packages)
        if round_ == 0:
            table.rows[3].mul_(-2.0)  # in place, through a view: the version counter moves
        elif round_ == 1:
            table.bias = 0.25  # a plain attribute
            table.offsets[5] = 100.0  # a NumPy array, in place
    return out


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_parallels", [1, 2])
def test_storage_mode_trainer_in_the_tutorials_shape(tmp_path: Path, num_parallels: int) -> None:
    table = make_table()
    trainer = StorageTrainer(table, tmp_path / "share", num_parallels)
    with trainer:
        rounds = run_rounds(trainer, table)
    # Files are where BlazeFL 2.x puts them: the payload, then each client's result over
    # its config.
    assert (tmp_path / "share" / "payload.pkl").is_file()
    assert sorted(p.name for p in (tmp_path / "share").glob("[0-9]*.pkl")) == [
        "0.pkl",
        "1.pkl",
        "3.pkl",
        "5.pkl",
    ]
    # Every client got a fresh copy of the table, so none saw another's record.
    assert all(p.seen_before == 0 for packages in rounds for p in packages)


@pytest.mark.parametrize("num_parallels", [1, 2])
def test_shared_memory_trainer_sees_every_change_the_parent_makes(num_parallels: int) -> None:
    table = make_table()
    trainer = SharedMemoryTrainer(table, num_parallels)
    with trainer:
        rounds = run_rounds(trainer, table)
    # One worker runs several clients with num_parallels=1: each still gets its own copy.
    assert all(p.seen_before == 0 for packages in rounds for p in packages)


def test_storage_and_shared_memory_and_thread_modes_agree(tmp_path: Path) -> None:
    results = []
    for make in (
        lambda t: StorageTrainer(t, tmp_path / "s", 2),
        lambda t: SharedMemoryTrainer(t, 2),
        lambda t: ThreadTrainer(t, 2),
    ):
        table = make_table()
        trainer = make(table)
        rounds = run_rounds(trainer, table)
        if hasattr(trainer, "shutdown"):
            trainer.shutdown()
        results.append([[p.values for p in packages] for packages in rounds])
    for other in results[1:]:
        for a_round, b_round in zip(results[0], other, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(a_round, b_round, strict=True))


def test_an_unchanged_shared_object_is_sent_once() -> None:
    table = make_table()
    trainer = SharedMemoryTrainer(table, 1)
    with trainer:
        trainer.local_process(Down(torch.ones(4)), [0, 1])
        pool = trainer.__dict__["_emberfl_process_pool"]
        tokens = {s.token for s in pool._sticky.values()}
        trainer.local_process(Down(torch.ones(4)), [2, 3])
        assert {s.token for s in pool._sticky.values()} == tokens
        table.rows.add_(1.0)
        trainer.local_process(Down(torch.ones(4)), [2, 3])
        assert {s.token for s in pool._sticky.values()}.isdisjoint(tokens)


# ------------------------------------------------------------------------------------------
# FedAvg with a data set changed in the parent between rounds: same bits in every mode
# ------------------------------------------------------------------------------------------


def _fedavg_with_mutation(trainer: Any, dataset: TinyDataset) -> torch.Tensor:
    server = make_server(dataset, rounds=3)
    trainer.round = 0
    with server:
        while not server.is_stopped():
            trainer.local_process(server.downlink_package(), server.sample_clients())
            for package in trainer.uplink_package():
                server.load(package)
            if server.round == 1:
                images, _ = dataset.train[2].tensors
                images.mul_(-1.0)  # in place
            elif server.round == 2:
                dataset.train[4] = dataset.train[0]  # a new object for one client
        return serialize_model(server.model)


def test_fedavg_sees_a_data_set_changed_between_rounds_in_every_mode(tmp_path: Path) -> None:
    finals = {}
    for mode, parallel, extra in (
        ("serial", 1, {}),
        ("thread", 2, {}),
        ("process", 2, {}),
        ("process", 1, {"ipc_mode": IPCMode.STORAGE, "share_dir": tmp_path / "share"}),
    ):
        dataset = TinyDataset()
        trainer = make_trainer(mode, parallel, dataset)
        if extra:
            trainer.shutdown()
            trainer = _storage_fedavg(dataset, **extra)
        try:
            finals[f"{mode}-{parallel}-{bool(extra)}"] = _fedavg_with_mutation(trainer, dataset)
        finally:
            if hasattr(trainer, "shutdown"):
                trainer.shutdown()
    reference = finals.pop("serial-1-False")
    for key, final in finals.items():
        assert torch.equal(final, reference), key
    # ... and the change mattered: without it the model differs.
    dataset = TinyDataset()
    trainer = make_trainer("serial", 1, dataset)
    server = make_server(dataset, rounds=3)
    with server:
        while not server.is_stopped():
            trainer.local_process(server.downlink_package(), server.sample_clients())
            for package in trainer.uplink_package():
                server.load(package)
        assert not torch.equal(serialize_model(server.model), reference)


def _storage_fedavg(dataset: TinyDataset, **kw: Any) -> FedAvgProcessPoolClientTrainer:
    from test_fedavg import SEED, TinyModelName, TinySelector

    return FedAvgProcessPoolClientTrainer(
        model_selector=TinySelector(),
        model_name=TinyModelName.CNN,
        state_dir=None,
        dataset=dataset,  # type: ignore[arg-type]
        device="cpu",
        num_clients=NUM_CLIENTS,
        epochs=2,
        batch_size=4,
        lr=0.1,
        seed=SEED,
        num_parallels=1,
        **kw,
    )


def test_fedavg_storage_mode_writes_blazefl_2x_files(tmp_path: Path) -> None:
    dataset = TinyDataset()
    trainer = _storage_fedavg(dataset, ipc_mode="storage", share_dir=tmp_path / "share")
    with trainer:
        trainer.local_process(make_server(dataset).downlink_package(), [0, 1])
        packages = trainer.uplink_package()
    assert [p.cid for p in packages] == [0, 1]
    assert {p.name for p in (tmp_path / "share").iterdir()} == {"payload.pkl", "0.pkl", "1.pkl"}


# ------------------------------------------------------------------------------------------
# The API surface: generics, IPCMode, module paths, errors
# ------------------------------------------------------------------------------------------


def test_process_pool_takes_three_or_four_type_parameters() -> None:
    three = ProcessPoolClientTrainer[Up, Down, Config]  # type: ignore[type-arg]
    four = ProcessPoolClientTrainer[Up, Down, Config, Up]
    assert three == four  # three parameters mean a buffer of the uplink type
    with pytest.raises(TypeError):
        ProcessPoolClientTrainer[Up, Down]  # type: ignore[type-arg]


def test_ipc_mode_accepts_both_spellings() -> None:
    assert IPCMode("storage") is IPCMode("STORAGE") is IPCMode.STORAGE
    assert IPCMode("shared_memory") is IPCMode("SHARED_MEMORY") is IPCMode.SHARED_MEMORY
    assert IPCMode.STORAGE == "storage" and IPCMode.STORAGE == "STORAGE"
    assert IPCMode.SHARED_MEMORY != "storage"
    assert {IPCMode.STORAGE: 1}[IPCMode("STORAGE")] == 1
    with pytest.raises(ValueError):
        IPCMode("disk")


def test_old_module_paths_import() -> None:
    from emberfl import core, reproducibility

    client_trainer = importlib.import_module("emberfl.core.client_trainer")
    utils = importlib.import_module("emberfl.core.utils")
    generator = importlib.import_module("emberfl.reproducibility.generator")
    snapshot = importlib.import_module("emberfl.reproducibility.snapshot")
    fedavg = importlib.import_module("emberfl.contrib.fedavg")
    assert client_trainer.IPCMode is core.IPCMode
    assert client_trainer.ProcessPoolClientTrainer is core.ProcessPoolClientTrainer
    for name in ("SHMHandle", "process_tensors_in_object", "reconstruct_from_shared_memory"):
        assert getattr(utils, name) is getattr(core, name)
    for name in ("RNGSuite", "create_rng_suite", "setup_reproducibility"):
        assert getattr(generator, name) is getattr(reproducibility, name)
    assert snapshot.RandomStateSnapshot is reproducibility.RandomStateSnapshot
    assert fedavg.FedAvgProcessPoolClientTrainer is FedAvgProcessPoolClientTrainer


def test_storage_mode_errors_are_clear(tmp_path: Path) -> None:
    table = make_table()
    trainer = SharedMemoryTrainer(table, 1)
    trainer.ipc_mode = IPCMode.STORAGE
    with pytest.raises(ConfigError, match="share_dir"):
        trainer.local_process(Down(torch.ones(4)), [0])
    trainer.ipc_mode = "disk"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="'disk'"):
        trainer.local_process(Down(torch.ones(4)), [0])
    # A shared-memory worker run in storage mode returns a package, not a path.
    trainer.ipc_mode = IPCMode.STORAGE
    trainer.share_dir = tmp_path
    with trainer, pytest.raises(ClientError, match="AssertionError") as info:
        trainer.local_process(Down(torch.ones(4)), [3])
    assert info.value.cid == 3


class _NotAPathTrainer(StorageTrainer):
    @staticmethod
    def worker(  # type: ignore[override]
        config: Config | Path, payload: Down | Path, device: str, stop_event: threading.Event
    ) -> Any:
        return 42


def test_a_storage_worker_that_returns_no_path_names_the_client(tmp_path: Path) -> None:
    trainer = _NotAPathTrainer(make_table(), tmp_path, 1)
    with trainer, pytest.raises(ClientError, match="returns the file's path") as info:
        trainer.local_process(Down(torch.ones(4)), [4])
    assert info.value.cid == 4


# ------------------------------------------------------------------------------------------
# A threading.Event stop event reaches the workers
# ------------------------------------------------------------------------------------------


class WaitingTrainer(SharedMemoryTrainer):
    @staticmethod
    def worker(
        config: Config | Path,
        payload: Down | Path,
        device: str,
        stop_event: threading.Event,
        *,
        shm_buffer: Up | None = None,
    ) -> Up:
        start = time.monotonic()
        while not stop_event.is_set() and time.monotonic() - start < 30:
            time.sleep(0.01)
        assert isinstance(config, Config)
        return Up(config.cid, torch.tensor([time.monotonic() - start]), 0)

    def prepare_uplink_package_buffer(self) -> Up:
        raise NotImplementedError


def test_a_threading_event_set_by_the_parent_stops_the_workers() -> None:
    trainer = WaitingTrainer(make_table(), 2)
    assert isinstance(trainer.stop_event, threading.Event)
    trainer.start()
    time.sleep(1.0)  # let the workers start
    timer = threading.Timer(0.5, trainer.stop_event.set)
    with trainer:
        timer.start()
        trainer.local_process(Down(torch.ones(4)), [0, 1])
        waited = [float(p.values) for p in trainer.uplink_package()]  # type: ignore[arg-type]
    timer.join()
    assert all(w < 5.0 for w in waited), waited
    assert trainer.stop_event.is_set()


@dataclass
class _Inner:
    tensor: torch.Tensor


@dataclass
class _Outer:
    tensor: torch.Tensor
    inner: _Inner
    items: list[torch.Tensor]


def test_process_tensors_in_object_counts_depth_as_blazefl_does() -> None:
    from emberfl.core import process_tensors_in_object

    obj = _Outer(torch.ones(1), _Inner(torch.ones(1)), [torch.ones(1)])
    # Attributes lie two levels below their object (its __dict__ is one), items one level
    # below their container.
    shallow = process_tensors_in_object(obj, mode="replace", max_depth=2)
    assert isinstance(shallow.tensor, SHMHandle)
    assert isinstance(shallow.inner.tensor, torch.Tensor)
    assert isinstance(shallow.items[0], torch.Tensor)
    middle = process_tensors_in_object(obj, mode="replace", max_depth=3)
    assert isinstance(middle.items[0], SHMHandle)
    assert isinstance(middle.inner.tensor, torch.Tensor)
    deep = process_tensors_in_object(obj, mode="replace", max_depth=4)
    assert isinstance(deep.inner.tensor, SHMHandle)


def test_filtered_dataset_length_mismatch_is_both_errors_blazefl_raised() -> None:
    from emberfl.core import FilteredDataset

    for expected in (ValueError, AssertionError):
        with pytest.raises(expected, match="same length"):
            FilteredDataset([0], [1, 2, 3], [1, 2])

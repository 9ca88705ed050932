"""Failures: a raising worker, a killed worker, Ctrl-C, stop_event, malformed uplinks."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from emberfl.core import ProcessPoolClientTrainer, SHMHandle, StartMethod, ThreadPoolClientTrainer
from emberfl.core._process_pool import resolve_start_method
from emberfl.errors import ClientError, ConfigError, TensorMismatchError, WorkerDiedError
from test_fedavg import TinyDataset, make_trainer

BATCH_S = 0.02


@dataclass
class FaultUp:
    cid: int
    values: torch.Tensor | SHMHandle
    batches: int


@dataclass
class FaultDown:
    scale: torch.Tensor


@dataclass
class FaultConfig:
    cid: int
    behaviour: str
    marker_dir: str
    batches: int


def _train(config: FaultConfig, stop_event: Any) -> int:
    if config.behaviour == "raise":
        raise ValueError(f"boom from client {config.cid}")
    if config.behaviour == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    Path(config.marker_dir, f"started-{config.cid}").touch()
    if config.behaviour == "hang":  # never returns while the release file is missing
        while not Path(config.marker_dir, "release").exists():
            time.sleep(0.01)
    done = 0
    for _ in range(config.batches):
        if stop_event.is_set():  # checked once per batch
            break
        time.sleep(BATCH_S)
        done += 1
    return done


class FaultyProcessTrainer(ProcessPoolClientTrainer[FaultUp, FaultDown, FaultConfig, FaultUp]):
    def __init__(
        self, num_parallels: int, marker_dir: Path, start_method: StartMethod = "auto"
    ) -> None:
        self.start_method = start_method
        self.num_parallels = num_parallels
        self.device = "cpu"
        self.device_count = 0
        self.cache: list[FaultUp] = []
        self.stop_event = multiprocessing.get_context("spawn").Event()
        self.marker_dir = str(marker_dir)
        self.behaviours: dict[int, str] = {}
        self.batches = 2
        self.drain_timeout_s = 5.0

    def get_client_config(self, cid: int) -> FaultConfig:
        return FaultConfig(cid, self.behaviours.get(cid, "ok"), self.marker_dir, self.batches)

    def prepare_uplink_package_buffer(self) -> FaultUp:
        return FaultUp(-1, torch.zeros(4), 0)

    @staticmethod
    def worker(
        config: FaultConfig,
        payload: FaultDown,
        device: str,
        stop_event: Any,
        *,
        shm_buffer: FaultUp | None = None,
    ) -> FaultUp:
        assert shm_buffer is not None
        if config.behaviour == "wrong_shape":
            shm_buffer.values = torch.zeros(7)
            return FaultUp(config.cid, SHMHandle(), 0)
        if config.behaviour == "wrong_dtype":
            shm_buffer.values = torch.zeros(4, dtype=torch.float64)
            return FaultUp(config.cid, SHMHandle(), 0)
        if config.behaviour == "write_payload":
            payload.scale.add_(100.0)
        if config.behaviour == "none":
            return None  # type: ignore[return-value]
        done = _train(config, stop_event)
        assert isinstance(shm_buffer.values, torch.Tensor)
        shm_buffer.values.copy_(payload.scale * config.cid)
        return FaultUp(config.cid, SHMHandle(), done)

    def uplink_package(self) -> list[FaultUp]:
        package, self.cache = self.cache, []
        return package


class FaultyThreadTrainer(ThreadPoolClientTrainer[FaultUp, FaultDown]):
    def __init__(self, num_parallels: int, marker_dir: Path) -> None:
        self.num_parallels = num_parallels
        self.device = "cpu"
        self.device_count = 0
        self.cache: list[FaultUp] = []
        self.stop_event = threading.Event()
        self.marker_dir = str(marker_dir)
        self.behaviours: dict[int, str] = {}
        self.batches = 2

    def worker(self, cid: int, device: str, payload: FaultDown, stop_event: Any) -> FaultUp:
        config = FaultConfig(cid, self.behaviours.get(cid, "ok"), self.marker_dir, self.batches)
        if config.behaviour == "write_payload":
            payload.scale.add_(100.0)
        if config.behaviour == "none":
            return None  # type: ignore[return-value]
        done = _train(config, stop_event)
        return FaultUp(cid, payload.scale * cid, done)

    def uplink_package(self) -> list[FaultUp]:
        package, self.cache = self.cache, []
        return package


PAYLOAD = FaultDown(torch.ones(4))


def _shared_memory_in_use() -> tuple[set[str], int]:
    """This process's memfds and the emberfl / multiprocessing entries of /dev/shm."""
    memfds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
                memfds += 1
        except OSError:
            pass
    return set(os.listdir("/dev/shm")), memfds


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def process_trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyProcessTrainer]:
    trainer = FaultyProcessTrainer(2, tmp_path_factory.mktemp("markers"))
    with trainer:
        yield trainer


def _markers(trainer: FaultyProcessTrainer | FaultyThreadTrainer) -> Path:
    for marker in Path(trainer.marker_dir).iterdir():
        marker.unlink()
    return Path(trainer.marker_dir)


@pytest.mark.timeout(120)
def test_process_worker_error_reaches_the_caller(process_trainer: FaultyProcessTrainer) -> None:
    process_trainer.local_process(PAYLOAD, [0, 1])  # warm up
    pids = process_trainer.worker_pids()
    process_trainer.uplink_package()
    process_trainer.behaviours = {3: "raise"}
    try:
        with pytest.raises(ClientError, match="client 3: ValueError: boom from client 3") as info:
            process_trainer.local_process(PAYLOAD, [1, 2, 3, 4, 5])
    finally:
        process_trainer.behaviours = {}
    assert info.value.cid == 3
    assert "in _train" in info.value.worker_traceback
    assert isinstance(info.value.__cause__, ValueError)
    assert process_trainer.uplink_package() == []  # nothing cached from a failed round
    # The pool was cleaned up and is still usable (same workers).
    process_trainer.local_process(PAYLOAD, [1, 2])
    assert [p.cid for p in process_trainer.uplink_package()] == [1, 2]
    assert process_trainer.worker_pids() == pids


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        ("wrong_shape", r"client 4 .*shape \(7,\).*'values'.*expected shape \(4,\)"),
        ("wrong_dtype", r"client 4 .*torch\.float64.*expected .*torch\.float32"),
    ],
)
def test_malformed_uplink_names_client_and_layout(
    process_trainer: FaultyProcessTrainer, behaviour: str, message: str
) -> None:
    process_trainer.behaviours = {4: behaviour}
    try:
        with pytest.raises(TensorMismatchError, match=message) as info:
            process_trainer.local_process(PAYLOAD, [2, 4])
    finally:
        process_trainer.behaviours = {}
    assert "layout: values: (4,) torch.float32" in str(info.value)
    process_trainer.local_process(PAYLOAD, [4])
    assert process_trainer.uplink_package()[0].cid == 4


@pytest.mark.timeout(120)
def test_process_stop_event_stops_within_a_batch(process_trainer: FaultyProcessTrainer) -> None:
    markers = _markers(process_trainer)
    process_trainer.batches = 10**6
    stopped_at: list[float] = []

    def stop_soon() -> None:
        _wait_for(markers / "started-0")
        _wait_for(markers / "started-1")
        stopped_at.append(time.monotonic())
        process_trainer.stop_event.set()

    setter = threading.Thread(target=stop_soon)
    setter.start()
    try:
        process_trainer.local_process(PAYLOAD, [0, 1])
    finally:
        process_trainer.batches = 2
        setter.join()
    returned = time.monotonic()
    packages = process_trainer.uplink_package()
    assert [p.cid for p in packages] == [0, 1]
    assert all(0 < p.batches < 10**6 for p in packages)
    assert returned - stopped_at[0] < 2.0


@pytest.mark.timeout(120)
def test_process_ctrl_c_stops_training(process_trainer: FaultyProcessTrainer) -> None:
    markers = _markers(process_trainer)
    process_trainer.batches = 10**6
    sent_at: list[float] = []

    def interrupt() -> None:
        _wait_for(markers / "started-0")
        sent_at.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=interrupt)
    sender.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            process_trainer.local_process(PAYLOAD, [0, 1, 2])
    finally:
        process_trainer.batches = 2
        sender.join()
    assert time.monotonic() - sent_at[0] < 3.0
    assert process_trainer.uplink_package() == []
    # Workers ignore SIGINT and were drained: the pool keeps working.
    process_trainer.local_process(PAYLOAD, [0])
    assert len(process_trainer.uplink_package()) == 1


def _semaphore_files(event: Any) -> set[str]:
    """The /dev/shm names of a multiprocessing Event's POSIX semaphores."""
    cond = event._cond
    sems = [cond._lock, cond._sleeping_count, cond._woken_count, cond._wait_semaphore]
    return {"sem." + s._semlock.name.lstrip("/") for s in [*sems, event._flag]}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_killed_worker_raises_and_leaks_nothing(tmp_path: Path, start_method: StartMethod) -> None:
    gc.collect()
    shm_before, memfds_before = _shared_memory_in_use()
    trainer = FaultyProcessTrainer(2, tmp_path, start_method)
    semaphores = _semaphore_files(trainer.stop_event)
    trainer.local_process(PAYLOAD, [0, 1, 2])  # warm pool
    trainer.uplink_package()
    assert _shared_memory_in_use()[1] > memfds_before  # the arenas are memfds
    trainer.behaviours = {2: "kill"}
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"killed by signal SIGKILL while training client 2"):
        trainer.local_process(PAYLOAD, [0, 1, 2, 3])
    assert time.monotonic() - start < 10.0
    assert trainer.worker_pids() == []  # the pool was shut down ...
    assert _shared_memory_in_use()[1] == memfds_before  # ... and its arenas released
    # The next round starts a fresh pool.
    trainer.behaviours = {}
    trainer.local_process(PAYLOAD, [0, 1])
    assert [p.cid for p in trainer.uplink_package()] == [0, 1]
    trainer.shutdown()
    del trainer
    gc.collect()
    shm_after, memfds_after = _shared_memory_in_use()
    assert memfds_after == memfds_before
    assert not {n for n in shm_after - shm_before if "emberfl" in n}
    assert not semaphores & shm_after


def test_auto_start_method_forks_only_where_a_forked_worker_is_safe() -> None:
    # Linux, CUDA not initialised in this process (the tests never initialise it).
    assert resolve_start_method("auto", 1) == "fork"
    # libgomp hangs in a forked child that runs more than one OpenMP thread.
    assert resolve_start_method("auto", 2) == "spawn"
    assert resolve_start_method("auto", None) == "spawn"
    # GPU clients: spawned (a fork after the parent touched CUDA could not use it).
    assert resolve_start_method("auto", 1, "cuda") == "spawn"
    assert resolve_start_method("auto", 1, "cuda:1") == "spawn"
    assert resolve_start_method("auto", 1, "cpu") == "fork"
    assert resolve_start_method("spawn", 1) == "spawn"
    assert resolve_start_method("forkserver", 4) == "forkserver"
    with pytest.raises(ConfigError, match="start_method='thread' is not one of auto, fork"):
        resolve_start_method("thread", 1)


_ORPHAN_SCRIPT = """
import sys, time
from pathlib import Path
sys.path[:0] = [{tests!r}]
from test_faults import FaultyProcessTrainer, PAYLOAD
trainer = FaultyProcessTrainer(3, Path({markers!r}), {start_method!r})
trainer.local_process(PAYLOAD, [0, 1, 2])
print(" ".join(map(str, trainer.worker_pids())), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_workers_exit_when_the_parent_is_killed(tmp_path: Path, start_method: str) -> None:
    # A forked worker inherits the parent ends of the pipes of the workers forked before
    # it (and of its own pipe); it closes them, so every worker sees EOF when the parent
    # dies instead of waiting on its pipe for ever.
    import subprocess
    import sys

    script = _ORPHAN_SCRIPT.format(
        tests=str(Path(__file__).parent), markers=str(tmp_path), start_method=start_method
    )
    pids: list[int] = []
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            pids = [int(p) for p in proc.stdout.readline().split()]
            assert len(pids) == 3 and all(_alive(p) for p in pids)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            deadline = time.monotonic() + 20.0
            while any(_alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not any(_alive(p) for p in pids), "orphaned workers are still running"
        finally:
            proc.kill()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_thread_worker_error_reaches_the_caller(tmp_path: Path) -> None:
    trainer = FaultyThreadTrainer(2, tmp_path)
    trainer.behaviours = {1: "raise"}
    with pytest.raises(ClientError, match="client 1: ValueError") as info:
        trainer.local_process(PAYLOAD, [0, 1, 2])
    assert info.value.cid == 1 and "in _train" in info.value.worker_traceback
    assert trainer.cache == []
    trainer.behaviours = {}
    trainer.local_process(PAYLOAD, [0, 1, 2])
    assert [p.cid for p in trainer.uplink_package()] == [0, 1, 2]


@pytest.mark.timeout(60)
def test_thread_stop_event_and_ctrl_c(tmp_path: Path) -> None:
    trainer = FaultyThreadTrainer(2, tmp_path)
    trainer.batches = 10**6

    def stop_soon() -> None:
        _wait_for(tmp_path / "started-1")
        trainer.stop_event.set()

    setter = threading.Thread(target=stop_soon)
    setter.start()
    start = time.monotonic()
    trainer.local_process(PAYLOAD, [0, 1])
    setter.join()
    assert time.monotonic() - start < 10.0
    assert all(0 < p.batches < 10**6 for p in trainer.uplink_package())

    _markers(trainer)
    sent_at: list[float] = []

    def interrupt() -> None:
        _wait_for(tmp_path / "started-0")
        sent_at.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=interrupt)
    sender.start()
    with pytest.raises(KeyboardInterrupt):
        trainer.local_process(PAYLOAD, [0, 1])
    sender.join()
    assert time.monotonic() - sent_at[0] < 2.0
    assert trainer.cache == []


def test_serial_fedavg_error_names_the_client() -> None:
    dataset = TinyDataset()
    trainer = make_trainer("serial", 1, dataset)
    original = trainer.train

    def train(model_parameters: torch.Tensor, loader: Any, cid: int) -> Any:
        if cid == 4:
            raise RuntimeError("diverged")
        return original(model_parameters, loader, cid)

    trainer.train = train
    from test_fedavg import make_server

    server = make_server(dataset)
    with pytest.raises(ClientError, match="client 4: RuntimeError: diverged"):
        trainer.local_process(server.downlink_package(), [2, 4])
    assert trainer.cache == [] and trainer.round == 0

"""The thread-pool and process-pool execution modes with user-defined packages."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from emberfl.core import (
    ClientJob,
    ProcessPoolClientTrainer,
    SHMHandle,
    ThreadPoolClientTrainer,
)

SPAWN = __import__("multiprocessing").get_context("spawn")


@dataclass
class EchoUp:
    cid: int
    values: torch.Tensor | SHMHandle
    indices: torch.Tensor | SHMHandle
    mask: torch.Tensor | SHMHandle
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EchoDown:
    base: torch.Tensor  # float32 (5,)
    offsets: torch.Tensor  # int64 (3,)
    note: str = ""


@dataclass
class EchoConfig:
    cid: int
    delay: float
    shared: Any
    direct: bool


def _echo(cid: int, payload: EchoDown) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values = payload.base * (cid + 1)
    indices = payload.offsets + cid
    return values, indices, indices % 2 == 0


class EchoProcessTrainer(ProcessPoolClientTrainer[EchoUp, EchoDown, EchoConfig, EchoUp]):
    def __init__(self, num_parallels: int, *, delay: float = 0.0) -> None:
        self.num_parallels = num_parallels
        self.device = "cpu"
        self.device_count = 0
        self.cache: list[EchoUp] = []
        self.stop_event = SPAWN.Event()
        self.delay = delay
        self.direct = False
        self.shared = {"table": torch.arange(1000, dtype=torch.float32), "name": "shared"}

    def get_client_config(self, cid: int) -> EchoConfig:
        return EchoConfig(cid, self.delay * (20 - cid % 20), self.shared, self.direct)

    def prepare_uplink_package_buffer(self) -> EchoUp:
        return EchoUp(
            -1,
            torch.zeros(5),
            torch.zeros(3, dtype=torch.int64),
            torch.zeros(3, dtype=torch.bool),
        )

    @staticmethod
    def worker(
        config: EchoConfig,
        payload: EchoDown,
        device: str,
        stop_event: Any,
        *,
        shm_buffer: EchoUp | None = None,
    ) -> EchoUp:
        time.sleep(config.delay)
        values, indices, mask = _echo(config.cid, payload)
        info = {
            "pid": os.getpid(),
            "shared_id": id(config.shared),
            "table_sum": float(config.shared["table"].sum()),
            "threads": torch.get_num_threads(),
            "finished": time.monotonic(),
            "note": payload.note,
        }
        if config.direct:
            return EchoUp(config.cid, values, indices, mask, info)
        assert shm_buffer is not None
        assert isinstance(shm_buffer.values, torch.Tensor)
        assert isinstance(shm_buffer.indices, torch.Tensor)
        shm_buffer.values.copy_(values)
        shm_buffer.indices.copy_(indices)
        shm_buffer.mask = mask  # assigning (instead of copy_) is accepted too
        return EchoUp(config.cid, SHMHandle(), SHMHandle(), SHMHandle(), info)

    def uplink_package(self) -> list[EchoUp]:
        package, self.cache = self.cache, []
        return package


class EchoThreadTrainer(ThreadPoolClientTrainer[EchoUp, EchoDown]):
    def __init__(self, num_parallels: int, *, delay: float = 0.0) -> None:
        self.num_parallels = num_parallels
        self.device = "cpu"
        self.device_count = 0
        self.cache: list[EchoUp] = []
        self.stop_event = threading.Event()
        self.delay = delay
        self.seen_futures: list[Future[EchoUp]] = []

    def progress_fn(self, it: list[Future[EchoUp]]) -> Iterable[Future[EchoUp]]:
        self.seen_futures = list(it)
        return it

    def worker(self, cid: int, device: str, payload: EchoDown, stop_event: Any) -> EchoUp:
        time.sleep(self.delay * (20 - cid % 20))
        values, indices, mask = _echo(cid, payload)
        info = {"finished": time.monotonic(), "threads": torch.get_num_threads()}
        return EchoUp(cid, values, indices, mask, info)

    def uplink_package(self) -> list[EchoUp]:
        package, self.cache = self.cache, []
        return package


def _payload(note: str = "") -> EchoDown:
    return EchoDown(torch.arange(5, dtype=torch.float32), torch.tensor([1, 2, 3]), note)


def _check(packages: list[EchoUp], cids: list[int]) -> None:
    assert [p.cid for p in packages] == cids
    payload = _payload()
    for package in packages:
        values, indices, mask = _echo(package.cid, payload)
        assert isinstance(package.values, torch.Tensor)
        assert torch.equal(package.values, values)
        assert torch.equal(package.indices, indices)
        assert torch.equal(package.mask, mask)


@pytest.fixture(scope="module")
def process_trainer() -> Iterable[EchoProcessTrainer]:
    trainer = EchoProcessTrainer(2)
    with trainer:
        yield trainer


@pytest.mark.timeout(120)
def test_process_results_come_back_in_cid_order(process_trainer: EchoProcessTrainer) -> None:
    # cid 0 sleeps 2.0 s on one worker while the other worker runs the rest (0.1 + ... +
    # 0.5 s), so cid 0 finishes last although it comes first.
    process_trainer.delay = 0.1
    cids = [0, 19, 18, 17, 16, 15]
    try:
        process_trainer.local_process(_payload(), cids)
    finally:
        process_trainer.delay = 0.0
    packages = process_trainer.uplink_package()
    _check(packages, cids)
    finished = [p.info["finished"] for p in packages]
    assert finished != sorted(finished), "clients were expected to finish out of order"
    assert {p.info["threads"] for p in packages} == {1}


@pytest.mark.timeout(120)
def test_process_pool_persists_across_rounds(process_trainer: EchoProcessTrainer) -> None:
    process_trainer.local_process(_payload("round a"), list(range(6)))
    pids = process_trainer.worker_pids()
    first = process_trainer.uplink_package()
    process_trainer.local_process(_payload("round b"), list(range(6)))
    second = process_trainer.uplink_package()
    assert process_trainer.worker_pids() == pids and len(pids) == 2
    assert {p.info["pid"] for p in first + second} <= set(pids)
    assert {p.info["note"] for p in second} == {"round b"}
    for p in first + second:
        assert p.info["table_sum"] == float(sum(range(1000)))
    # Objects shared by all configs are sent to each worker once and reused (each client
    # gets its own copy of them, rebuilt in the worker).
    pool = process_trainer.__dict__["_emberfl_process_pool"]
    tokens = {s.token for s in pool._sticky.values()}
    assert tokens
    process_trainer.local_process(_payload("round c"), list(range(6)))
    process_trainer.uplink_package()
    assert {s.token for s in pool._sticky.values()} == tokens
    assert all(w.sent_tokens >= tokens for w in pool._res.workers)


@pytest.mark.timeout(120)
def test_uplink_memory_is_bounded_by_parallelism(process_trainer: EchoProcessTrainer) -> None:
    cids = list(range(1200))
    process_trainer.local_process(_payload(), cids)
    packages = process_trainer.uplink_package()
    _check(packages, cids)
    pool = process_trainer.__dict__["_emberfl_process_pool"]
    assert pool._up_arena.num_slots == process_trainer.num_parallels + 1


@pytest.mark.timeout(120)
def test_an_empty_round_is_a_no_op(process_trainer: EchoProcessTrainer) -> None:
    process_trainer.local_process(_payload(), [])
    assert process_trainer.uplink_package() == []
    thread_trainer = EchoThreadTrainer(2)
    thread_trainer.local_process(_payload(), [])
    assert thread_trainer.uplink_package() == []


@pytest.mark.timeout(120)
def test_worker_may_return_tensors_directly(process_trainer: EchoProcessTrainer) -> None:
    process_trainer.direct = True
    try:
        process_trainer.local_process(_payload(), [4, 2])
    finally:
        process_trainer.direct = False
    _check(process_trainer.uplink_package(), [4, 2])


@pytest.mark.timeout(120)
def test_progress_fn_sees_client_jobs_in_order(process_trainer: EchoProcessTrainer) -> None:
    seen: list[int] = []

    def progress(it: list[ClientJob[EchoUp]]) -> Iterable[ClientJob[EchoUp]]:
        for job in it:
            seen.append(job.cid)
            yield job

    process_trainer.progress_fn = progress  # type: ignore[method-assign]
    try:
        process_trainer.local_process(_payload(), [3, 1, 2])
    finally:
        del process_trainer.progress_fn
    assert seen == [3, 1, 2]
    _check(process_trainer.uplink_package(), [3, 1, 2])


def test_thread_results_come_back_in_cid_order() -> None:
    trainer = EchoThreadTrainer(3, delay=0.01)
    threads = torch.get_num_threads()
    cids = [9, 4, 12, 1, 0]
    trainer.local_process(_payload(), cids)
    packages = trainer.uplink_package()
    _check(packages, cids)
    finished = [p.info["finished"] for p in packages]
    assert finished != sorted(finished)
    assert {p.info["threads"] for p in packages} == {1}
    assert torch.get_num_threads() == threads
    assert len(trainer.seen_futures) == len(cids)
    assert trainer.stop_event.is_set()


def test_get_client_device_is_round_robin_over_gpus() -> None:
    trainer = EchoThreadTrainer(1)
    trainer.device, trainer.device_count = "cuda", 2
    assert [trainer.get_client_device(c) for c in range(4)] == ["cuda:0", "cuda:1"] * 2
    trainer.device = "cpu"
    assert trainer.get_client_device(3) == "cpu"


def test_process_trainer_accepts_a_threading_event() -> None:
    trainer = EchoProcessTrainer(1)
    trainer.stop_event = threading.Event()
    with trainer:
        trainer.local_process(_payload(), [0, 1])
        _check(trainer.uplink_package(), [0, 1])
    assert trainer.stop_event.is_set()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(120)
def test_context_manager_and_gc_stop_the_workers() -> None:
    with EchoProcessTrainer(1) as trainer:
        trainer.local_process(_payload(), [0, 1])
        pids = trainer.worker_pids()
        assert all(_alive(p) for p in pids)
    assert not any(_alive(p) for p in pids)
    assert trainer.worker_pids() == []

    trainer = EchoProcessTrainer(1)
    trainer.local_process(_payload(), [0])
    pids = trainer.worker_pids()
    del trainer
    gc.collect()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


class ManagerEventTrainer(EchoProcessTrainer):
    """BlazeFL's convention: a multiprocessing Manager owns the stop event."""

    def __init__(self, num_parallels: int) -> None:
        super().__init__(num_parallels)
        self.manager = SPAWN.Manager()
        self.stop_event = self.manager.Event()  # type: ignore[assignment]


@pytest.mark.timeout(120)
def test_blazefl_style_manager_event_is_accepted() -> None:
    trainer = ManagerEventTrainer(1)
    try:
        trainer.local_process(_payload(), [2, 0, 1])
        _check(trainer.uplink_package(), [2, 0, 1])
        assert trainer.stop_event.is_set()  # set when local_process returns, as in BlazeFL
    finally:
        trainer.shutdown()
    assert not hasattr(trainer, "manager")

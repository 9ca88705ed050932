"""Fault injection: hung clients, writes into the broadcast, workers that return nothing.

Each fault is injected in every mode it can happen in, and each test checks three
things: the error names the client (and, for a time limit, the elapsed time) and comes
within the limit plus two seconds; nothing leaks (file descriptors, memfds, ``/dev/shm``
entries, worker processes); and the next round gives the same bits as a run that never
saw the fault.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from emberfl.algorithms import Aggregate, FedAvg, ServerState
from emberfl.errors import (
    ClientError,
    ClientTimeoutError,
    EmberflError,
    PayloadWriteError,
    ServerTimeoutError,
)
from emberfl.executors import ClientSetup, make_executor
from emberfl.simulation import Simulation
from fl_testkit import HangingData, LazyData, WritesBroadcast, linear_model
from test_faults import (
    FaultDown,
    FaultyProcessTrainer,
    FaultyThreadTrainer,
    _alive,
    _shared_memory_in_use,
    _wait_for,
)

TIMEOUT = 1.0
SLACK = 2.0  # a hung client is reported within the limit plus this
SEED = 5
NUM_CLIENTS = 8
CIDS = [0, 3, 5, 6, 1]
HUNG = 5


def _payload() -> FaultDown:
    return FaultDown(torch.ones(4))


def _resources() -> tuple[int, set[str], int]:
    """Open file descriptors, ``/dev/shm`` files in use and memfds of this process.

    ``/dev/shm`` is the machine's: count emberfl's entries and those this process maps
    (semaphores), not other programs'. No garbage collection first: a failed round's
    traceback must not hold shared memory.
    """
    _, memfds = _shared_memory_in_use()
    shm = {n for n in os.listdir("/dev/shm") if "emberfl" in n}
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[5] if len(line.split(maxsplit=5)) == 6 else ""
        if path.startswith("/dev/shm/"):
            shm.add(path)
    return len(os.listdir("/proc/self/fd")), shm, memfds


def _values(packages: list[Any]) -> list[list[float]]:
    return [p.values.tolist() for p in packages]


# ------------------------------------------------------------------------------------------
# The core protocols: ProcessPoolClientTrainer and ThreadPoolClientTrainer
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_process_trainer_kills_a_hung_worker_and_restarts_the_pool(tmp_path: Path) -> None:
    trainer = FaultyProcessTrainer(2, tmp_path)
    trainer.client_timeout = TIMEOUT
    with trainer:
        trainer.local_process(_payload(), [0, 1, 2])  # warm: the workers have imported torch
        reference = _values(trainer.uplink_package())
        gc.collect()  # earlier tests' objects: not this test's to count
        before = _resources()
        pids = trainer.worker_pids()
        trainer.behaviours = {1: "hang"}
        start = time.monotonic()
        with pytest.raises(ClientTimeoutError) as info:
            trainer.local_process(_payload(), [0, 1, 2])
        took = time.monotonic() - start
        trainer.behaviours = {}
        assert info.value.cid == 1
        assert TIMEOUT <= info.value.elapsed < TIMEOUT + SLACK
        assert took < TIMEOUT + SLACK, took
        assert "client 1: still training after" in str(info.value)
        assert "was killed" in str(info.value)
        assert trainer.uplink_package() == []
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(_alive(p) for p in pids), "the hung worker is still running"
        # The next call starts a new pool and gives what a never-hung run gives.
        trainer.local_process(_payload(), [0, 1, 2])
        assert _values(trainer.uplink_package()) == reference
        assert set(trainer.worker_pids()).isdisjoint(pids)
        assert _resources() == before


@pytest.mark.timeout(60)
def test_thread_trainer_reports_a_hung_client_and_goes_on(tmp_path: Path) -> None:
    trainer = FaultyThreadTrainer(2, tmp_path)
    trainer.client_timeout = TIMEOUT
    trainer.local_process(_payload(), [0, 1, 2])
    reference = _values(trainer.uplink_package())
    trainer.behaviours = {2: "hang"}
    start = time.monotonic()
    try:
        with pytest.raises(ClientTimeoutError) as info:
            trainer.local_process(_payload(), [0, 1, 2])
        took = time.monotonic() - start
        trainer.behaviours = {}
        assert info.value.cid == 2 and info.value.elapsed >= TIMEOUT
        assert took < TIMEOUT + SLACK, took
        assert "left running in its thread" in str(info.value)
        assert trainer.cache == []
        trainer.local_process(_payload(), [0, 1, 2])  # the stuck thread is not in the way
        assert _values(trainer.uplink_package()) == reference
    finally:
        (tmp_path / "release").touch()


@pytest.mark.timeout(60)
def test_thread_trainer_first_ctrl_c_stops_a_hung_round(tmp_path: Path) -> None:
    trainer = FaultyThreadTrainer(2, tmp_path)
    trainer.behaviours = {0: "hang"}  # no time limit: only Ctrl-C can end it
    sent_at: list[float] = []

    def interrupt() -> None:
        _wait_for(tmp_path / "started-0")
        time.sleep(0.1)
        sent_at.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=interrupt)
    sender.start()
    try:
        with pytest.raises(KeyboardInterrupt, match=r"clients 0 were still training"):
            trainer.local_process(_payload(), [0, 1, 2])
        assert time.monotonic() - sent_at[0] < SLACK
        assert trainer.cache == []
    finally:
        sender.join()
        (tmp_path / "release").touch()


@pytest.mark.timeout(120)
def test_a_worker_returning_none_is_named(tmp_path: Path) -> None:
    process = FaultyProcessTrainer(2, tmp_path)
    with process:
        process.behaviours = {1: "none"}
        with pytest.raises(ClientError, match=r"client 1: .*\.worker returned None") as info:
            process.local_process(_payload(), [0, 1, 2])
        assert info.value.cid == 1
        process.behaviours = {}
        process.local_process(_payload(), [0, 1])  # the pool is still usable
        assert len(process.uplink_package()) == 2
    thread = FaultyThreadTrainer(2, tmp_path)
    thread.behaviours = {2: "none"}
    with pytest.raises(ClientError, match=r"client 2: .*\.worker returned None"):
        thread.local_process(_payload(), [0, 1, 2])
    assert thread.cache == []


@pytest.mark.timeout(120)
def test_process_workers_cannot_change_what_other_clients_start_from(tmp_path: Path) -> None:
    trainer = FaultyProcessTrainer(2, tmp_path)
    trainer.behaviours = {2: "write_payload"}
    payload = _payload()
    with trainer:
        runs = []
        for _ in range(2):
            trainer.local_process(payload, list(range(8)))
            runs.append(_values(trainer.uplink_package()))
    # Client 2 sees its own write (copy-on-write); nobody else does, whichever worker
    # trains them and in whichever order.
    expected = [[(101.0 if cid == 2 else 1.0) * cid] * 4 for cid in range(8)]
    assert runs == [expected, expected]
    assert torch.equal(payload.scale, torch.ones(4))


def test_thread_trainer_names_a_client_writing_into_the_payload(tmp_path: Path) -> None:
    trainer = FaultyThreadTrainer(1, tmp_path)
    trainer.behaviours = {1: "write_payload"}
    with pytest.raises(PayloadWriteError, match=r"client 1: changed the payload's tensor") as info:
        trainer.local_process(_payload(), [0, 1, 2])
    assert info.value.cid == 1
    assert trainer.cache == []


# ------------------------------------------------------------------------------------------
# The executors, through Simulation
# ------------------------------------------------------------------------------------------

MODES = [("serial", 1), ("thread", 2), ("process", 2), ("vectorized", 1), ("vectorized", 2)]


def _setup(data: Any) -> ClientSetup:
    return ClientSetup(data, linear_model(), batch_size=3, seed=SEED)


def _reference(mode: str, parallelism: int, rounds: int) -> torch.Tensor:
    executor = make_executor(mode, _setup(LazyData(NUM_CLIENTS)), parallelism=parallelism)
    with Simulation(FedAvg(lr=0.1), executor, num_clients=NUM_CLIENTS) as sim:
        for _ in range(rounds):
            sim.run_round(CIDS)
        return sim.state.model.clone()


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("mode", "parallelism"), MODES)
def test_hung_client_times_out_and_the_retried_round_has_the_same_bits(
    tmp_path: Path, mode: str, parallelism: int
) -> None:
    flag = tmp_path / "hang"
    data = HangingData(NUM_CLIENTS, hang_cid=HUNG, flag=str(flag))
    options: dict[str, Any] = {"chunk_size": 2} if mode == "vectorized" else {}
    executor = make_executor(
        mode, _setup(data), parallelism=parallelism, client_timeout=TIMEOUT, **options
    )
    with Simulation(FedAvg(lr=0.1), executor, num_clients=NUM_CLIENTS) as sim:
        sim.run_round(CIDS)  # warm: process workers have started
        before_model = sim.state.model.clone()
        gc.collect()  # earlier tests' executors (their semaphores): not this test's to count
        before = _resources()
        flag.touch()
        start = time.monotonic()
        try:
            with pytest.raises(ClientTimeoutError) as info:
                sim.run_round(CIDS)
        finally:
            took = time.monotonic() - start
            flag.unlink()  # a thread left behind finishes now
        # Vectorized mode names a chunk by its first client ([0, 3], [5, 6], [1]).
        assert info.value.cid == HUNG
        assert TIMEOUT <= info.value.elapsed < TIMEOUT + SLACK
        assert took < TIMEOUT + SLACK, took
        assert f"client {HUNG}: still training after" in str(info.value)
        assert torch.equal(sim.state.model, before_model)  # the failed round changed nothing
        sim.run_round(CIDS)
        got = sim.state.model.clone()
        assert _resources() == before
    assert torch.equal(got.view(torch.int32), _reference(mode, parallelism, 2).view(torch.int32))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("mode", "parallelism"), MODES[:3])
def test_a_client_writing_into_the_broadcast_fails_the_round(mode: str, parallelism: int) -> None:
    executor = make_executor(mode, _setup(LazyData(NUM_CLIENTS)), parallelism=parallelism)
    with Simulation(WritesBroadcast(writer=6, lr=0.1), executor, num_clients=NUM_CLIENTS) as sim:
        before = sim.state.model.clone()
        with pytest.raises(PayloadWriteError, match=r"wrote into the round's broadcast") as info:
            sim.run_round(CIDS)
        # With one thread or in a worker process the writer is certain; with threads
        # side by side it may be a client that was training beside it.
        message = str(info.value)
        assert info.value.cid == 6 or "(or client 6, training beside it)" in message, message
        del info
        assert torch.equal(sim.state.model, before)
        # Without the writer the same simulation goes on, and gives a clean run's bits.
        sim.algorithm.writer = -1  # type: ignore[attr-defined]
        sim.run_round(CIDS)
        got = sim.state.model.clone()
    assert torch.equal(got.view(torch.int32), _reference(mode, parallelism, 1).view(torch.int32))


class HangingServer(FedAvg):
    """The server update never returns while ``flag`` exists."""

    def __init__(self, *, flag: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.flag = flag

    def server_update(self, state: ServerState, aggregate: Aggregate) -> None:
        while self.flag.exists():
            time.sleep(0.01)
        super().server_update(state, aggregate)


@pytest.mark.timeout(60)
def test_a_hung_server_update_is_interrupted_and_the_simulation_refuses_to_go_on(
    tmp_path: Path,
) -> None:
    flag = tmp_path / "hang"
    flag.touch()
    executor = make_executor("serial", _setup(LazyData(NUM_CLIENTS)))
    algorithm = HangingServer(flag=flag, lr=0.1)
    with Simulation(algorithm, executor, num_clients=NUM_CLIENTS, server_timeout=TIMEOUT) as sim:
        start = time.monotonic()
        with pytest.raises(ServerTimeoutError, match=r"round 1: the aggregation") as info:
            sim.run_round(CIDS)
        assert time.monotonic() - start < TIMEOUT + SLACK + 1.0  # + the clients' training
        assert info.value.elapsed >= TIMEOUT and info.value.round == 1
        flag.unlink()
        with pytest.raises(EmberflError, match=r"server_timeout=1 s\) and were interrupted"):
            sim.run_round(CIDS)


# ------------------------------------------------------------------------------------------
# The CLI under signals: stop, then resume to a clean run's bits
# ------------------------------------------------------------------------------------------

CLI_RUN = [
    "--num-clients", "4", "--rounds", "40", "--epochs", "1", "--batch-size", "16",
    "--train-size", "300", "--checkpoint-every", "1", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The final model of an uninterrupted run (serial: the same bits as process mode)."""
    from emberfl.cli import main

    run_dir = tmp_path_factory.mktemp("clean") / "run"
    assert main(["run", "--output-dir", str(run_dir), *CLI_RUN, "--mode", "serial"]) == 0
    return (run_dir / "final_model.safetensors").read_bytes()


def _checkpoint_round(run_dir: Path) -> int:
    from emberfl.cli.checkpoint import load_checkpoint

    try:
        checkpoint = load_checkpoint(run_dir)
    except Exception:  # not written yet, or mid-rename
        return -1
    return -1 if checkpoint is None else checkpoint.round


def _emberfl_shm() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if "emberfl" in n}


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("sig", "status", "first_line"),
    [
        (signal.SIGTERM, 143, "emberfl: terminated (SIGTERM); the checkpoint in "),
        (signal.SIGINT, 130, "emberfl: interrupted; the checkpoint in "),
        (signal.SIGKILL, -signal.SIGKILL, None),
    ],
    ids=["SIGTERM", "SIGINT", "SIGKILL"],
)
def test_a_signalled_cli_run_stops_cleanly_and_resumes_to_the_same_bits(
    tmp_path: Path, clean_run: bytes, sig: int, status: int, first_line: str | None
) -> None:
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    shm_before = _emberfl_shm()
    command = [sys.executable, "-m", "emberfl", "run", "--output-dir", str(run_dir)]
    with subprocess.Popen(
        [*command, *CLI_RUN, "--mode", "process", "--parallelism", "2"],
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            deadline = time.monotonic() + 120
            while _checkpoint_round(run_dir) < 1:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "no checkpoint after 120 s"
                time.sleep(0.02)
            workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
                       .read_text().split()]  # fmt: skip
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == status, err
    assert "Traceback" not in err and "Error" not in err.replace("emberfl: ", ""), err
    if first_line is None:
        assert err == "", err
    else:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(first_line), err
        assert f"(resume with: emberfl run --resume {run_dir})" in lines[0], err
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers), "workers outlived the run"
    assert _emberfl_shm() == shm_before
    stopped_at = _checkpoint_round(run_dir)
    assert 1 <= stopped_at < 40, stopped_at
    resumed = subprocess.run(
        [*command[:4], "--resume", str(run_dir), "--quiet"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (run_dir / "final_model.safetensors").read_bytes() == clean_run

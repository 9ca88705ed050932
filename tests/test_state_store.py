"""The client state store: lazy slots, in-place access from workers, persistence, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emberfl.errors import CheckpointError, ConfigError
from emberfl.executors import ClientSetup, make_executor
from emberfl.simulation import Simulation
from emberfl.state_store import ClientStateStore, attach_state
from fl_testkit import ControlVariates, LazyData, linear_model

SCRIPT = Path(__file__).with_name("state_resume_script.py")


def test_slots_are_allocated_on_first_use_in_segments() -> None:
    with ClientStateStore({"a": 10, "b": 2}, segment_slots=4) as store:
        assert len(store) == 0 and store.allocated_bytes == 0
        views = store.views(9_999)
        assert set(views) == {"a", "b"} and views["a"].shape == (10,)
        assert torch.equal(views["a"], torch.zeros(10))
        assert store.allocated_bytes == 4 * 12 * 4  # one segment of four slots
        for cid in (5, 17, 3):
            store.views(cid)
        assert store.allocated_bytes == 4 * 12 * 4
        store.views(42)
        assert store.allocated_bytes == 2 * 4 * 12 * 4
        assert list(store) == [3, 5, 17, 42, 9_999]
        assert not store.is_written(5)
        store.views(5)["b"].fill_(2.0)
        store.mark_written(5)
        assert store.is_written(5) and torch.equal(store.views(5)["b"], torch.full((2,), 2.0))


def test_save_and_load_keep_written_clients_only(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    with ClientStateStore({"c": 3}) as store:
        for cid in (4, 1, 7):
            store.views(cid)["c"].copy_(torch.tensor([cid, cid + 0.5, -cid]))
            store.mark_written(cid)
        store.views(100)  # allocated, never written
        store.save(path)
    with ClientStateStore({"c": 3}) as again:
        again.load(path)
        assert list(again) == [1, 4, 7]
        assert torch.equal(again.views(7)["c"], torch.tensor([7.0, 7.5, -7.0]))
    with ClientStateStore({"d": 3}) as other, pytest.raises(CheckpointError, match="entries"):
        other.load(path)
    with ClientStateStore({"c": 4}) as other, pytest.raises(CheckpointError, match="shape"):
        other.load(path)


def test_file_backing_lives_in_the_folder_and_is_removed(tmp_path: Path) -> None:
    with ClientStateStore({"c": 1000}, backing="file", directory=tmp_path) as store:
        store.views(1)["c"].fill_(3.0)
        assert len(list(tmp_path.iterdir())) == 1
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="existing folder"):
        ClientStateStore({"c": 1}, backing="file", directory=tmp_path / "missing")
    with pytest.raises(ConfigError, match="at least one entry"):
        ClientStateStore({})
    with pytest.raises(ConfigError, match="size of client state entry 'c' must be a positive"):
        ClientStateStore({"c": 0})


def test_a_worker_process_writes_the_parents_slots_in_place() -> None:
    import multiprocessing

    with ClientStateStore({"c": 5}) as store:
        location = store.location(12)
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=_write_sevens, args=(location,))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        assert torch.equal(store.views(12)["c"], torch.full((5,), 7.0))


def _write_sevens(location: object) -> None:
    attach_state(location)["c"].fill_(7.0)  # type: ignore[arg-type]


@pytest.mark.timeout(240)
def test_state_survives_rounds_in_process_mode_and_a_file_store_gives_the_same_bits(
    tmp_path: Path,
) -> None:
    results = []
    for backing in ("memory", "file"):
        setup = ClientSetup(LazyData(10_000), linear_model(), batch_size=3, seed=5)
        with Simulation(
            ControlVariates(lr=0.1),
            make_executor("process", setup, parallelism=2),
            num_clients=10_000,
            clients_per_round=100,
            state_backing=backing,  # type: ignore[arg-type]
            state_dir=tmp_path if backing == "file" else None,
        ) as sim:
            sizes = []
            for _ in range(3):
                sim.run_round()
                assert sim.client_state is not None
                sizes.append(len(sim.client_state))
            # Only the clients that trained have a slot (a few were sampled twice).
            assert sizes[0] == 100 and 100 < sizes[1] <= 200 < sizes[2] <= 300
            slot_bytes = 4 * sim.layout.dim
            assert sim.client_state.allocated_bytes <= (sizes[2] + 4096) * slot_bytes
            # Every trained client's control variate is non-zero: the workers wrote it.
            tensors = sim.state_tensors()
            assert tensors["clients/cids"].numel() == sizes[2]
            assert bool((tensors["clients/c"].abs().sum(1) > 0).all())
            results.append(tensors)
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_and_resume_give_the_same_bits(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    straight = tmp_path / "straight.safetensors"
    subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "a.ckpt"), "4", str(straight)],
        env=env,
        check=True,
        timeout=240,
    )
    ckpt, resumed = tmp_path / "b.ckpt", tmp_path / "resumed.safetensors"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(ckpt), "4", str(resumed), "--pause-after", "2"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 200
    for line in proc.stdout:
        if line.startswith("round 2 ") or time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its workers, no clean-up
    proc.wait(30)
    proc.stdout.close()
    assert ckpt.exists() and not resumed.exists()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(ckpt), "4", str(resumed)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=240,
    )
    assert "resumed at round 2" in done.stdout
    want, got = load_file(str(straight)), load_file(str(resumed))
    assert want.keys() == got.keys() and "clients/c" in want
    assert all(torch.equal(want[k], got[k]) for k in want)

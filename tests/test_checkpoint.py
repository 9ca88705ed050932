"""Checkpoints of `emberfl run`: atomic writes, corruption detection and bitwise resume.

The central test kills a real `python -m emberfl run` with SIGKILL after it wrote a
checkpoint, resumes it, and compares the final model with an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from emberfl.cli import checkpoint as ckpt
from emberfl.cli import main
from emberfl.cli.checkpoint import (
    Checkpoint,
    atomic_write_bytes,
    load_checkpoint,
    load_model_file,
    save_checkpoint,
    save_model_file,
)
from emberfl.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num-clients", "4", "--epochs", "1", "--batch-size", "16", "--seed", "3", "--quiet"]


def _state(value: float) -> dict[str, torch.Tensor]:
    return {
        "w": torch.full((3, 2), value),
        "steps": torch.tensor([7], dtype=torch.int64),
    }


def _checkpoint(round_: int) -> Checkpoint:
    return Checkpoint(
        round=round_,
        model_state=_state(float(round_)),
        config={"rounds": 5, "lr": 0.1},
        metrics=[{"round": r + 1, "test_accuracy": 0.5} for r in range(round_)],
        rng={"numpy": {"state": 2**80}},
        wall_time_s=1.5,
    )


# --------------------------------------------------------------------------------------
# Atomic writes and the checkpoint format
# --------------------------------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_failed_atomic_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def crash(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint(2))
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded.round == 2
    assert loaded.config == {"rounds": 5, "lr": 0.1}
    assert loaded.metrics == _checkpoint(2).metrics
    assert loaded.rng == {"numpy": {"state": 2**80}}
    assert loaded.wall_time_s == 1.5
    for key, tensor in _state(2.0).items():
        assert loaded.model_state[key].dtype == tensor.dtype
        assert torch.equal(loaded.model_state[key], tensor)


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None


def test_a_newer_checkpoint_replaces_the_older_one(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint(1))
    save_checkpoint(tmp_path, _checkpoint(2))
    names = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert names == ["model-round-000002.safetensors", "state.json"]
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded.round == 2


def test_kill_between_tensor_file_and_state_keeps_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the new tensor file but before state.json leaves the old checkpoint."""
    save_checkpoint(tmp_path, _checkpoint(1))

    def killed(path: object, text: str) -> None:
        raise KeyboardInterrupt  # stands for SIGKILL at the worst moment

    monkeypatch.setattr(ckpt, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, _checkpoint(2))
    monkeypatch.undo()
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded.round == 1
    assert torch.equal(loaded.model_state["w"], _state(1.0)["w"])


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        ("state-garbage", "unreadable JSON"),
        ("state-format", "not an emberfl-checkpoint"),
        ("state-version", "format version"),
        ("state-field", "malformed field"),
        ("tensor-truncated", "SHA-256"),
        ("tensor-missing", "cannot read"),
    ],
)
def test_corrupt_checkpoints_are_reported(tmp_path: Path, damage: str, fragment: str) -> None:
    save_checkpoint(tmp_path, _checkpoint(2))
    folder = tmp_path / "checkpoint"
    state_path = folder / "state.json"
    tensor_path = folder / "model-round-000002.safetensors"
    state = json.loads(state_path.read_text())
    if damage == "state-garbage":
        state_path.write_text('{"format": "emberfl-ch')
    elif damage == "state-format":
        state_path.write_text(json.dumps({**state, "format": "other"}))
    elif damage == "state-version":
        state_path.write_text(json.dumps({**state, "version": 99}))
    elif damage == "state-field":
        del state["model_sha256"]
        state_path.write_text(json.dumps(state))
    elif damage == "tensor-truncated":
        tensor_path.write_bytes(tensor_path.read_bytes()[:-5])
    else:
        tensor_path.unlink()
    with pytest.raises(CheckpointError, match="checkpoint") as info:
        load_checkpoint(tmp_path)
    assert fragment in str(info.value)


def test_model_file_round_trip_and_determinism(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_model_file(a, _state(1.0), metadata={"emberfl": "{}"})
    save_model_file(b, _state(1.0), metadata={"emberfl": "{}"})
    assert a.read_bytes() == b.read_bytes()
    assert torch.equal(load_model_file(a)["steps"], _state(1.0)["steps"])
    b.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_model_file(b)


# --------------------------------------------------------------------------------------
# Resume through the CLI
# --------------------------------------------------------------------------------------


def _run_cli(args: list[str]) -> int:
    return main(["run", *args])


def test_kill_and_resume_is_bitwise_identical(tmp_path: Path) -> None:
    """SIGKILL a real run after a checkpoint, resume it, compare with an uninterrupted run."""
    rounds = 6
    options = [*TINY, "--rounds", str(rounds), "--checkpoint-every", "1"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "emberfl", "run", "--output-dir", str(killed), *options],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    state_path = killed / "checkpoint" / "state.json"
    try:
        deadline = time.monotonic() + 120
        while not state_path.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final_model.safetensors").exists(), "the run finished before the kill"
    at_kill = load_checkpoint(killed)
    assert at_kill is not None
    assert 1 <= at_kill.round < rounds

    assert main(["run", "--resume", str(killed), "--quiet"]) == 0
    straight = tmp_path / "straight"
    assert _run_cli(["--output-dir", str(straight), *options]) == 0

    resumed_bytes = (killed / "final_model.safetensors").read_bytes()
    assert resumed_bytes == (straight / "final_model.safetensors").read_bytes()
    resumed_rows = [
        json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()
    ]
    straight_rows = [
        json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in resumed_rows] == list(range(1, rounds + 1))
    for a, b in zip(resumed_rows, straight_rows, strict=True):
        assert (a["test_loss"], a["test_accuracy"]) == (b["test_loss"], b["test_accuracy"])


def test_resume_extends_a_finished_run(tmp_path: Path) -> None:
    """--resume --rounds N on a finished run equals an N-round run; so does a run whose
    checkpoint was lost (it restarts from round 0)."""
    short, long_ = tmp_path / "short", tmp_path / "long"
    assert _run_cli(["--output-dir", str(short), *TINY, "--rounds", "1"]) == 0
    assert _run_cli(["--output-dir", str(long_), *TINY, "--rounds", "2"]) == 0
    assert main(["run", "--resume", str(short), "--rounds", "2", "--quiet"]) == 0
    expected = (long_ / "final_model.safetensors").read_bytes()
    assert (short / "final_model.safetensors").read_bytes() == expected
    assert len((short / "metrics.jsonl").read_text().splitlines()) == 2

    for path in (long_ / "checkpoint").iterdir():
        path.unlink()
    (long_ / "checkpoint").rmdir()
    (long_ / "final_model.safetensors").unlink()
    assert main(["run", "--resume", str(long_), "--quiet"]) == 0
    assert (long_ / "final_model.safetensors").read_bytes() == expected


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    assert _run_cli(["--output-dir", str(run_dir), *TINY, "--rounds", "1"]) == 0
    return run_dir


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_resume_rejects_a_corrupt_checkpoint(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _copy_run(finished_run, tmp_path / "run")
    (run_dir / "checkpoint" / "state.json").write_text("{ not json")
    assert main(["run", "--resume", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("emberfl: error: checkpoint ")
    assert "corrupt" in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_resume_rejects_a_checkpoint_of_another_config(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _copy_run(finished_run, tmp_path / "run")
    config = run_dir / "config.toml"
    config.write_text(config.read_text().replace("lr = 0.2", "lr = 0.05"))
    assert main(["run", "--resume", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "lr=0.2" in err
    assert "lr=0.05" in err


def test_resume_rejects_a_checkpoint_of_another_model(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _copy_run(finished_run, tmp_path / "run")
    loaded = load_checkpoint(run_dir)
    assert loaded is not None
    loaded.model_state = {"conv.weight": torch.zeros(2, 2)}
    save_checkpoint(run_dir, loaded)
    assert main(["run", "--resume", str(run_dir)]) == 1
    assert "do not match model 'mlp'" in capsys.readouterr().err


def test_resume_cannot_change_the_experiment(
    finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--resume", str(finished_run), "--lr", "0.5"]) == 2
    assert "drop the lr option" in capsys.readouterr().err
    assert main(["run", "--resume", str(finished_run), "--config", "x.toml"]) == 2
    assert "drop --config" in capsys.readouterr().err
    assert main(["run", "--resume", str(finished_run), "--rounds", "0"]) == 2
    assert main(["run", "--resume", str(finished_run.parent / "nope")]) == 2
    assert "not an emberfl run directory" in capsys.readouterr().err

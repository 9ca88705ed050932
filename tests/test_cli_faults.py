"""The CLI under faults: a full disk, files that are not UTF-8, files where folders should
be, bad checkpoints, duplicate keys, Ctrl-C and failing clients.

Every case checks the exit status, that stderr is exactly one ``emberfl: error:`` line
with no traceback, and that nothing was lost: the previous checkpoint is intact and a
resume ends with the bits of an uninterrupted run. Faults are injected in-process with
monkeypatch (``os.write`` raising ``ENOSPC`` for one file, ...), on tiny digits runs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import emberfl.atomic
import emberfl.cli.run as run_module
from emberfl.cli import main
from emberfl.cli.checkpoint import load_checkpoint
from emberfl.cli.config import RunConfig, check_keys, merge_config
from emberfl.errors import CheckpointError, ClientError, ConfigError
from emberfl.simulation import Simulation

TINY = [
    "--num-clients", "3", "--epochs", "1", "--batch-size", "16", "--train-size", "300",
    "--checkpoint-every", "1", "--quiet",
]  # fmt: skip
NOT_UTF8 = b"\xff\xfe rounds = 3\n"


def run(*args: str) -> int:
    return main(["run", *args])


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line on stderr, checked to be an ``emberfl: error:`` line."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("emberfl: error: "), err
    return lines[0]


def checkpoint_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoint").iterdir())


def final_bytes(run_dir: Path) -> bytes:
    return (run_dir / "final_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished 2-round run and an uninterrupted 3-round run of the same experiment."""
    root = tmp_path_factory.mktemp("runs")
    assert run("--output-dir", str(root / "two"), *TINY, "--rounds", "2") == 0
    assert run("--output-dir", str(root / "three"), *TINY, "--rounds", "3") == 0
    return {"two": root / "two", "three": root / "three"}


@pytest.fixture
def two(runs: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the finished 2-round run."""
    return Path(shutil.copytree(runs["two"], tmp_path / "run"))


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


DiskFull = Callable[[str, Callable[[], bool]], None]


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch) -> DiskFull:
    """``disk_full("model-round-000002", when)`` makes ``os.write`` fail with ENOSPC for
    files whose name contains that text (the atomic writer's temporary files included)
    while ``when()`` is true."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell which file a write goes to")
    real_write = os.write

    def arm(fragment: str, when: Callable[[], bool]) -> None:
        def write(fd: int, data: Any) -> int:
            if fragment in _fd_path(fd) and when():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)

    return arm


# --------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------


def test_a_short_atomic_write_keeps_the_old_file_and_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.bin"
    emberfl.atomic.atomic_write_bytes(target, b"old")
    real_write = os.write
    written = {"n": 0}

    def short_write(fd: int, data: Any) -> int:
        if written["n"]:  # the first call writes a part, the second finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written["n"] = real_write(fd, bytes(data[:10]))
        return written["n"]

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(OSError) as info:
        emberfl.atomic.atomic_write_bytes(target, b"new" * 1000)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


@pytest.mark.parametrize("failing", ["model-round-000002", "state.json"])
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(
    failing: str,
    runs: dict[str, Path],
    tmp_path: Path,
    disk_full: DiskFull,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "run"
    # Round 2's save: its model file, or state.json once round 1's is there.
    disk_full(failing, (run_dir / "checkpoint" / "state.json").exists)
    assert run("--output-dir", str(run_dir), *TINY, "--rounds", "3") == 1
    line = error_line(capsys)
    folder = run_dir / "checkpoint"
    assert line == (
        f"emberfl: error: could not save the round-2 checkpoint in {folder}: No space left "
        f"on device; the checkpoint in {folder} still holds round 1 (resume with: emberfl "
        f"run --resume {run_dir}); details in {run_dir / 'error.log'}"
    )
    log = (run_dir / "error.log").read_text()
    assert "Traceback" in log and "No space left on device" in log
    # The round-1 checkpoint, whole, and nothing else: no temporary or half-saved file.
    assert checkpoint_files(run_dir) == ["model-round-000001.safetensors", "state.json"]
    assert [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")] == []
    kept = load_checkpoint(run_dir)
    assert kept is not None and kept.round == 1
    monkeypatch.undo()
    assert run("--resume", str(run_dir), "--quiet") == 0
    assert final_bytes(run_dir) == final_bytes(runs["three"])
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rows] == [1, 2, 3]


def test_disk_full_while_logging_metrics(
    runs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A short append names the file (a failed write alone names none) and is resumable."""
    real_open = open
    calls = {"n": 0}

    class FullFile:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> FullFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self) -> None:
            pass

    def fake_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        f = real_open(path, *args, **kwargs)
        if str(path).endswith("metrics.jsonl"):
            calls["n"] += 1
            if calls["n"] == 2:  # round 2's row
                return FullFile(f)
        return f

    monkeypatch.setattr(emberfl.atomic, "open", fake_open, raising=False)
    run_dir = tmp_path / "run"
    assert run("--output-dir", str(run_dir), *TINY, "--rounds", "3") == 1
    line = error_line(capsys)
    assert line.startswith(
        f"emberfl: error: could not write {run_dir / 'metrics.jsonl'}: No space left on "
        "device; free some disk space; the checkpoint in "
    )
    assert f"holds round 1 (resume with: emberfl run --resume {run_dir})" in line
    assert line.endswith(f"details in {run_dir / 'error.log'}")
    monkeypatch.undo()
    assert run("--resume", str(run_dir), "--quiet") == 0
    assert final_bytes(run_dir) == final_bytes(runs["three"])
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3


def test_unwritable_final_model(
    runs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def refused(path: Any, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(run_module, "save_model_file", refused)
    run_dir = tmp_path / "run"
    assert run("--output-dir", str(run_dir), *TINY, "--rounds", "3") == 1
    line = error_line(capsys)
    assert f"cannot access {run_dir / 'final_model.safetensors'}: Permission denied" in line
    assert "check the permissions" in line
    assert "still holds" not in line and "holds round 3" in line
    monkeypatch.undo()
    assert run("--resume", str(run_dir), "--quiet") == 0
    assert final_bytes(run_dir) == final_bytes(runs["three"])


# --------------------------------------------------------------------------------------
# Files that are not UTF-8
# --------------------------------------------------------------------------------------


def test_config_file_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "exp.toml"
    config.write_bytes(NOT_UTF8)
    out = tmp_path / "out"
    assert run("--config", str(config), "--output-dir", str(out)) == 2
    line = error_line(capsys)
    assert f"config file {config} is not UTF-8 text (byte 0xff at offset 0)" in line
    assert not out.exists()


@pytest.mark.parametrize("command", ["resume", "report"])  # plot does not read it
def test_run_config_not_utf8(command: str, two: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (two / "config.toml").write_bytes(NOT_UTF8)
    argv = ["run", "--resume", str(two)] if command == "resume" else [command, str(two)]
    before = checkpoint_files(two)
    assert main(argv) == 2
    line = error_line(capsys)
    assert f"{two / 'config.toml'} is not UTF-8 text" in line
    assert checkpoint_files(two) == before


def test_partition_csv_not_utf8(two: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = two / "partition.csv"
    good = csv_path.read_bytes()
    csv_path.write_bytes(b"\xff\xfe" + good)
    assert main(["run", "--resume", str(two)]) == 1
    line = error_line(capsys)
    assert f"cannot read {csv_path}: not UTF-8 text (byte 0xff at offset 0)" in line
    assert f"emberfl run --resume {two}` rewrites it" in line
    assert line.endswith(f"details in {two / 'error.log'}")
    assert main(["plot", str(two)]) == 1
    assert f"cannot read {csv_path}: not UTF-8 text" in error_line(capsys)
    assert main(["report", str(two)]) == 0  # the report says so and goes on
    assert f"{csv_path} is unreadable: not UTF-8 text" in capsys.readouterr().out
    csv_path.unlink()  # as the message says: resume rewrites it
    assert main(["run", "--resume", str(two), "--quiet"]) == 0
    assert csv_path.read_bytes() == good


def test_metrics_not_utf8(two: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = two / "metrics.jsonl"
    metrics.write_bytes(b"\xff\xfe" + metrics.read_bytes())
    for command in ("report", "plot"):
        assert main([command, str(two)]) == 1
        assert f"{metrics} is not UTF-8 text" in error_line(capsys)
    assert main(["run", "--resume", str(two), "--quiet"]) == 0  # rewritten from the checkpoint
    assert main(["report", str(two)]) == 0


def test_checkpoint_state_not_utf8(two: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (two / "checkpoint" / "state.json").write_bytes(NOT_UTF8)
    assert main(["run", "--resume", str(two)]) == 1
    line = error_line(capsys)
    assert "corrupt" in line and "state.json" in line


# --------------------------------------------------------------------------------------
# A file where a folder should be
# --------------------------------------------------------------------------------------


def test_checkpoint_path_is_a_file_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint").write_text("not a folder")
    assert run("--output-dir", str(run_dir), *TINY, "--rounds", "3") == 2
    line = error_line(capsys)
    assert f"{run_dir / 'checkpoint'} is a file, not a folder" in line
    assert "--output-dir" in line
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint"]  # nothing trained


def test_resume_with_a_file_as_checkpoint_folder(
    two: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(two / "checkpoint")
    (two / "checkpoint").write_text("")
    metrics = (two / "metrics.jsonl").read_bytes()
    assert main(["run", "--resume", str(two), "--rounds", "3"]) == 2
    assert f"{two / 'checkpoint'} is a file, not a folder" in error_line(capsys)
    assert (two / "metrics.jsonl").read_bytes() == metrics


def test_plot_into_a_folder_where_a_png_should_be(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figs"
    (out / "loss.png").mkdir(parents=True)
    assert main(["plot", str(runs["two"]), "--out-dir", str(out)]) == 1
    line = error_line(capsys)
    assert f"{out / 'loss.png'} is a folder where a file is needed" in line
    assert f"details in {runs['two'] / 'error.log'}" in line
    (runs["two"] / "error.log").unlink()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["plot", str(runs["two"]), "--out-dir", str(blocker)]) == 2
    line = error_line(capsys)
    assert f"cannot create {blocker}: {blocker} is a file, not a folder" in line


def test_report_with_a_folder_as_metrics(two: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (two / "metrics.jsonl").unlink()
    (two / "metrics.jsonl").mkdir()
    assert main(["report", str(two)]) == 1
    line = error_line(capsys)
    assert f"{two / 'metrics.jsonl'} is a folder where a file is needed" in line
    assert "Traceback" in (two / "error.log").read_text()


# --------------------------------------------------------------------------------------
# Options and config files
# --------------------------------------------------------------------------------------


def test_duplicate_spellings_of_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "exp.toml"
    config.write_text("num-clients = 4\nrounds = 1\nnum_clients = 5\n")
    assert run("--config", str(config), "--output-dir", str(tmp_path / "out")) == 2
    line = error_line(capsys)
    assert "'num-clients' and 'num_clients' both set num_clients" in line
    assert str(config) in line
    with pytest.raises(ConfigError, match="'client_timeout' and 'client-timeout'"):
        check_keys({"client_timeout": 1, "client-timeout": 2}, "layer")


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--output-dir", ""],
        ["run", "--resume", ""],
        ["run", "--config", " "],
        ["plot", ""],
        ["report", ""],
    ],
)
def test_empty_paths_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "expected a path, got an empty string" in error_line(capsys)


def test_empty_output_dir_in_a_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "exp.toml"
    config.write_text('output_dir = ""\n')
    assert run("--config", str(config)) == 2
    assert "output_dir must name a folder" in error_line(capsys)


# --------------------------------------------------------------------------------------
# Resume: changes that would change the bits, bad checkpoint rounds
# --------------------------------------------------------------------------------------


def test_resume_refuses_a_switch_to_vectorized(
    two: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = final_bytes(two)
    assert main(["run", "--resume", str(two), "--rounds", "3", "--mode", "vectorized"]) == 2
    line = error_line(capsys)
    assert "--mode vectorized cannot resume" in line
    assert "written in serial mode" in line and "float rounding" in line
    assert "resume with --mode serial, thread or process" in line
    assert final_bytes(two) == before


def test_resume_refuses_a_switch_from_vectorized(
    two: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A vectorized run (its checkpoint and config say so) cannot go on in thread mode, nor
    in vectorized mode with another chunk size."""
    state_path = two / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    state["config"] = {**state["config"], "mode": "vectorized", "chunk_size": 3}
    state_path.write_text(json.dumps(state))
    config = two / "config.toml"
    config.write_text(config.read_text().replace('mode = "serial"', 'mode = "vectorized"'))
    config.write_text(config.read_text() + "chunk_size = 3\n")
    assert main(["run", "--resume", str(two), "--mode", "thread"]) == 2
    assert "resume with --mode vectorized" in error_line(capsys)
    assert main(["run", "--resume", str(two), "--chunk-size", "2"]) == 2
    assert "resume with --chunk-size 3" in error_line(capsys)


def test_resume_may_switch_between_bitwise_equal_modes(runs: dict[str, Path], two: Path) -> None:
    argv = ["run", "--resume", str(two), "--rounds", "3", "--mode", "thread"]
    assert main([*argv, "--parallelism", "2", "--quiet"]) == 0
    assert final_bytes(two) == final_bytes(runs["three"])
    assert tomllib.loads((two / "config.toml").read_text())["mode"] == "thread"


def _edit_state(run_dir: Path, **changes: Any) -> None:
    path = run_dir / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    state.update(changes)
    path.write_text(json.dumps(state))


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"round": "2"}, "its round must be an integer >= 0, got '2' (str)"),
        ({"round": True}, "got True (bool)"),
        ({"round": 2.0}, "got 2.0 (float)"),
        ({"round": -1}, "got -1 (int)"),
        ({"round": 3}, "round 3, but its metrics hold rounds [1, 2]"),
        ("one-row", "was written for round 2, but state.json says round 1"),
    ],
)
def test_resume_rejects_a_bad_checkpoint_round(
    changes: Any, fragment: str, two: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if changes == "one-row":  # round and metrics agree, the model file does not
        state = json.loads((two / "checkpoint" / "state.json").read_text())
        changes = {"round": 1, "metrics": state["metrics"][:1]}
    _edit_state(two, **changes)
    assert main(["run", "--resume", str(two), "--rounds", "3"]) == 1
    line = error_line(capsys)
    assert "is corrupt" in line and fragment in line
    assert "resume with" not in line  # the checkpoint itself is the problem
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(two)


# --------------------------------------------------------------------------------------
# File modes
# --------------------------------------------------------------------------------------


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    mask: int = request.param
    old = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(old)


@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True)
def test_every_file_gets_the_umask_mode(
    umask: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert run("--output-dir", str(run_dir), *TINY, "--rounds", "1") == 0
    (run_dir / "loss.png").mkdir()  # so that plot fails and writes error.log
    assert main(["plot", str(run_dir)]) == 1
    capsys.readouterr()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    names = {p.relative_to(run_dir).as_posix() for p in files}
    for name in (
        "config.toml", "partition.csv", "partition.png", "metrics.jsonl", "metrics.csv",
        "final_model.safetensors", "checkpoint/state.json",
        "checkpoint/model-round-000001.safetensors", "accuracy.png", "error.log",
    ):  # fmt: skip
        assert name in names, name
    modes = {p.relative_to(run_dir).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert modes == dict.fromkeys(names, 0o666 & ~umask)


# --------------------------------------------------------------------------------------
# --client-timeout
# --------------------------------------------------------------------------------------


def test_client_timeout_reaches_the_executor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Any] = []
    real = run_module.make_executor

    def spy(mode: str, setup: Any, **options: Any) -> Any:
        seen.append(options.get("client_timeout", "missing"))
        return real(mode, setup, **options)

    monkeypatch.setattr(run_module, "make_executor", spy)
    run_dir = tmp_path / "run"
    assert run("--output-dir", str(run_dir), *TINY[:-1], "--rounds", "1") == 0
    assert "client timeout 600 s" in capsys.readouterr().out
    assert tomllib.loads((run_dir / "config.toml").read_text())["client_timeout"] == 600.0
    assert main(["run", "--resume", str(run_dir), "--client-timeout", "off", "--rounds", "2"]) == 0
    assert "no client timeout" in capsys.readouterr().out
    assert tomllib.loads((run_dir / "config.toml").read_text())["client_timeout"] == 0.0
    config = tmp_path / "exp.toml"
    config.write_text('client-timeout = "off"\n')
    assert (
        run("--config", str(config), "--output-dir", str(tmp_path / "b"), *TINY, "--rounds", "1")
        == 0
    )
    assert seen == [600.0, None, None]
    assert merge_config(RunConfig(), {"client_timeout": 90}).timeout_seconds() == 90.0


@pytest.mark.parametrize("value", ["-1", "soon", "inf", "nan"])
def test_bad_client_timeout(value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("--output-dir", str(tmp_path / "out"), "--client-timeout", value) == 2
    assert "client_timeout must be a number of seconds >= 0" in error_line(capsys)


def test_a_client_over_its_time_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    assert (
        run("--output-dir", str(run_dir), *TINY, "--rounds", "2", "--client-timeout", "0.001") == 1
    )
    line = error_line(capsys)
    assert line.startswith("emberfl: error: client ")
    assert "(client_timeout=0.001 s)" in line
    assert f"emberfl run --resume {run_dir} starts the run again from round 0" in line
    assert line.endswith(f"details in {run_dir / 'error.log'}")
    assert "ClientTimeoutError" in (run_dir / "error.log").read_text()


# --------------------------------------------------------------------------------------
# Failing clients and Ctrl-C
# --------------------------------------------------------------------------------------


def _fail_in_round(monkeypatch: pytest.MonkeyPatch, n: int, exc: BaseException) -> None:
    real = Simulation.run_round
    calls = {"n": 0}

    def run_round(self: Simulation, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Simulation, "run_round", run_round)


def test_a_failing_client_prints_its_summary(
    runs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    error = ClientError(2, "ValueError: boom\nsecond line", "Traceback (worker):\n  ...\n")
    _fail_in_round(monkeypatch, 2, error)
    run_dir = tmp_path / "run"
    assert run("--output-dir", str(run_dir), *TINY, "--rounds", "3") == 1
    line = error_line(capsys)
    assert line.startswith("emberfl: error: client 2: ValueError: boom; the checkpoint in ")
    assert f"holds round 1 (resume with: emberfl run --resume {run_dir})" in line
    log = (run_dir / "error.log").read_text()
    assert "second line" in log and "worker traceback" in log
    monkeypatch.undo()
    assert run("--resume", str(run_dir), "--quiet") == 0
    assert final_bytes(run_dir) == final_bytes(runs["three"])


@pytest.mark.parametrize("message", ["clients 3, 5 were still training", ""])
def test_ctrl_c(
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _fail_in_round(monkeypatch, 2, KeyboardInterrupt(message) if message else KeyboardInterrupt())
    run_dir = tmp_path / "run"
    assert run("--output-dir", str(run_dir), *TINY, "--rounds", "3") == 130
    said = f"emberfl: interrupted: {message}" if message else "emberfl: interrupted"
    assert capsys.readouterr().err == (
        f"{said}; the checkpoint in {run_dir / 'checkpoint'} holds round 1 (resume with: "
        f"emberfl run --resume {run_dir})\n"
    )
    assert not (run_dir / "error.log").exists()
    kept = load_checkpoint(run_dir)
    assert kept is not None and kept.round == 1


def test_ctrl_c_before_the_run_dir_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "_load_data", interrupted)
    assert run("--output-dir", str(tmp_path / "run"), *TINY) == 130
    assert capsys.readouterr().err == "emberfl: interrupted\n"

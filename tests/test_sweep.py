"""``emberfl sweep`` and ``emberfl compare``: a 2-algorithm x 3-seed sweep on digits is
killed mid-way, resumes to the bits of uninterrupted runs, and compare's numbers are the
runs' own metrics recomputed with numpy; the options' parsing and its errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from emberfl.cli import main
from emberfl.cli.checkpoint import load_checkpoint
from emberfl.cli.sweep import compare, parse_grid, parse_seeds
from emberfl.errors import ConfigError

BASE = ["--rounds", "4", "--num-clients", "4", "--epochs", "1", "--checkpoint-every", "1"]


def _final_acc(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [float(r["test_accuracy"]) for r in rows]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_a_killed_sweep_resumes_and_compare_reports_the_runs_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep_dir = tmp_path / "sweep"
    argv = ["sweep", *BASE, "--seeds", "0-2", "--grid", "algorithm=fedavg,fedprox",
            "--output-dir", str(sweep_dir)]  # fmt: skip
    first, second = sweep_dir / "algorithm=fedavg,seed=0", sweep_dir / "algorithm=fedavg,seed=1"
    command = [sys.executable, "-m", "emberfl", *argv]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    ckpt = load_checkpoint(second)
                except Exception:  # not written yet, or being written
                    ckpt = None
                if ckpt is not None and ckpt.round >= 1:
                    break
                assert proc.poll() is None, "the sweep ended before it could be killed"
                assert time.monotonic() < deadline, "no checkpoint of the second point"
                time.sleep(0.01)
            points = _children(proc.pid)
            proc.send_signal(signal.SIGKILL)  # the sweep itself; its point stops with it
            proc.wait(30)
        finally:
            proc.kill()
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in points):
        assert time.monotonic() < deadline, "a point outlived its sweep"
        time.sleep(0.05)
    assert (first / "final_model.safetensors").exists()
    assert not (second / "final_model.safetensors").exists()
    done_bytes = (first / "final_model.safetensors").read_bytes()
    done_mtime = (first / "final_model.safetensors").stat().st_mtime_ns

    assert main(["sweep", "--resume", str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert "[1/6] algorithm=fedavg,seed=0: already done" in out
    assert (first / "final_model.safetensors").stat().st_mtime_ns == done_mtime
    assert (first / "final_model.safetensors").read_bytes() == done_bytes
    # The resumed point has the bits of the same run never interrupted.
    alone = tmp_path / "alone"
    argv = ["run", *BASE, "--seed", "1", "--algorithm", "fedavg", "--quiet",
            "--output-dir", str(alone)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert (second / "final_model.safetensors").read_bytes() == (
        alone / "final_model.safetensors"
    ).read_bytes()

    groups = compare([sweep_dir])
    assert [g.label for g in groups] == ["algorithm=fedavg", "algorithm=fedprox"]
    with (sweep_dir / "compare.csv").open() as f:
        table = list(csv.DictReader(f))
    for group, row in zip(groups, table, strict=True):
        algorithm = group.label.split("=")[1]
        runs = [sweep_dir / f"algorithm={algorithm},seed={s}" for s in range(3)]
        assert sorted(group.runs) == sorted(runs) and sorted(group.seeds) == [0, 1, 2]
        finals = np.array([_final_acc(r)[-1] for r in runs]) * 100
        bests = np.array([max(_final_acc(r)) for r in runs]) * 100
        assert row["seeds"] == "3" and row["rounds"] == "4"
        assert row["final_accuracy_%"] == f"{finals.mean():.2f} +- {finals.std(ddof=1):.2f}"
        assert row["best_accuracy_%"] == f"{bests.mean():.2f} +- {bests.std(ddof=1):.2f}"
    png = (sweep_dir / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    # compare on the command line, with a target, over runs and sweeps alike.
    assert main(["compare", str(sweep_dir), str(alone), "--target", "0.2",
                 "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "rounds_to_20%" in text and "algorithm=fedprox" in text
    assert (tmp_path / "compare.csv").exists()


def test_a_sweep_table_in_the_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "sweep.toml"
    config.write_text(
        "rounds = 1\nnum_clients = 3\nepochs = 1\n[sweep]\nseeds = [4, 5]\n"
        "[sweep.grid]\nlr = [0.05, 0.1]\n"
    )
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(config), "--output-dir", str(out), "--jobs", "2"]) == 0
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["lr=0.05,seed=4", "lr=0.05,seed=5", "lr=0.1,seed=4", "lr=0.1,seed=5"]
    for name in names:
        assert (out / name / "final_model.safetensors").exists()
        assert f"seed = {name[-1]}" in (out / name / "config.toml").read_text()
    capsys.readouterr()
    # `emberfl run` refuses the file rather than run one of its points.
    assert main(["run", "--config", str(config), "--output-dir", str(tmp_path / "r")]) == 2
    assert "emberfl sweep --config" in capsys.readouterr().err
    # The same directory with another sweep is refused; nothing runs.
    other = ["sweep", "--config", str(config), "--output-dir", str(out), "--grid", "epochs=2"]
    assert main(other) == 2
    assert "holds another sweep" in capsys.readouterr().err


def test_seeds_and_grid_parse_or_say_why() -> None:
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("3") == [3]
    assert parse_seeds("0,2,7,2,5-6") == [0, 2, 7, 5, 6]
    for bad in ("", "a", "4-1", "-1", "1-2-3"):
        with pytest.raises(ConfigError, match="seeds"):
            parse_seeds(bad)
    types = {"algorithm": str, "lr": float, "num_clients": int}
    grid = parse_grid(["algorithm=fedavg,fedprox", "lr=0.05,0.1,0.05"], types)
    assert grid == {"algorithm": ["fedavg", "fedprox"], "lr": [0.05, 0.1]}
    assert parse_grid(["num-clients=2,3"], types) == {"num_clients": [2, 3]}
    for items, message in (
        (["lr"], "KEY=VALUE"),
        (["seed=1,2"], "use --seeds"),
        (["bogus=1"], "not an option"),
        (["lr=abc"], "not a value"),
        (["lr=1", "lr=2"], "given twice"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_grid(items, types)


def test_an_invalid_point_is_a_usage_error_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["sweep", "--rounds", "1", "--grid", "lr=0.1,-1", "--output-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "lr" in err, err
    assert not out.exists()

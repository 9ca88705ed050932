"""`emberfl run --dp local`: record-level DP-SGD from the command line.

Each round logs the worst-off client's epsilon, which the test recomputes from the
partition's client sizes and the accountant; a resumed run ends with an uninterrupted
run's bytes and epsilons; what cannot be made private is a one-line usage error.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from emberfl.cli import main
from emberfl.cli.checkpoint import load_checkpoint
from emberfl.privacy import epsilon

TINY = ["--num-clients", "5", "--epochs", "2", "--batch-size", "16", "--train-size", "300",
        "--quiet"]  # fmt: skip
DP = ["--dp", "local", "--dp-noise-multiplier", "1.2", "--dp-clip-norm", "1.5",
      "--dp-delta", "1e-4"]  # fmt: skip


def run(*args: str) -> int:
    return main(["run", *args])


def rows_of(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_epsilon_is_the_worst_off_clients_and_resume_is_bitwise(tmp_path: Path) -> None:
    options = [*DP, *TINY, "--checkpoint-every", "1"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run("--rounds", "3", "--output-dir", str(whole), *options) == 0
    with (whole / "partition.csv").open() as f:
        sizes = [int(row["total"]) for row in csv.DictReader(f)]
    rows = rows_of(whole)
    for r in rows:  # every client trains every round: 2 epochs of ceil(n / 16) steps
        done = int(r["round"])  # type: ignore[call-overload]
        spent = [(min(1.0, 16 / n), done * 2 * math.ceil(n / 16)) for n in sizes]
        expected = max(epsilon(1.2, q, t, 1e-4) for q, t in spent)
        assert r["dp_epsilon"] == pytest.approx(expected, rel=1e-12)
    eps = [float(r["dp_epsilon"]) for r in rows]  # type: ignore[arg-type]
    assert eps == sorted(eps) and eps[0] > 0
    assert run("--rounds", "2", "--output-dir", str(part), *options) == 0
    checkpoint = load_checkpoint(part)
    assert checkpoint is not None and checkpoint.tensors["dp/steps"].tolist() == [
        2 * 2 * math.ceil(n / 16) for n in sizes
    ]
    assert run("--resume", str(part), "--rounds", "3", "--mode", "thread", "--quiet") == 0
    assert (part / "final_model.safetensors").read_bytes() == (
        whole / "final_model.safetensors"
    ).read_bytes()
    assert [r["dp_epsilon"] for r in rows_of(part)] == eps


def test_dp_sgd_changes_the_model(tmp_path: Path) -> None:
    common = ["--rounds", "3", "--lr", "0.5", *TINY]
    assert run("--output-dir", str(tmp_path / "plain"), *common) == 0
    assert run("--output-dir", str(tmp_path / "dp"), *DP, *common) == 0
    plain = (tmp_path / "plain" / "final_model.safetensors").read_bytes()
    assert (tmp_path / "dp" / "final_model.safetensors").read_bytes() != plain
    config = (tmp_path / "dp" / "config.toml").read_text()
    assert 'dp = "local"' in config and "dp_noise_multiplier = 1.2" in config


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dp-adaptive-clip-quantile", "0.5"], "is an option of dp 'central'"),
        (["--algorithm", "qffl"], "QFFL cannot train with local DP-SGD"),
        (["--client-selection", "power-of-choice"], "power-of-choice selection sends"),
        (["--dp-noise-multiplier", "0"], "dp_noise_multiplier must be a positive number"),
        (
            ["--dataset", "synthetic-cifar10", "--model", "resnet18"],
            "bn1 is a BatchNorm layer",
        ),
    ],
)
def test_what_cannot_be_private_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert run("--dp", "local", *argv, "--output-dir", str(tmp_path / "run"), *TINY) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("emberfl: error: "), err
    assert message in err, err
    assert not (tmp_path / "run").exists()

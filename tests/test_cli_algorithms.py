"""`emberfl run --algorithm X` for every algorithm: options, errors, checkpoints.

Each algorithm runs with its defaults and writes the usual run directory; its own options
reach the algorithm object; an option of another algorithm is an error that names who
owns it; a run stopped after round 2 and resumed ends with the bytes of an uninterrupted
3-round run, server and client state included.
"""

from __future__ import annotations

import contextlib
import io
import json
import tomllib
from pathlib import Path

import pytest

from emberfl.algorithms import (
    ALGORITHMS,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedDyn,
    FedNova,
    FedProx,
)
from emberfl.cli import main
from emberfl.cli.config import ALGORITHM_OPTIONS, RunConfig, build_algorithm
from fl_testkit import sigkill_after_checkpoint

TINY = [
    "--num-clients", "4", "--epochs", "1", "--batch-size", "16", "--train-size", "300",
    "--quiet",
]  # fmt: skip


def run(*args: str) -> int:
    return main(["run", *args])


def test_every_algorithm_has_a_cli_entry_and_documented_options() -> None:
    assert set(ALGORITHM_OPTIONS) == set(ALGORITHMS) | {"fedasync", "fedbuff"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", "--help"]) == 0
    help_text = out.getvalue()
    for name in ALGORITHMS:
        assert name in help_text
    for key in {k for keys in ALGORITHM_OPTIONS.values() for k in keys} | {
        "momentum",
        "weight_decay",
        "optimizer",
        "adam_betas",
        "adam_eps",
        "stragglers",
    }:
        assert "--" + key.replace("_", "-") in help_text, key


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_each_algorithm_runs_with_its_defaults(tmp_path: Path, name: str) -> None:
    run_dir = tmp_path / "run"
    assert run("--algorithm", name, "--rounds", "2", "--output-dir", str(run_dir), *TINY) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    assert (run_dir / "final_model.safetensors").is_file()
    saved = tomllib.loads((run_dir / "config.toml").read_text())
    assert saved["algorithm"] == name


def test_options_reach_the_algorithm() -> None:
    def build(**values: object) -> object:
        config = RunConfig(**values)  # type: ignore[arg-type]
        config.validate()
        return build_algorithm(config)

    fedavgm = build(algorithm="fedavgm", server_momentum=0.5, server_lr=0.7, momentum=0.9)
    assert isinstance(fedavgm, FedAvgM)
    assert (fedavgm.server_momentum, fedavgm.server_lr, fedavgm.momentum) == (0.5, 0.7, 0.9)
    fedadam = build(algorithm="fedadam", server_betas=[0.8, 0.95], server_tau=1e-2)
    assert isinstance(fedadam, FedAdam)
    assert (fedadam.beta1, fedadam.beta2, fedadam.tau, fedadam.server_lr) == (0.8, 0.95, 1e-2, 0.1)
    adagrad = build(algorithm="fedadagrad", server_betas=[0.5])
    assert isinstance(adagrad, FedAdagrad) and adagrad.beta1 == 0.5
    prox = build(algorithm="fedprox", prox_mu=0.3, weight_decay=1e-4)
    assert isinstance(prox, FedProx) and (prox.mu, prox.weight_decay) == (0.3, 1e-4)
    dyn = build(algorithm="feddyn", feddyn_alpha=0.2)
    assert isinstance(dyn, FedDyn) and dyn.alpha == 0.2
    adam = build(optimizer="adam", adam_betas=[0.8, 0.95], adam_eps=1e-6, lr=0.01)
    assert isinstance(adam, FedAvg)
    assert (adam.adam_betas, adam.adam_eps) == ((0.8, 0.95), 1e-6)
    slow = build(algorithm="fednova", stragglers=0.9, epochs=4)
    assert isinstance(slow, FedNova) and (slow.stragglers, slow.epochs) == (0.9, 4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--prox-mu", "0.1"],
            "algorithm 'fedavg' does not use prox_mu (set to 0.1); it is an option of fedprox",
        ),
        (
            ["--algorithm", "feddyn", "--server-lr", "0.5"],
            "algorithm 'feddyn' does not use server_lr",
        ),
        (
            ["--algorithm", "fedadam", "--server-momentum", "0.9"],
            "it is an option of fedavgm",
        ),
        (
            ["--algorithm", "fedadagrad", "--server-betas", "0.9,0.99"],
            "server_betas for fedadagrad is [beta1]",
        ),
        (["--algorithm", "fedyogi", "--server-betas", "0.9"], "server_betas for fedyogi is"),
        (["--algorithm", "fedprox", "--prox-mu", "-1"], "prox_mu must be >= 0, got -1.0"),
        (["--algorithm", "feddyn", "--feddyn-alpha", "0"], "feddyn_alpha must be > 0"),
        (["--algorithm", "fedavgm", "--server-momentum", "1"], "server_momentum must be < 1"),
        (["--algorithm", "fedadam", "--server-betas", "0.9,1.5"], "server_betas' beta2 must"),
        (["--momentum", "-0.5"], "momentum must be >= 0"),
        (["--algorithm", "scaffold", "--optimizer", "adam"], "its equations assume SGD steps"),
        (["--optimizer", "adam", "--momentum", "0.9"], "momentum is SGD's"),
        (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
        (["--server-betas", "a,b"], "is not one or two comma-separated numbers"),
        (["--adam-eps", "1e-6"], "adam_eps (set to 1e-06) is an option of optimizer 'adam'"),
        (["--adam-betas", "0.8,0.9"], "is an option of optimizer 'adam', not 'sgd'"),
        (["--optimizer", "adam", "--adam-betas", "0.8"], "adam_betas must be two numbers"),
        (["--optimizer", "adam", "--adam-betas", "0.8,1"], "adam_betas must be two numbers in"),
        (["--stragglers", "1.5"], "stragglers must be a fraction in [0, 1], got 1.5"),
        (["--drop-stragglers"], "drop_stragglers needs stragglers > 0"),
    ],
)
def test_options_of_other_algorithms_and_bad_values_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert run(*argv, "--output-dir", str(tmp_path / "run"), *TINY) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("emberfl: error: "), err
    assert message in err, err
    assert not (tmp_path / "run").exists()  # found before anything was written


def test_a_toml_config_sets_algorithm_options(tmp_path: Path) -> None:
    config = tmp_path / "exp.toml"
    config.write_text('algorithm = "fedadam"\nserver-betas = [0.8, 0.9]\nserver-lr = 0.05\n')
    run_dir = tmp_path / "run"
    assert run("--config", str(config), "--rounds", "1", "--output-dir", str(run_dir), *TINY) == 0
    saved = tomllib.loads((run_dir / "config.toml").read_text())
    assert saved["server_betas"] == [0.8, 0.9] and saved["server_lr"] == 0.05
    bad = tmp_path / "bad.toml"
    bad.write_text('algorithm = "fedadam"\nserver-betas = "0.9"\n')
    assert run("--config", str(bad), "--output-dir", str(tmp_path / "bad"), *TINY) == 2


STATEFUL = {"fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "feddyn", "ditto", "ifca"}
"""Algorithms with server or client state (FedBN's is its BatchNorm: none on the MLP)."""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_resume_gives_an_uninterrupted_runs_bytes(tmp_path: Path, name: str) -> None:
    options = ["--algorithm", name, "--checkpoint-every", "1", "--sample-ratio", "0.5", *TINY]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run("--rounds", "3", "--output-dir", str(whole), *options) == 0
    assert run("--rounds", "2", "--output-dir", str(part), *options) == 0
    state = json.loads((part / "checkpoint" / "state.json").read_text())
    assert state["round"] == 2
    assert run("--resume", str(part), "--rounds", "3", "--quiet") == 0
    whole_model = (whole / "final_model.safetensors").read_bytes()
    assert (part / "final_model.safetensors").read_bytes() == whole_model
    # The checkpointed server and client state match too, not only the model.
    whole_state = sorted((whole / "checkpoint").glob("state-round-*.safetensors"))
    part_state = sorted((part / "checkpoint").glob("state-round-*.safetensors"))
    assert [p.name for p in whole_state] == [p.name for p in part_state]
    if name in STATEFUL:
        assert whole_state, "a stateful algorithm checkpoints its state"
        assert whole_state[-1].read_bytes() == part_state[-1].read_bytes()


def test_adam_runs_from_the_cli(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = ["--optimizer", "adam", "--lr", "0.01", "--rounds", "2", "--output-dir", str(run_dir)]
    assert run(*argv, *TINY) == 0
    assert tomllib.loads((run_dir / "config.toml").read_text())["optimizer"] == "adam"
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["test_accuracy"] > 0.3  # it learns (10 classes)


def test_stragglers_change_the_run_and_are_recorded(tmp_path: Path) -> None:
    base = [*TINY, "--algorithm", "fedprox", "--epochs", "3", "--rounds", "2"]
    assert run(*base, "--output-dir", str(tmp_path / "all")) == 0
    assert run(*base, "--stragglers", "0.9", "--output-dir", str(tmp_path / "slow")) == 0
    saved = tomllib.loads((tmp_path / "slow" / "config.toml").read_text())
    assert saved["stragglers"] == 0.9
    full = (tmp_path / "all" / "final_model.safetensors").read_bytes()
    assert (tmp_path / "slow" / "final_model.safetensors").read_bytes() != full
    drop = ["--stragglers", "0.9", "--drop-stragglers", "--output-dir", str(tmp_path / "drop")]
    assert run(*base, *drop) == 0
    rows = [
        json.loads(line) for line in (tmp_path / "drop" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in rows] == [1, 2]
    assert min(r["num_clients"] for r in rows) < 4  # stragglers were left out
    assert tomllib.loads((tmp_path / "drop" / "config.toml").read_text())["drop_stragglers"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["scaffold", "feddyn", "fedadam", "ditto", "ifca"])
def test_sigkill_then_resume_gives_an_uninterrupted_runs_bytes(tmp_path: Path, name: str) -> None:
    """Server and client state survive a SIGKILL of a process-mode run between checkpoints."""
    options = [
        "--algorithm", name, "--rounds", "30", "--checkpoint-every", "1", "--sample-ratio",
        "0.5", *TINY,
    ]  # fmt: skip
    whole = tmp_path / "whole"
    assert run("--output-dir", str(whole), *options, "--mode", "serial") == 0
    run_dir = tmp_path / "killed"
    argv = [*options, "--mode", "process", "--parallelism", "2"]
    assert 2 <= sigkill_after_checkpoint(argv, run_dir) < 30
    assert run("--resume", str(run_dir), "--quiet") == 0
    final = (run_dir / "final_model.safetensors").read_bytes()
    assert final == (whole / "final_model.safetensors").read_bytes()

"""Client selection: uniform, proportional to data size, power-of-choice."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from emberfl.algorithms import FedAvg
from emberfl.cli import main
from emberfl.errors import ConfigError, NonFiniteError
from emberfl.executors import ClientSetup, make_executor
from emberfl.selection import power_of_choice, select_by_size, select_uniform
from emberfl.simulation import Simulation, sample_clients
from fl_testkit import LazyData, linear_model


def test_uniform_is_the_simulations_historical_sampler() -> None:
    for round_ in range(5):
        assert select_uniform(7, round_, 20, 6) == sample_clients(7, round_, 20, 6)
    picks = [select_uniform(7, r, 20, 6) for r in range(50)]
    assert all(len(set(p)) == 6 and p == sorted(p) for p in picks)
    assert len({tuple(p) for p in picks}) > 40  # rounds draw afresh


def test_size_selection_frequencies_follow_the_sizes() -> None:
    sizes = [1, 2, 3, 4, 0, 10]
    rounds = 6000
    counts = Counter(c for r in range(rounds) for c in select_by_size(3, r, sizes, 1))
    total = sum(sizes)
    for cid, n in enumerate(sizes):
        assert abs(counts[cid] / rounds - n / total) < 0.02, (cid, counts[cid])
    assert counts[4] == 0  # no data: never drawn while others remain


def test_size_selection_without_replacement() -> None:
    sizes = [5, 0, 5, 0, 5]
    for r in range(20):
        picked = select_by_size(1, r, sizes, 4)
        assert len(set(picked)) == 4 and picked == sorted(picked)
        assert {0, 2, 4} <= set(picked)  # the empty clients come last
    assert select_by_size(1, 0, sizes, 3) == [0, 2, 4]
    with pytest.raises(ConfigError, match="cannot select 6 of 5"):
        select_by_size(1, 0, sizes, 6)


def test_power_of_choice_keeps_the_highest_losses() -> None:
    sizes = [3] * 10
    losses = {c: float((c * 7) % 10) for c in range(10)}
    for r in range(10):
        pool = select_by_size(2, r, sizes, 6)
        got = power_of_choice(2, r, sizes, 3, 6, losses.__getitem__)
        assert got == sorted(sorted(pool, key=lambda c: (-losses[c], c))[:3])
    # With every client a candidate the draw does not matter; ties go to the lower id.
    tied = {c: float(c // 2) for c in range(10)}
    assert power_of_choice(2, 0, sizes, 3, 10, tied.__getitem__) == [6, 8, 9]
    assert power_of_choice(2, 0, sizes, 2, 10, lambda c: 1.0) == [0, 1]
    with pytest.raises(ConfigError, match="count <= candidates <= clients"):
        power_of_choice(2, 0, sizes, 3, 2, tied.__getitem__)
    with pytest.raises(NonFiniteError, match=r"not finite on clients \[4\]"):
        power_of_choice(2, 0, sizes, 3, 10, lambda c: float("nan") if c == 4 else 0.0)


def _reference_losses(model_flat: torch.Tensor, num_clients: int) -> dict[int, float]:
    """Mean cross-entropy of the global model on each client's data, in plain PyTorch."""
    model = linear_model()
    start = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(model_flat[start : start + p.numel()].view_as(p))
            start += p.numel()
    data = LazyData(num_clients)
    out = {}
    with torch.no_grad():
        for cid in range(num_clients):
            x, y = data.get_dataset("train", cid).tensors
            out[cid] = float(F.cross_entropy(model(x).double(), y))
    return out


@pytest.mark.parametrize("mode", ["serial", "process"])
def test_simulation_power_of_choice_picks_the_clients_the_model_fits_worst(mode: str) -> None:
    n = 10
    setup = ClientSetup(LazyData(n), linear_model(), batch_size=3, seed=4)
    executor = make_executor(mode, setup, parallelism=2)
    with Simulation(
        FedAvg(lr=0.1),
        executor,
        num_clients=n,
        clients_per_round=3,
        selection="power-of-choice",
        poc_candidates=n,
    ) as sim:
        for _ in range(3):
            losses = _reference_losses(sim.state.model, n)
            expected = sorted(sorted(range(n), key=lambda c: (-losses[c], c))[:3])
            assert sim.sample_clients() == expected
            sim.run_round()


def test_simulation_rejects_bad_selection_options() -> None:
    setup = ClientSetup(LazyData(4), linear_model(), batch_size=3, seed=4)
    executor = make_executor("serial", setup)
    with pytest.raises(ConfigError, match="unknown client selection 'best'"):
        Simulation(FedAvg(lr=0.1), executor, num_clients=4, selection="best")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="poc_candidates is power-of-choice's option"):
        Simulation(FedAvg(lr=0.1), executor, num_clients=4, poc_candidates=3)
    with pytest.raises(ConfigError, match=r"poc_candidates must be an integer in 2\.\.4"):
        Simulation(
            FedAvg(lr=0.1),
            executor,
            num_clients=4,
            clients_per_round=2,
            selection="power-of-choice",
            poc_candidates=5,
        )


TINY = [
    "--num-clients", "6", "--epochs", "1", "--batch-size", "16", "--train-size", "300",
    "--sample-ratio", "0.5", "--checkpoint-every", "1", "--quiet",
]  # fmt: skip


@pytest.mark.parametrize("rule", ["size", "power-of-choice"])
def test_cli_selection_resumes_to_the_same_bytes(tmp_path: Path, rule: str) -> None:
    options = ["--client-selection", rule, *TINY]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["run", "--rounds", "3", "--output-dir", str(whole), *options]) == 0
    assert main(["run", "--rounds", "2", "--output-dir", str(part), *options]) == 0
    assert main(["run", "--resume", str(part), "--rounds", "3", "--quiet"]) == 0
    model = (whole / "final_model.safetensors").read_bytes()
    assert (part / "final_model.safetensors").read_bytes() == model
    uniform = tmp_path / "uniform"
    assert main(["run", "--rounds", "3", "--output-dir", str(uniform), *TINY]) == 0
    assert (uniform / "final_model.safetensors").read_bytes() != model


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--poc-candidates", "4"], "is an option of client_selection 'power-of-choice'"),
        (
            ["--client-selection", "power-of-choice", "--poc-candidates", "2"],
            "poc_candidates must be in 3..6",
        ),
        (["--client-selection", "best"], "invalid choice: 'best'"),
    ],
)
def test_cli_selection_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["run", *argv, "--output-dir", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err


def test_cli_saves_the_rule(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = ["--client-selection", "size", "--rounds", "1", "--output-dir", str(run_dir), *TINY]
    assert main(["run", *argv]) == 0
    text = (run_dir / "config.toml").read_text()
    assert 'client_selection = "size"' in text
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[0])["num_clients"] == 3

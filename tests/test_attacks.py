"""Simulated Byzantine clients: who they are, what they send, and the same bits everywhere.

The malicious set against numpy's Philox permutation; each update attack against its
definition on a round recomputed with plain FedAvg; label flipping changes only the
malicious clients' training labels; an attacked run with a robust aggregator gives the
same bits in serial, thread and process mode at every parallelism (vectorized within
1e-5); the CLI options and their errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from emberfl.aggregation import Krum, Median
from emberfl.algorithms import FedAvg
from emberfl.attacks import Attack, flip_labels, malicious_clients
from emberfl.cli import main
from emberfl.data import load_dataset, partition
from emberfl.data.partitioned import TensorPartitionedDataset
from emberfl.errors import ConfigError
from emberfl.executors import ClientSetup, make_executor
from emberfl.rng import Purpose
from emberfl.simulation import Simulation
from fl_testkit import LazyData, linear_model

SEED = 5
N = 10


def test_the_malicious_set_is_a_seeded_permutations_head() -> None:
    bad = malicious_clients(SEED, 50, 0.2)
    ref = np.random.Generator(
        np.random.Philox(key=[SEED, int(Purpose.MALICIOUS)], counter=[0, 0, 0, 0])
    ).permutation(50)[:10]
    assert bad == frozenset(int(c) for c in ref)
    assert malicious_clients(SEED, 50, 0.2) == bad and malicious_clients(SEED + 1, 50, 0.2) != bad
    with pytest.raises(ConfigError, match="is no malicious client"):
        malicious_clients(SEED, 10, 0.01)
    with pytest.raises(ConfigError, match=r"malicious_fraction must be in \(0, 1\)"):
        malicious_clients(SEED, 10, 1.0)


def _round(attack: Attack | None, aggregator: object = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One FedAvg round on N clients; returns (x0, x1)."""
    setup = ClientSetup(LazyData(N), linear_model(), batch_size=4, seed=SEED)
    options = {} if aggregator is None else {"aggregator": aggregator}
    with Simulation(
        FedAvg(lr=0.1), make_executor("serial", setup), num_clients=N, attack=attack, **options
    ) as sim:  # type: ignore[arg-type]
        x0 = sim.state.model.clone()
        sim.run_round(list(range(N)))
        return x0, sim.state.model.clone()


def _honest_deltas() -> dict[int, torch.Tensor]:
    """Each client's honest update, one client at a time (FedAvg of one client)."""
    deltas = {}
    for cid in range(N):
        setup = ClientSetup(LazyData(N), linear_model(), batch_size=4, seed=SEED)
        with Simulation(FedAvg(lr=0.1), make_executor("serial", setup), num_clients=N) as sim:
            x0 = sim.state.model.clone()
            sim.run_round([cid])
            deltas[cid] = (sim.state.model - x0).double()
    return deltas


def _box_muller(g: np.random.Generator, n: int) -> np.ndarray:
    """emberfl's normals: Box-Muller on pairs of the stream's doubles."""
    u = g.random(2 * ((n + 1) // 2)).reshape(-1, 2)
    radius = np.sqrt(-2.0 * np.log(1.0 - u[:, 0]))
    angle = 2 * np.pi * u[:, 1]
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1).reshape(-1)[:n]


@pytest.mark.parametrize("kind", ["sign-flip", "scale", "gaussian"])
def test_each_update_attack_replaces_the_malicious_updates(kind: str) -> None:
    bad = malicious_clients(SEED, N, 0.3)
    factor = {"sign-flip": 3.0, "scale": -4.0}.get(kind)
    attack = Attack(kind, bad, seed=SEED, scale=factor, std=0.5)
    x0, x1 = _round(attack)
    deltas = _honest_deltas()
    sizes = {c: len(LazyData(N).get_dataset("train", c)) for c in range(N)}
    total = sum(sizes.values())
    expected = torch.zeros_like(x0, dtype=torch.float64)
    for cid, delta in deltas.items():
        if cid in bad:
            if kind == "sign-flip":
                delta = -3.0 * delta
            elif kind == "scale":
                delta = -4.0 * delta
            else:
                g = np.random.Generator(
                    np.random.Philox(key=[SEED, int(Purpose.ATTACK)], counter=[0, cid, 0, 0])
                )
                delta = torch.from_numpy(_box_muller(g, delta.numel())).float().double() * 0.5
        expected += sizes[cid] / total * delta
    got = (x1 - x0).double()
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_honest_clients_are_untouched_and_the_attack_moves_fedavg() -> None:
    bad = malicious_clients(SEED, N, 0.2)
    update = torch.arange(4.0)
    honest = next(c for c in range(N) if c not in bad)
    attack = Attack("sign-flip", bad, seed=SEED)
    assert attack.poison(honest, 0, update) is update
    assert torch.equal(attack.poison(min(bad), 0, update), -4.0 * update)  # the default scale
    with pytest.raises(ConfigError, match="sign-flip's attack_scale must be > 0"):
        Attack("sign-flip", bad, seed=SEED, scale=-1.0)
    _, clean = _round(None)
    _, attacked = _round(attack)
    assert not torch.equal(clean, attacked)


def test_label_flip_changes_only_the_malicious_clients_training_labels() -> None:
    data = load_dataset("digits", seed=0)
    parts = partition(data.train_y.numpy(), N, method="iid", seed=0)
    pdata = TensorPartitionedDataset(data, parts, client_test_fraction=0.2, seed=0)
    bad = malicious_clients(SEED, N, 0.3)

    def labels(split: str, cid: int | None) -> torch.Tensor:
        part = pdata.get_dataset(split, cid)  # type: ignore[arg-type]
        return part.__getitems__(list(range(len(part))))[1].clone()

    before = {c: labels("train", c) for c in range(N)}
    tests = {c: labels("test", c) for c in range(N)}
    flip_labels(pdata, bad, data.num_classes)
    for c in range(N):
        y = labels("train", c)
        expected = 9 - before[c] if c in bad else before[c]
        assert torch.equal(y, expected), c
        assert torch.equal(labels("test", c), tests[c])  # their own tests stay true
    assert torch.equal(labels("train", None), data.train_y)  # the server's view too


@pytest.mark.timeout(300)
@pytest.mark.parametrize("rule", ["krum", "median"])
def test_an_attacked_robust_run_has_the_same_bits_in_every_mode(rule: str) -> None:
    bad = malicious_clients(SEED, N, 0.2)

    def run(mode: str, p: int) -> torch.Tensor:
        setup = ClientSetup(LazyData(N), linear_model(), batch_size=4, seed=SEED)
        aggregator = Krum(2) if rule == "krum" else Median()
        attack = Attack("gaussian", bad, seed=SEED)
        with Simulation(
            FedAvg(lr=0.1, epochs=2),
            make_executor(mode, setup, parallelism=p),
            num_clients=N,
            clients_per_round=8,
            aggregator=aggregator,
            attack=attack,
        ) as sim:
            for _ in range(3):
                sim.run_round()
            return sim.state.model.clone()

    reference = run("serial", 1)
    for mode, p in [("thread", 2), ("thread", 4), ("process", 2), ("process", 4)]:
        assert torch.equal(run(mode, p), reference), (mode, p)
    vectorized = run("vectorized", 2)
    assert float((vectorized - reference).abs().max() / reference.abs().max()) <= 1e-5


TINY = ["--num-clients", "10", "--epochs", "1", "--batch-size", "16", "--train-size", "400",
        "--quiet"]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--attack", "sign-flip"], "needs malicious clients: set malicious_fraction"),
        (["--malicious-fraction", "0.2"], "malicious_fraction (set to 0.2) needs an attack"),
        (["--attack", "scale", "--malicious-fraction", "0.01"], "is no malicious client"),
        (["--attack", "scale", "--malicious-fraction", "1.5"], "must be in (0, 1)"),
        (["--aggregator", "krum", "--byzantine-f", "4"], "needs at least 2f + 3 = 11 clients"),
        (["--aggregator", "bulyan", "--byzantine-f", "2"], "needs at least 4f + 3 = 11 clients"),
        (["--byzantine-f", "1"], "byzantine_f (set to 1) is an option of aggregator"),
        (["--trim-ratio", "0.2"], "is an option of aggregator 'trimmed-mean', not 'mean'"),
        (["--aggregator", "trimmed-mean", "--trim-ratio", "0.5"], "trim_ratio must be in"),
        (["--aggregator", "clipped-mean"], "needs clip_norm (--clip-norm C)"),
        (["--aggregator", "clipped-mean", "--clip-norm", "0"], "clip_norm must be > 0"),
        (["--attack-scale", "3"], "is an option of attack 'sign-flip' or 'scale', not 'none'"),
        (["--attack", "gaussian", "--malicious-fraction", "0.2", "--attack-std", "-1"],
         "attack_std must be a positive number"),
        (["--aggregator", "nope"], "invalid choice: 'nope'"),
    ],
)  # fmt: skip
def test_bad_robustness_options_are_one_line_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["run", *argv, "--output-dir", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("emberfl: error: "), err
    assert message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "argv",
    [
        ["--aggregator", "median", "--attack", "sign-flip", "--malicious-fraction", "0.2"],
        ["--aggregator", "trimmed-mean", "--trim-ratio", "0.2"],
        ["--aggregator", "krum", "--attack", "gaussian", "--malicious-fraction", "0.2"],
        ["--aggregator", "multi-krum", "--attack", "label-flip", "--malicious-fraction", "0.3"],
        ["--aggregator", "bulyan", "--byzantine-f", "1", "--attack", "scale",
         "--malicious-fraction", "0.1", "--attack-scale", "5"],
        ["--aggregator", "geometric-median"],
        ["--aggregator", "clipped-mean", "--clip-norm", "0.5"],
    ],
)  # fmt: skip
def test_every_rule_and_attack_runs_from_the_cli_and_resumes(
    tmp_path: Path, argv: list[str]
) -> None:
    whole, part = tmp_path / "whole", tmp_path / "part"
    options = [*TINY, *argv, "--checkpoint-every", "1"]
    assert main(["run", *options, "--rounds", "3", "--output-dir", str(whole)]) == 0
    assert main(["run", *options, "--rounds", "2", "--output-dir", str(part)]) == 0
    assert main(["run", "--resume", str(part), "--rounds", "3", "--quiet"]) == 0
    model = (whole / "final_model.safetensors").read_bytes()
    assert (part / "final_model.safetensors").read_bytes() == model
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(0 <= r["test_accuracy"] <= 1 for r in rows)


def test_every_robustness_option_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--aggregator", "--trim-ratio", "--byzantine-f", "--clip-norm", "--attack",
                 "--malicious-fraction", "--attack-scale", "--attack-std"):  # fmt: skip
        assert flag in text, flag
    for name in ("geometric-median", "multi-krum", "label-flip", "sign-flip"):
        assert name in text, name

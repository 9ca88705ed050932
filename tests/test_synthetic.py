"""FedProx's Synthetic(alpha, beta) against its definition, and its natural partition.

Each client's labels are the argmax of its own linear model (recomputed here from the
client's stream); sizes are power-law with at least 50 samples; every client's labels are
concentrated, alpha leaves them unchanged (its mean shifts every class alike) and feature
shift grows with beta; ``--partition natural`` gives every client
exactly its own samples, the same bits in every mode; bad options are one-line errors.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from emberfl.cli import main
from emberfl.data import synthetic_fedprox
from emberfl.errors import ConfigError
from emberfl.rng import Purpose, stream


def _by_client(data: object) -> list[tuple[np.ndarray, np.ndarray]]:
    owner = data.train_owner.numpy()  # type: ignore[attr-defined]
    x, y = data.train_x.numpy(), data.train_y.numpy()  # type: ignore[attr-defined]
    return [(x[owner == k], y[owner == k]) for k in range(int(owner.max()) + 1)]


def test_labels_follow_each_clients_own_model() -> None:
    data = synthetic_fedprox(seed=3, num_clients=5, alpha=0.5, beta=0.5)
    for k, (x, y) in enumerate(_by_client(data)):
        draw = stream(3, purpose=Purpose.SYNTHETIC_DATA, client=k)
        z, u, _ = draw.normal(3)
        w = 0.5 * u + draw.normal(600).reshape(10, 60)
        b = 0.5 * u + draw.normal(10)
        n = int(np.floor(np.exp(4 + 2 * z))) + 50
        assert len(y) == n - max(1, round(0.1 * n))  # 10% (at least one) held out
        np.testing.assert_array_equal(np.argmax(x.astype(np.float64) @ w.T + b, axis=1), y)
    assert data.test_x.shape[0] + data.train_x.shape[0] == sum(
        int(np.floor(np.exp(4 + 2 * stream(3, purpose=Purpose.SYNTHETIC_DATA, client=k)
                            .normal(1)[0]))) + 50
        for k in range(5)
    )  # fmt: skip


def test_the_same_seed_gives_the_same_data() -> None:
    a, b = synthetic_fedprox(seed=1), synthetic_fedprox(seed=1)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_owner, b.train_owner)  # type: ignore[arg-type]
    assert not torch.equal(a.train_x[:100], synthetic_fedprox(seed=2).train_x[:100])
    sizes = np.bincount(a.train_owner.numpy())  # type: ignore[union-attr]
    assert len(sizes) == 30 and sizes.min() >= 45 and sizes.max() > 5 * np.median(sizes)


def _top_share(data: object) -> float:
    """The mean share of a client's samples in its most frequent class."""
    return float(np.mean([np.bincount(y).max() / len(y) for _, y in _by_client(data)]))


def _feature_shift(data: object) -> float:
    """Spread of the clients' mean features around the pooled mean."""
    means = np.stack([x.mean(axis=0) for x, _ in _by_client(data)])
    return float(means.std(axis=0).mean())


def test_labels_are_skewed_per_client_and_features_shift_with_beta() -> None:
    """Each client's labels concentrate on a few classes at every (alpha, beta); alpha's
    scalar mean adds the same to every class's score, so it changes the clients' models but
    not their labels; beta moves the clients' inputs apart."""
    for alpha, beta in [(0.0, 0.0), (1.0, 1.0), (4.0, 0.0)]:
        assert _top_share(synthetic_fedprox(seed=0, alpha=alpha, beta=beta)) > 0.7
    y0 = synthetic_fedprox(seed=0, alpha=0.0, beta=0.0).train_y
    y4 = synthetic_fedprox(seed=0, alpha=4.0, beta=0.0).train_y
    assert float((y0 == y4).double().mean()) > 0.999  # only float near-ties may differ
    shift = [_feature_shift(synthetic_fedprox(seed=0, alpha=1.0, beta=b)) for b in (0.0, 1.0, 4.0)]
    assert shift[0] < shift[1] < shift[2]
    assert shift[2] > 2 * shift[0]


def test_bad_generator_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="synthetic_alpha must be a number >= 0"):
        synthetic_fedprox(seed=0, alpha=-1.0)
    with pytest.raises(ConfigError, match="num_clients must be an integer >= 1"):
        synthetic_fedprox(seed=0, num_clients=0)
    with pytest.raises(ConfigError, match="test_fraction must be in"):
        synthetic_fedprox(seed=0, test_fraction=1.0)


CLI = ["--dataset", "synthetic", "--partition", "natural", "--model", "logreg",
       "--num-clients", "6", "--sample-ratio", "0.5", "--epochs", "2", "--batch-size", "10",
       "--lr", "0.01", "--rounds", "2", "--quiet"]  # fmt: skip


def test_the_natural_partition_gives_each_client_its_own_samples(tmp_path: Path) -> None:
    serial, thread = tmp_path / "serial", tmp_path / "thread"
    assert main(["run", *CLI, "--output-dir", str(serial)]) == 0
    with (serial / "partition.csv").open() as f:
        totals = [int(row["total"]) for row in csv.DictReader(f)]
    data = synthetic_fedprox(seed=0, num_clients=6)
    assert totals == np.bincount(data.train_owner.numpy()).tolist()  # type: ignore[union-attr]
    argv = [*CLI, "--mode", "thread", "--parallelism", "2", "--output-dir", str(thread)]
    assert main(["run", *argv]) == 0
    assert (thread / "final_model.safetensors").read_bytes() == (
        serial / "final_model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "synthetic"], "comes split by client"),
        (["--partition", "natural"], "'digits' has none"),
        (["--synthetic-alpha", "1"], "is an option of data set 'synthetic'"),
        (
            ["--dataset", "synthetic", "--partition", "natural", "--synthetic-beta", "-2"],
            "synthetic_beta must be a number >= 0",
        ),
        (
            ["--dataset", "synthetic", "--partition", "natural", "--train-size", "100"],
            "drop --train-size",
        ),
    ],
)
def test_bad_synthetic_options_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["run", *argv, "--output-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("emberfl: error: "), err
    assert message in err, err
    assert not (tmp_path / "run").exists()


def test_fcube_runs_with_its_natural_split_and_any_other(tmp_path: Path) -> None:
    base = ["--dataset", "fcube", "--model", "logreg", "--rounds", "2", "--epochs", "1",
            "--quiet"]  # fmt: skip
    natural = tmp_path / "natural"
    argv = [*base, "--partition", "natural", "--num-clients", "4", "--output-dir", str(natural)]
    assert main(["run", *argv]) == 0
    with (natural / "partition.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(int(r["class_0"]) and int(r["class_1"]) for r in rows)
    iid = tmp_path / "iid"
    assert main(["run", *base, "--partition", "iid", "--train-size", "400",
                 "--output-dir", str(iid)]) == 0  # fmt: skip
    with (iid / "partition.csv").open() as f:
        assert sum(int(r["total"]) for r in csv.DictReader(f)) == 400
    bad = [
        *base,
        "--partition",
        "natural",
        "--num-clients",
        "5",
        "--output-dir",
        str(tmp_path / "b"),
    ]
    assert main(["run", *bad]) == 2

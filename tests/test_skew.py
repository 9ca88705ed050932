"""Noise-based feature skew and seeded crop-and-flip augmentation.

Client k's noise has standard deviation noise (k + 1) / N and comes from its own stream;
crop-and-flip moves every image by a window of its padded copy and flips it, drawn from
the loader's generator, so augmented runs have the same bits in every per-client mode and
any parallelism (vectorized within float rounding); CLI options and their errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from emberfl.algorithms import FedAvg
from emberfl.cli import main
from emberfl.data import partition, synthetic_cifar10
from emberfl.data.partitioned import TensorPartitionedDataset
from emberfl.data.skew import CropFlip, add_feature_noise
from emberfl.errors import ConfigError
from emberfl.executors import ClientSetup, make_executor
from emberfl.simulation import Simulation


def test_feature_noise_grows_with_the_client_index() -> None:
    x = torch.zeros(4000, 5)
    index = [torch.arange(k * 1000, (k + 1) * 1000) for k in range(4)]
    noisy = add_feature_noise(x, index, 0.8, seed=3)
    assert torch.equal(x, torch.zeros(4000, 5))  # the input is not modified
    for k, rows in enumerate(index):
        assert float(noisy[rows].std()) == pytest.approx(0.8 * (k + 1) / 4, rel=0.05)
    assert torch.equal(noisy, add_feature_noise(x, index, 0.8, seed=3))
    assert not torch.equal(noisy, add_feature_noise(x, index, 0.8, seed=4))
    assert torch.equal(add_feature_noise(x, index, 0.0, seed=3), x)
    with pytest.raises(ConfigError, match="noise must be a number >= 0"):
        add_feature_noise(x, index, -1.0, seed=3)


def test_crop_and_flip_moves_each_image_within_its_padding() -> None:
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    flipped = CropFlip(padding=0, flip=1.0)(images, torch.Generator().manual_seed(1))
    assert torch.equal(flipped, images.flip(-1))
    out = CropFlip(padding=2, flip=0.0)(images, torch.Generator().manual_seed(1))
    padded = nn.functional.pad(images, (2, 2, 2, 2))
    offsets = set()
    for i in range(16):
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])
        ]
        assert found, i  # every output is a window of its padded image
        offsets.add(found[0])
    assert len(offsets) > 3  # offsets differ across images
    again = CropFlip(padding=2, flip=0.0)(images, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def _run(mode: str, p: int, augment: bool) -> torch.Tensor:
    data = synthetic_cifar10(num_train=120, num_test=20, seed=0)
    parts = partition(data.train_y.numpy(), 4, method="iid", seed=0)
    pdata = TensorPartitionedDataset(data, parts, augment=CropFlip() if augment else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    setup = ClientSetup(pdata, model, batch_size=10, seed=5)
    with Simulation(
        FedAvg(lr=0.05, epochs=2), make_executor(mode, setup, parallelism=p), num_clients=4,
        clients_per_round=4,
    ) as sim:  # fmt: skip
        sim.run_round()
        sim.run_round()
        return sim.state.model.clone()


@pytest.mark.timeout(300)
def test_augmented_runs_have_the_same_bits_in_every_mode() -> None:
    reference = _run("serial", 1, True)
    assert not torch.equal(reference, _run("serial", 1, False))  # augmentation changes it
    for mode, p in [("thread", 2), ("process", 2)]:
        assert torch.equal(_run(mode, p, True), reference), (mode, p)
    vectorized = _run("vectorized", 2, True)
    assert float((vectorized - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


def test_cli_feature_noise_and_augment_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "noise"
    argv = ["run", "--partition", "feature-noise", "--noise", "0.3", "--rounds", "1", "--quiet"]
    assert main([*argv, "--output-dir", str(run_dir)]) == 0
    assert "noise = 0.3" in (run_dir / "config.toml").read_text()
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert 0 <= json.loads(rows[0])["test_accuracy"] <= 1
    for bad, message in [
        (["--augment"], "data set 'digits' is not one"),
        (["--noise", "0.3"], "does not use noise"),
        (["--partition", "feature-noise", "--noise", "-1"], "noise must be a number >= 0"),
    ]:
        capsys.readouterr()
        assert main(["run", *bad, "--output-dir", str(tmp_path / "bad"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err

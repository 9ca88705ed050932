"""The step-by-step DS-FL example (examples/step_by_step_dsfl) end to end.

The example's modules have generic names (``algorithm``, ``dataset``, ``models``, ``main``),
so the fixture puts its folder on ``sys.path`` only while these tests run and restores any
same-named modules afterwards. Worker processes find the modules through the ``sys.path``
they inherit when the pool is spawned.
"""

from __future__ import annotations

import dataclasses
import importlib
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from emberfl.errors import ConfigError, TensorMismatchError

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "step_by_step_dsfl"
_MODULES = ("algorithm", "dataset", "models", "main")


@pytest.fixture(scope="module")
def dsfl() -> Iterator[SimpleNamespace]:
    """Import the example's modules; undo the ``sys.path`` and ``sys.modules`` changes after."""
    saved: dict[str, ModuleType] = {n: sys.modules.pop(n) for n in _MODULES if n in sys.modules}
    sys.path.insert(0, str(EXAMPLE_DIR))
    try:
        yield SimpleNamespace(**{name: importlib.import_module(name) for name in _MODULES})
    finally:
        sys.path.remove(str(EXAMPLE_DIR))
        for name in _MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def small_config(dsfl: SimpleNamespace) -> Any:
    """4 clients, 2 rounds, a 200-sample open set: a few seconds in serial mode."""
    return dsfl.main.DSFLConfig(
        num_clients=4,
        global_round=2,
        epochs=5,
        kd_epochs=5,
        open_size=200,
        open_size_per_round=100,
        alpha=1.0,
        seed=7,
    )


@pytest.fixture(scope="module")
def serial_run(dsfl: SimpleNamespace, small_config: Any) -> SimpleNamespace:
    """One serial run of the small configuration (``result``) and whether it left the
    global random state alone (``global_state_untouched``)."""
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state(legacy=True))
    result = dsfl.main.run(small_config, log=None)
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state(legacy=True))
    untouched = (
        torch.equal(before[0], after[0])
        and before[1] == after[1]
        and all(np.array_equal(a, b) for a, b in zip(before[2], after[2], strict=True))
    )
    return SimpleNamespace(result=result, global_state_untouched=untouched)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(1)


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------
# Entropy-reduction averaging
# ------------------------------------------------------------------------------------------


def test_era_matches_hand_computed_reference(dsfl: SimpleNamespace) -> None:
    client_a = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    client_b = torch.tensor([[0.5, 0.3, 0.2], [0.3, 0.3, 0.4]])
    # mean: [0.6, 0.25, 0.15] and [0.2, 0.2, 0.6]; T = 0.5 squares and renormalises:
    # [0.36, 0.0625, 0.0225] / 0.445 and [0.04, 0.04, 0.36] / 0.44.
    expected = torch.tensor(
        [
            [0.36 / 0.445, 0.0625 / 0.445, 0.0225 / 0.445],
            [0.04 / 0.44, 0.04 / 0.44, 0.36 / 0.44],
        ]
    )
    era = dsfl.algorithm.entropy_reduction_aggregation([client_a, client_b], 0.5)
    assert era.dtype == torch.float32
    torch.testing.assert_close(era, expected, rtol=0, atol=1e-6)


def test_era_temperature_one_is_the_plain_average(dsfl: SimpleNamespace) -> None:
    gen = torch.Generator().manual_seed(0)
    labels = [torch.softmax(torch.randn(5, 10, generator=gen), dim=1) for _ in range(3)]
    era = dsfl.algorithm.entropy_reduction_aggregation(labels, 1.0)
    torch.testing.assert_close(era, torch.stack(labels).mean(0), rtol=0, atol=1e-6)
    sharp = dsfl.algorithm.entropy_reduction_aggregation(labels, 0.1)
    assert bool((_entropy(sharp) < _entropy(era)).all())
    torch.testing.assert_close(sharp.sum(1), torch.ones(5))


def test_era_rejects_bad_input(dsfl: SimpleNamespace) -> None:
    era = dsfl.algorithm.entropy_reduction_aggregation
    with pytest.raises(ConfigError, match="temperature"):
        era([torch.full((2, 3), 1 / 3)], 0.0)
    with pytest.raises(TensorMismatchError, match="same open-set samples"):
        era([torch.full((2, 3), 1 / 3), torch.full((3, 3), 1 / 3)], 0.5)
    with pytest.raises(ValueError, match="at least one"):
        era([], 0.5)


# ------------------------------------------------------------------------------------------
# Models and data
# ------------------------------------------------------------------------------------------


def test_model_selector_is_seeded_per_owner_without_global_rng(dsfl: SimpleNamespace) -> None:
    selector = dsfl.models.DSFLModelSelector(num_classes=10, seed=3)
    state = torch.get_rng_state()
    cnn_0 = selector.select_model("cnn", owner=0).state_dict()
    again = selector.select_model("cnn", owner=0).state_dict()
    cnn_1 = selector.select_model("cnn", owner=1).state_dict()
    other_seed = dsfl.models.DSFLModelSelector(num_classes=10, seed=4)
    assert torch.equal(state, torch.get_rng_state())
    assert _same_bits(cnn_0, again)
    assert not _same_bits(cnn_0, cnn_1)
    assert not _same_bits(cnn_0, other_seed.select_model("cnn", owner=0).state_dict())
    mlp = selector.select_model("mlp", owner=0)
    assert mlp(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model"):
        selector.select_model("resnet")


def test_partition_keeps_open_private_and_test_disjoint(
    dsfl: SimpleNamespace, small_config: Any
) -> None:
    from emberfl.data import load_dataset

    data = load_dataset("digits", seed=small_config.seed)
    ds = dsfl.dataset.DSFLPartitionedDataset(
        data, num_clients=4, open_size=200, seed=small_config.seed
    )
    assert ds.open_size == 200
    assert sum(ds.client_sizes()) == data.num_train - 200
    all_private = torch.cat(list(ds.client_indices))
    assert torch.equal(all_private.sort().values, torch.arange(data.num_train - 200))
    # the open set and the private data are the training split, each sample exactly once
    split = sorted(map(tuple, torch.cat([ds.open_x, ds.private_x]).flatten(1).tolist()))
    assert split == sorted(map(tuple, data.train_x.flatten(1).tolist()))
    (item,) = ds.get_dataset(dsfl.dataset.DSFLPartitionType.OPEN, None)[0]
    assert item.shape == (1, 8, 8)


# ------------------------------------------------------------------------------------------
# Whole runs
# ------------------------------------------------------------------------------------------


def test_small_run_improves_the_server_model(
    serial_run: SimpleNamespace, small_config: Any
) -> None:
    history = serial_run.result.history
    assert len(history) == small_config.global_round
    initial = serial_run.result.initial["server_acc"]
    final = history[-1]["server_acc"]
    assert final > initial + 0.2, (initial, final)
    assert 0.0 <= history[-1]["client_acc"] <= 1.0


def test_run_leaves_global_random_state_alone(serial_run: SimpleNamespace) -> None:
    assert serial_run.global_state_untouched


def test_same_seed_gives_identical_server_model(
    dsfl: SimpleNamespace, small_config: Any, serial_run: SimpleNamespace
) -> None:
    again = dsfl.main.run(small_config, log=None)
    assert _same_bits(serial_run.result.server_state, again.server_state)
    assert again.history == serial_run.result.history


def test_process_pool_matches_serial_bit_for_bit(
    dsfl: SimpleNamespace, small_config: Any, serial_run: SimpleNamespace
) -> None:
    """Two worker processes, so clients change workers between rounds (their state with them)."""
    config = dataclasses.replace(
        small_config, mode=dsfl.main.ExecutionMode.PROCESS, num_parallels=2
    )
    result = dsfl.main.run(config, log=None)
    assert _same_bits(serial_run.result.server_state, result.server_state)
    assert result.history == serial_run.result.history


@pytest.mark.parametrize("num_parallels", [1, 2])
def test_storage_ipc_on_cifar_shaped_data_matches_serial_and_shared_memory(
    dsfl: SimpleNamespace, small_config: Any, num_parallels: int
) -> None:
    """BlazeFL 2.x's storage IPC (files in a share folder) against serial and shared memory,
    on seeded 3x32x32 images in memory, 2 rounds."""
    from emberfl.core import IPCMode

    cifar = dataclasses.replace(
        small_config,
        dataset="synthetic-cifar10",
        dataset_size=300,
        open_size=60,
        open_size_per_round=30,
        epochs=1,
        kd_epochs=1,
    )
    serial = dsfl.main.run(cifar, log=None)
    process = dsfl.main.ExecutionMode.PROCESS
    for ipc_mode in (IPCMode.STORAGE, IPCMode.SHARED_MEMORY):
        config = dataclasses.replace(
            cifar, mode=process, num_parallels=num_parallels, ipc_mode=ipc_mode
        )
        result = dsfl.main.run(config, log=None)
        assert _same_bits(serial.server_state, result.server_state), ipc_mode
        assert result.history == serial.history
    assert len(serial.history) == 2


def test_cli_parses_into_config(dsfl: SimpleNamespace) -> None:
    config = dsfl.main.parse_args(
        ["--num-clients", "3", "--rounds", "1", "--client-models", "mlp", "--mode", "process"]
    )
    assert (config.num_clients, config.global_round, config.client_models) == (3, 1, ("mlp",))
    assert config.mode == dsfl.main.ExecutionMode.PROCESS
    config = dsfl.main.parse_args(["--ipc-mode", "storage", "--dataset", "synthetic-cifar10"])
    assert (config.ipc_mode, config.dataset) == ("storage", "synthetic-cifar10")
    with pytest.raises(SystemExit):
        dsfl.main.parse_args(["--client-models", "resnet"])


def test_readme_excerpts_match_the_sources() -> None:
    """The README's Python excerpts are code from the example's files.

    Excerpts are dedented and reformatted (``ruff format`` formats Markdown code blocks), so
    the comparison ignores whitespace; ``...`` marks elided code.
    """
    readme = (EXAMPLE_DIR / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert len(blocks) >= 10
    sources = ["".join(p.read_text().split()) for p in sorted(EXAMPLE_DIR.glob("*.py"))]
    for block in blocks:
        for excerpt in "".join(block.split()).split("..."):
            assert any(excerpt in source for source in sources), (excerpt, block)

"""Run the examples in the package's docstrings, so they cannot rot."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "emberfl.rng",
    "emberfl.arena",
    "emberfl.aggregation",
    "emberfl.algorithms.fedavg",
    "emberfl.algorithms.fedopt",
    "emberfl.algorithms.fedprox",
    "emberfl.attacks",
    "emberfl.compression",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0

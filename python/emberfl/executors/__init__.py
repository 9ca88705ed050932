"""Execution modes: how a round's clients are scheduled, for any algorithm.

=====================  ========================================================
mode                   executor
=====================  ========================================================
``serial``             :class:`SerialExecutor` — one client after another
``thread``             :class:`ThreadExecutor` — ``num_parallels`` threads
``process``            :class:`ProcessExecutor` — ``num_parallels`` worker processes
``vectorized``         :class:`VectorizedExecutor` — ``chunk_size`` clients as one
                       stacked model (local-SGD algorithms)
=====================  ========================================================

Serial, thread and process give bitwise-identical results for any parallelism (CPU);
vectorized matches them to about 1e-6 relative. Every executor hands results back in the
order of the round's client list (:mod:`emberfl.executors.base`), so
:class:`~emberfl.simulation.Simulation` folds them into its sums as they arrive.
"""

from __future__ import annotations

from typing import Any

from emberfl.errors import ConfigError
from emberfl.executors.base import ClientSetup, Consume, Executor, RoundPlan
from emberfl.executors.process import ProcessExecutor
from emberfl.executors.serial import SerialExecutor
from emberfl.executors.thread import ThreadExecutor
from emberfl.executors.vectorized import VectorizedExecutor

__all__ = [
    "MODES",
    "ClientSetup",
    "Consume",
    "Executor",
    "ProcessExecutor",
    "RoundPlan",
    "SerialExecutor",
    "ThreadExecutor",
    "VectorizedExecutor",
    "make_executor",
]

MODES: tuple[str, ...] = ("serial", "thread", "process", "vectorized")
"""The execution modes, by name."""


def make_executor(
    mode: str, setup: ClientSetup, *, parallelism: int = 1, **options: Any
) -> Executor:
    """Return the executor of ``mode``.

    Args:
        mode: One of :data:`MODES`.
        setup: The clients' setup.
        parallelism: Threads, processes or chunks at once (ignored in serial mode).
        **options: Further keyword arguments of the executor's class (``chunk_size``,
            ``start_method``, ...).

    Returns:
        The executor.

    Raises:
        ConfigError: For an unknown mode.
    """
    if mode == "serial":
        return SerialExecutor(setup, **options)
    if mode == "thread":
        return ThreadExecutor(setup, num_parallels=parallelism, **options)
    if mode == "process":
        return ProcessExecutor(setup, num_parallels=parallelism, **options)
    if mode == "vectorized":
        return VectorizedExecutor(setup, num_parallels=parallelism, **options)
    raise ConfigError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")

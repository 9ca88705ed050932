"""emberfl's FedAvg trainers with timers around each client, and a timed round loop.

emberfl's core has no timing hooks, so the benchmark instruments it from outside:

* each trainer subclass records ``client_s``, the time one client spends in its own
  function (serial: ``train``, i.e. load the global model, local SGD, flatten the result;
  thread and process pools: ``worker``, which also builds the client's model and loader
  and, in a process, copies the result into shared memory). In a worker process the
  number travels back in the uplink package's ``metadata``.
* :func:`run_rounds` times each phase of a round from the server's side: ``dispatch``
  (sample clients, serialise the global model), ``local_process`` (the trainer's call:
  clients' work plus dispatching them, moving models, pool start-up in round one),
  ``aggregation`` (``uplink_package`` + ``load``: copying into the arena and the Rust
  weighted mean) and ``evaluation`` (``get_summary``).

This module is separate from ``bench_emberfl.py`` so that worker processes can import
the process-pool subclass by name.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from emberfl.algorithms.fedavg import (
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgDownlinkPackage,
    FedAvgProcessPoolClientTrainer,
    FedAvgProcessPoolUplinkPackage,
    FedAvgThreadPoolClientTrainer,
    FedAvgUplinkPackage,
)

__all__ = [
    "TimedProcessPoolTrainer",
    "TimedSerialTrainer",
    "TimedThreadPoolTrainer",
    "Trainer",
    "run_rounds",
]


class TimedSerialTrainer(FedAvgBaseClientTrainer):
    """:class:`FedAvgBaseClientTrainer` that records each client's ``train`` time."""

    client_seconds: list[float]

    def train(
        self, model_parameters: torch.Tensor, train_loader: DataLoader[Any], cid: int
    ) -> FedAvgUplinkPackage:
        """Run the parent's ``train`` and record how long it took."""
        start = time.perf_counter()
        package = super().train(model_parameters, train_loader, cid)
        self.__dict__.setdefault("client_seconds", []).append(time.perf_counter() - start)
        return package


class TimedThreadPoolTrainer(FedAvgThreadPoolClientTrainer):
    """:class:`FedAvgThreadPoolClientTrainer` that records each client's ``worker`` time."""

    _lock = threading.Lock()
    client_seconds: list[float]

    def worker(
        self,
        cid: int,
        device: str,
        payload: FedAvgDownlinkPackage,
        stop_event: threading.Event,
    ) -> FedAvgUplinkPackage:
        """Run the parent's ``worker`` and record how long it took."""
        start = time.perf_counter()
        package = super().worker(cid, device, payload, stop_event)
        elapsed = time.perf_counter() - start
        with self._lock:
            self.__dict__.setdefault("client_seconds", []).append(elapsed)
        return package


class TimedProcessPoolTrainer(FedAvgProcessPoolClientTrainer):
    """:class:`FedAvgProcessPoolClientTrainer` whose workers report their own time."""

    client_seconds: list[float]

    @staticmethod
    def worker(
        config: Any,
        payload: FedAvgDownlinkPackage,
        device: str,
        stop_event: threading.Event,
        *,
        shm_buffer: FedAvgProcessPoolUplinkPackage | None = None,
    ) -> FedAvgProcessPoolUplinkPackage:
        """Run the parent's ``worker``; put its duration in ``metadata["client_s"]``."""
        start = time.perf_counter()
        package = FedAvgProcessPoolClientTrainer.worker(
            config, payload, device, stop_event, shm_buffer=shm_buffer
        )
        package.metadata = {**(package.metadata or {}), "client_s": time.perf_counter() - start}
        return package

    def uplink_package(self) -> list[FedAvgUplinkPackage]:
        """Return the packages, collecting the workers' ``client_s`` first."""
        packages = super().uplink_package()
        seconds = self.__dict__.setdefault("client_seconds", [])
        seconds.extend(float((p.metadata or {}).get("client_s", 0.0)) for p in packages)
        return packages


Trainer = TimedSerialTrainer | TimedThreadPoolTrainer | TimedProcessPoolTrainer


def run_rounds(
    handler: FedAvgBaseServerHandler, trainer: Trainer, parallelism: int
) -> tuple[list[float], list[dict[str, float]], dict[str, float]]:
    """Run FedAvg until the handler stops, timing every phase of every round.

    Args:
        handler: The server.
        trainer: One of the timed trainers.
        parallelism: Clients trained at once (to estimate the training critical path).

    Returns:
        ``(round seconds, per-round breakdown, last summary)``. A breakdown has
        ``dispatch_s``, ``local_process_s``, ``client_sum_s`` (sum of the clients' own
        times), ``client_wall_s`` (``client_sum_s / min(P, clients)``, the training
        critical path if the pool were perfectly balanced), ``overhead_s``
        (``local_process_s - client_wall_s``: moving models, scheduling, pool start-up,
        imbalance), ``aggregation_s``, ``evaluation_s`` and ``round_s``.
    """
    rounds: list[float] = []
    breakdown: list[dict[str, float]] = []
    summary: dict[str, float] = {}
    while not handler.is_stopped():
        trainer.__dict__["client_seconds"] = []
        t0 = time.perf_counter()
        cids = handler.sample_clients()
        payload = handler.downlink_package()
        t1 = time.perf_counter()
        trainer.local_process(payload, cids)
        t2 = time.perf_counter()
        for package in trainer.uplink_package():
            handler.load(package)
        t3 = time.perf_counter()
        summary = handler.get_summary()
        t4 = time.perf_counter()
        client_sum = float(sum(trainer.__dict__.get("client_seconds", [])))
        client_wall = client_sum / max(1, min(parallelism, len(cids)))
        rounds.append(t4 - t0)
        breakdown.append(
            {
                "dispatch_s": t1 - t0,
                "local_process_s": t2 - t1,
                "client_sum_s": client_sum,
                "client_wall_s": client_wall,
                "overhead_s": (t2 - t1) - client_wall,
                "aggregation_s": t3 - t2,
                "evaluation_s": t4 - t3,
                "round_s": t4 - t0,
                "clients": float(len(cids)),
            }
        )
    return rounds, breakdown, summary

"""emberfl's FedAvg with a timer around each client, and a timed round loop.

emberfl's core has no timing hooks, so the benchmark instruments it from outside:

* :class:`TimedFedAvg` is :class:`emberfl.algorithms.FedAvg` whose clients report
  ``client_s``, the time one client spends in ``client_update`` (load the global model,
  build its loader, local SGD, flatten the result), as a metric; it travels back from a
  worker process with the client's other metrics.
* :func:`run_rounds` times each phase of a round from the server's side: ``dispatch``
  (sample clients), ``local_process`` (the simulation's round: the clients' work, moving
  models, folding each uplink into the running sums as it arrives, the server update and,
  in round one, a process pool's start-up), ``aggregation`` (the part of it spent folding
  uplinks and updating the server) and ``evaluation`` (the global model on the test split).

This module is separate from ``bench_emberfl.py`` so that worker processes can import the
algorithm by name.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from torch.utils.data import DataLoader

from emberfl.algorithms import Client, ClientResult, FedAvg
from emberfl.evaluation import evaluate
from emberfl.simulation import Simulation

__all__ = ["TimedFedAvg", "run_rounds"]


class TimedFedAvg(FedAvg):
    """FedAvg whose clients report their own time as the metric ``client_s``."""

    name: ClassVar[str] = "fedavg-timed"

    def client_update(self, client: Client) -> ClientResult:
        """Run FedAvg's client and record how long it took."""
        start = time.perf_counter()
        result = super().client_update(client)
        result.metrics["client_s"] = time.perf_counter() - start
        return result


def run_rounds(
    sim: Simulation,
    rounds: int,
    test_loader: DataLoader[Any],
    *,
    evaluation_threads: int,
) -> tuple[list[float], list[dict[str, float]], dict[str, float]]:
    """Run ``rounds`` rounds, timing every phase of every round.

    Args:
        sim: The simulation (FedAvg or :class:`TimedFedAvg` and an executor).
        rounds: Rounds to run.
        test_loader: The server's test split.
        evaluation_threads: Test batches evaluated at once.

    Returns:
        ``(round seconds, per-round breakdown, last summary)``. A breakdown has
        ``dispatch_s``, ``local_process_s``, ``client_sum_s`` (sum of the clients' own
        times), ``client_wall_s`` (``client_sum_s / min(P, clients)``, the training
        critical path if the pool were perfectly balanced), ``overhead_s``
        (``local_process_s - client_wall_s - aggregation_s``: moving models, scheduling,
        pool start-up, imbalance), ``aggregation_s``, ``evaluation_s`` and ``round_s``.
    """
    model = sim.global_model()
    parallelism = sim.executor.parallelism
    times: list[float] = []
    breakdown: list[dict[str, float]] = []
    summary: dict[str, float] = {}
    for _ in range(rounds):
        t0 = time.perf_counter()
        cids = sim.sample_clients()
        t1 = time.perf_counter()
        metrics = sim.run_round(cids)
        t2 = time.perf_counter()
        sim.load_global_into(model)
        loss, acc = evaluate(model, test_loader, "cpu", num_threads=evaluation_threads)
        summary = {"server_acc": acc, "server_loss": loss}
        t3 = time.perf_counter()
        # Every client of the workload holds the same number of samples, so the
        # sample-weighted mean times the count is the sum.
        client_sum = float(metrics.get("client_s", 0.0)) * len(cids)
        client_wall = client_sum / max(1, min(parallelism, len(cids)))
        aggregation = sim.last_timing.get("fold_s", 0.0) + sim.last_timing.get(
            "server_update_s", 0.0
        )
        times.append(t3 - t0)
        breakdown.append(
            {
                "dispatch_s": t1 - t0,
                "local_process_s": t2 - t1,
                "client_sum_s": client_sum,
                "client_wall_s": client_wall,
                "overhead_s": (t2 - t1) - client_wall - aggregation,
                "aggregation_s": aggregation,
                "evaluation_s": t3 - t2,
                "round_s": t3 - t0,
                "clients": float(len(cids)),
            }
        )
    return times, breakdown, summary

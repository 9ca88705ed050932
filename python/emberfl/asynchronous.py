"""Asynchronous and buffered FL on a virtual clock: FedAsync and FedBuff.

Clients train on the model version they start from and report when their (virtual)
time is up; the server folds each report in as it arrives, so fast clients report more
often and slow ones report stale updates.

* The clock: client ``k`` takes ``exp(mu + sigma z_k)`` virtual seconds per task, with
  ``z_k`` standard normal from the stream ``(seed, CLIENT_SPEED, k)`` (heterogeneous,
  lognormal speeds; ``sigma = 0``: every client equally fast).
* The events: ``concurrency`` clients are in flight. Every report is an event keyed by
  ``(virtual time, client id)``; all reports due at the same time are folded in client-id
  order, then the free slots are filled at once by a *wave* of clients drawn uniformly
  from the idle ones with the stream ``(seed, CLIENT_SAMPLING, wave)``. A wave's clients
  start from the same model, so they train together through the executor (in parallel
  for ``P > 1``), and their own streams are those of round ``wave``.
* :class:`FedAsync` (Xie et al., 2019): each report moves the model,
  ``x <- (1 - a_t) x + a_t y`` with ``a_t = alpha * s(t - tau)`` and a staleness function
  ``s`` (constant, polynomial or hinge, :func:`staleness_weight`).
* :class:`FedBuff` (Nguyen et al., 2022): reports' deltas (each from the version its
  client started from) are buffered; every ``K`` reports the model moves by
  ``server_lr`` times their sample-weighted mean.

The sequence of events depends only on the seed and the clock, never on scheduling or
parallelism, so the final model is the same bits in every mode and for any ``P``. With
``sigma = 0`` and ``K = concurrency = m``, FedBuff is synchronous FedAvg with server
learning rate ``server_lr``: every wave is a round.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from emberfl.aggregation import WeightedSum
from emberfl.algorithms.base import Algorithm, ClientResult, ModelLayout
from emberfl.core import serialize_model
from emberfl.errors import ConfigError, EmberflError
from emberfl.executors.base import Executor, RoundPlan
from emberfl.rng import Purpose, stream

__all__ = ["AsyncSimulation", "ClientClock", "FedAsync", "FedBuff", "staleness_weight"]

Staleness = Literal["constant", "polynomial", "hinge"]


def staleness_weight(kind: Staleness, staleness: int, a: float, b: float) -> float:
    """Return FedAsync's ``s(t - tau)``.

    Args:
        kind: ``constant`` (1), ``polynomial`` (``(staleness + 1)^-a``) or ``hinge`` (1 up
            to ``b``, then ``1 / (a (staleness - b) + 1)``).
        staleness: Server versions since the client started.
        a: The decay.
        b: The hinge's threshold.

    Returns:
        The weight, in ``(0, 1]``.
    """
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((staleness + 1) ** -a)
    if kind == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise ConfigError(f"unknown staleness function {kind!r}; use constant, polynomial or hinge")


@dataclass(frozen=True)
class ClientClock:
    """Lognormal client speeds: client ``k`` takes ``exp(mu + sigma z_k)`` per task.

    Attributes:
        mu: The log-mean.
        sigma: The log-spread (0: all clients equally fast).
    """

    mu: float = 0.0
    sigma: float = 0.0

    def duration(self, seed: int, cid: int) -> float:
        """Return client ``cid``'s virtual seconds per task."""
        if self.sigma == 0:
            return math.exp(self.mu)
        z = float(stream(seed, purpose=Purpose.CLIENT_SPEED, client=cid).normal(1)[0])
        return math.exp(self.mu + self.sigma * z)


@dataclass(frozen=True)
class FedAsync:
    """FedAsync's server rule.

    Attributes:
        alpha: The mixing weight ``alpha`` in ``(0, 1]``.
        staleness: The staleness function.
        a: Its decay.
        b: The hinge's threshold.
    """

    alpha: float = 0.6
    staleness: Staleness = "polynomial"
    a: float = 0.5
    b: float = 4.0


@dataclass(frozen=True)
class FedBuff:
    """FedBuff's server rule.

    Attributes:
        buffer_size: ``K``, reports per server update.
        server_lr: ``eta_g``.
    """

    buffer_size: int = 10
    server_lr: float = 1.0


@dataclass(order=True)
class _Task:
    finish: float
    cid: int
    wave: int = field(compare=False)
    version: int = field(compare=False)
    result: ClientResult = field(compare=False)
    start: torch.Tensor = field(compare=False)


class AsyncSimulation:
    """Clients of a per-client algorithm reporting on a virtual clock to an async server.

    Attributes:
        model: The flat global model.
        version: Server updates so far.
        time: The virtual time of the last event.
        history: One record per server update (``version``, ``virtual_time_s``,
            ``reports``, ``mean_staleness``, ``max_staleness``).
        staleness: Every report's staleness, in arrival order.
    """

    def __init__(
        self,
        algorithm: Algorithm,
        executor: Executor,
        server: FedAsync | FedBuff,
        *,
        num_clients: int,
        concurrency: int,
        clock: ClientClock | None = None,
    ) -> None:
        """Set up the server.

        Args:
            algorithm: What a client computes (its ``delta`` stream; no client state).
            executor: Runs the clients.
            server: :class:`FedAsync` or :class:`FedBuff`.
            num_clients: Clients in the federation.
            concurrency: Clients in flight, ``1..num_clients``.
            clock: The clients' speeds (default: all equal).

        Raises:
            ConfigError: Out-of-range counts, or an algorithm that is not a plain
                ``delta`` sender.
        """
        if not 1 <= concurrency <= num_clients:
            raise ConfigError(f"concurrency must be in 1..{num_clients}, got {concurrency}")
        self.layout = ModelLayout.of(executor.setup.model)
        self.streams = algorithm.uplink_streams(self.layout)
        if set(self.streams) != {"delta"} or algorithm.client_state(self.layout):
            raise ConfigError(
                f"asynchronous FL runs algorithms that send one delta and keep no client "
                f"state; {type(algorithm).__name__} sends {sorted(self.streams)}"
            )
        if isinstance(server, FedBuff) and server.buffer_size < 1:
            raise ConfigError(f"buffer_size must be >= 1, got {server.buffer_size}")
        if isinstance(server, FedAsync) and not 0 < server.alpha <= 1:
            raise ConfigError(f"FedAsync's alpha must be in (0, 1], got {server.alpha}")
        self.algorithm = algorithm
        self.executor = executor
        self.server = server
        self.num_clients = num_clients
        self.concurrency = concurrency
        self.clock = clock or ClientClock()
        self.seed = executor.setup.seed
        self.model = serialize_model(executor.setup.model).to(torch.float32)
        self.version = 0
        self.time = 0.0
        self.wave = 0
        self.history: list[dict[str, float]] = []
        self.staleness: list[int] = []
        self._flight: list[_Task] = []
        self._buffer = WeightedSum(self.layout.dim, name="delta")
        self._since: list[int] = []

    # -- the event loop -------------------------------------------------------------------
    def _start_wave(self) -> None:
        free = self.concurrency - len(self._flight)
        if free <= 0:
            return
        busy = {t.cid for t in self._flight}
        idle = [c for c in range(self.num_clients) if c not in busy]
        draw = stream(self.seed, purpose=Purpose.CLIENT_SAMPLING, round=self.wave)
        cids = sorted(idle[int(i)] for i in draw.choice(len(idle), min(free, len(idle))))
        start = self.model.clone()
        plan = RoundPlan(
            algorithm=self.algorithm,
            broadcast={"model": start},
            cids=cids,
            round=self.wave,
            layout=self.layout,
            streams=self.streams,
        )
        results: list[ClientResult] = []
        self.executor.run(plan, lambda _p, _c, result: results.append(_own(result)))
        if len(results) != len(cids):
            raise EmberflError(f"the executor returned {len(results)} of {len(cids)} clients")
        for cid, result in zip(cids, results, strict=True):
            finish = self.time + self.clock.duration(self.seed, cid)
            heapq.heappush(self._flight, _Task(finish, cid, self.wave, self.version, result, start))
        self.wave += 1

    def _report(self, task: _Task) -> None:
        staleness = self.version - task.version
        self.staleness.append(staleness)
        self._since.append(staleness)
        delta = task.result.uplink["delta"]
        if isinstance(self.server, FedAsync):
            s = self.server
            weight = s.alpha * staleness_weight(s.staleness, staleness, s.a, s.b)
            y = task.start + delta
            self.model.mul_(1.0 - weight).add_(y, alpha=weight)
            self._updated()
            return
        self._buffer.add(delta, float(task.result.num_samples), source=f"client {task.cid}")
        if self._buffer.count >= self.server.buffer_size:
            if self._buffer.weight > 0:
                self.model.add_(self._buffer.mean(), alpha=self.server.server_lr)
            self._buffer.reset()
            self._updated()

    def _updated(self) -> None:
        self.version += 1
        self.history.append(
            {
                "version": float(self.version),
                "virtual_time_s": self.time,
                "reports": float(len(self._since)),
                "mean_staleness": float(np.mean(self._since)),
                "max_staleness": float(max(self._since)),
            }
        )
        self._since = []

    def run(self, updates: int) -> list[dict[str, float]]:
        """Run until ``updates`` more server updates happened; return their records."""
        target = self.version + updates
        if not self._flight:
            self._start_wave()
        while self.version < target:
            now = self._flight[0].finish
            self.time = now
            due = []
            while self._flight and self._flight[0].finish == now:
                due.append(heapq.heappop(self._flight))  # (time, cid) order
            for task in due:
                self._report(task)
            self._start_wave()
        return self.history[-updates:] if updates else []

    def close(self) -> None:
        """Close the executor. Idempotent."""
        self.executor.close()

    def __enter__(self) -> AsyncSimulation:
        """Return the simulation; :meth:`close` runs on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Call :meth:`close`."""
        self.close()


def _own(result: ClientResult) -> ClientResult:
    """A copy whose tensors the executor will not reuse (its buffers are per round)."""
    uplink = {k: v.detach().to("cpu", torch.float32).clone() for k, v in result.uplink.items()}
    return ClientResult(uplink, result.num_samples, dict(result.weights), dict(result.metrics))

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from emberfl.aggregation import WeightedSum
from emberfl.algorithms.base import Algorithm, ClientResult, ModelLayout
from emberfl.core import deserialize_model, serialize_model
from emberfl.errors import CheckpointError, ConfigError, EmberflError
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


_STATE = "async/"
"""Prefix of the simulation's own checkpoint tensors."""


class AsyncSimulation:
    """Clients of a per-client algorithm reporting on a virtual clock to an async server.

    The loop advances one event at a time: either the next report (the earliest
    ``(finish time, client id)`` in flight) or, once every report due at the current time
    is folded in and slots are free, a wave of new clients. :meth:`step` runs events until
    the server model moves once and stops right there, so between steps the FedBuff buffer
    is empty and the whole state is :meth:`state_tensors` (checkpoint + resume gives an
    uninterrupted run's bits).

    Attributes:
        model: The flat global model.
        version: Server updates so far.
        time: The virtual time of the last event.
        wave: Waves started so far (a wave's clients use the streams of round ``wave``).
        history: One record per server update (see :meth:`step`).
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
        self._buffer: list[_Task] = []
        self._reports: list[_Task] = []  # since the last server update
        self._started = 0  # clients started since the last server update

    @property
    def round(self) -> int:
        """Server updates so far (what the CLI counts as rounds)."""
        return self.version

    # -- the event loop -------------------------------------------------------------------
    def _wave_due(self) -> bool:
        """Slots are free and no other report is due at the current time."""
        if len(self._flight) >= self.concurrency:
            return False
        return not self._flight or self._flight[0].finish > self.time

    def _start_wave(self) -> None:
        free = self.concurrency - len(self._flight)
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
        self._started += len(cids)

    def _report(self, task: _Task) -> None:
        staleness = self.version - task.version
        self.staleness.append(staleness)
        self._reports.append(task)
        delta = task.result.uplink["delta"]
        if isinstance(self.server, FedAsync):
            s = self.server
            weight = s.alpha * staleness_weight(s.staleness, staleness, s.a, s.b)
            y = task.start + delta
            self.model.mul_(1.0 - weight).add_(y, alpha=weight)
            self._updated()
            return
        self._buffer.append(task)
        if len(self._buffer) >= self.server.buffer_size:
            total = WeightedSum(self.layout.dim, name="delta", layout=self.layout.items)
            for t in self._buffer:  # arrival order: the sum is a pure function of the events
                total.add(t.result.uplink["delta"], float(t.result.num_samples),
                          source=f"client {t.cid}")  # fmt: skip
            if total.weight > 0:
                self.model.add_(total.mean(), alpha=self.server.server_lr)
            self._buffer = []
            self._updated()

    def _updated(self) -> None:
        reports = self._reports
        stale = [self.version - t.version for t in reports]
        samples = [float(t.result.num_samples) for t in reports]
        losses = [t.result.metrics.get("train_loss") for t in reports]
        weighted = [(w, v) for w, v in zip(samples, losses, strict=True) if v is not None]
        weight = sum(w for w, _ in weighted)
        record: dict[str, float] = {
            "version": float(self.version + 1),
            "virtual_time_s": self.time,
            "reports": float(len(reports)),
            "mean_staleness": float(np.mean(stale)),
            "max_staleness": float(max(stale)),
            "num_samples": sum(samples),
            "uplink_bytes": float(sum(_uplink_bytes(t.result) for t in reports)),
            "downlink_bytes": float(self._started * 4 * self.layout.dim),
        }
        if weight > 0:
            record["train_loss"] = sum(w * float(v) for w, v in weighted) / weight
        self.version += 1
        self.history.append(record)
        self._reports = []
        self._started = 0

    def step(self) -> dict[str, float]:
        """Run events until the server model moves once.

        Returns:
            The update's record: ``version``, ``virtual_time_s`` (the clock when it
            happened), ``reports`` folded into it, their ``mean_staleness`` and
            ``max_staleness`` (server versions since each started), ``num_samples``,
            ``train_loss`` (their mean local loss, weighted by samples; absent if none
            trained), ``uplink_bytes`` (what they sent) and ``downlink_bytes`` (the models
            broadcast to the clients started since the previous update).
        """
        target = self.version + 1
        while self.version < target:
            if self._wave_due():
                self._start_wave()
                continue
            task = heapq.heappop(self._flight)  # (time, cid) order
            self.time = task.finish
            self._report(task)
        return self.history[-1]

    def run(self, updates: int) -> list[dict[str, float]]:
        """Run ``updates`` more server updates; return their records."""
        return [self.step() for _ in range(updates)]

    def load_global_into(self, model: torch.nn.Module) -> None:
        """Copy the global parameters into ``model`` (same architecture)."""
        deserialize_model(model, self.model)

    # -- checkpoints ----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Return everything that carries over between steps besides :attr:`version`.

        Returns:
            ``server/model``; ``async/clock`` (float64: time), ``async/counters`` (int64:
            wave), ``async/staleness`` (every report's), ``async/flight`` (int64 rows:
            cid, wave, version, samples, uplink bytes), ``async/finish`` and
            ``async/loss`` (float64, NaN: no loss), ``async/delta/<i>`` per task in flight
            and ``async/start/<wave>`` per wave they started in.
        """
        if self._buffer or self._reports:
            raise EmberflError("the asynchronous state is saved between steps, not inside one")
        tasks = sorted(self._flight)
        out = {
            "server/model": self.model.clone(),
            f"{_STATE}clock": torch.tensor([self.time], dtype=torch.float64),
            f"{_STATE}counters": torch.tensor([self.wave], dtype=torch.int64),
            f"{_STATE}staleness": torch.tensor(self.staleness, dtype=torch.int64),
            f"{_STATE}flight": torch.tensor(
                [_task_row(t) for t in tasks], dtype=torch.int64
            ).reshape(len(tasks), 5),
            f"{_STATE}finish": torch.tensor([t.finish for t in tasks], dtype=torch.float64),
            f"{_STATE}loss": torch.tensor(
                [t.result.metrics.get("train_loss", math.nan) for t in tasks],
                dtype=torch.float64,
            ),
        }
        for i, t in enumerate(tasks):
            out[f"{_STATE}delta/{i}"] = t.result.uplink["delta"].clone()
            out[f"{_STATE}start/{t.wave}"] = t.start.clone()
        return out

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], version: int) -> None:
        """Restore :meth:`state_tensors` output taken after ``version`` server updates.

        Raises:
            CheckpointError: Missing or mismatching tensors.
        """
        try:
            model = tensors["server/model"]
            flight = tensors[f"{_STATE}flight"]
            finish = tensors[f"{_STATE}finish"].tolist()
            loss = tensors[f"{_STATE}loss"].tolist()
            time = float(tensors[f"{_STATE}clock"][0])
            wave = int(tensors[f"{_STATE}counters"][0])
            staleness = [int(v) for v in tensors[f"{_STATE}staleness"].tolist()]
            rows = [[int(v) for v in row] for row in flight.tolist()]
            if tuple(model.shape) != (self.layout.dim,) or len(rows) != len(finish):
                raise ValueError("shapes")
            tasks = []
            for i, (cid, wave_, version_, samples, sent) in enumerate(rows):
                delta = tensors[f"{_STATE}delta/{i}"].to(torch.float32)
                start = tensors[f"{_STATE}start/{wave_}"].to(torch.float32)
                if delta.shape != model.shape or start.shape != model.shape:
                    raise ValueError("shapes")
                metrics = {} if math.isnan(loss[i]) else {"train_loss": loss[i]}
                result = ClientResult({"delta": delta}, samples, metrics=metrics,
                                      uplink_bytes=sent)  # fmt: skip
                tasks.append(_Task(float(finish[i]), cid, wave_, version_, result, start))
        except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(
                f"the checkpoint's asynchronous state is missing or malformed ({exc}); it was "
                "written by another kind of run"
            ) from None
        if len(tasks) > self.concurrency or any(t.version > version for t in tasks):
            raise CheckpointError(
                f"the checkpoint holds {len(tasks)} clients in flight (concurrency "
                f"{self.concurrency}) from versions up to {max(t.version for t in tasks)}, "
                f"but it was taken after {version} updates"
            )
        self.model = model.to(torch.float32).clone()
        self.version, self.time, self.wave = version, time, wave
        self.staleness = staleness
        self._flight = tasks
        heapq.heapify(self._flight)
        self._buffer, self._reports, self._started = [], [], 0

    def close(self) -> None:
        """Close the executor. Idempotent."""
        self.executor.close()

    def __enter__(self) -> AsyncSimulation:
        """Return the simulation; :meth:`close` runs on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Call :meth:`close`."""
        self.close()


def _task_row(task: _Task) -> list[int]:
    result = task.result
    return [task.cid, task.wave, task.version, result.num_samples, _uplink_bytes(result)]


def _uplink_bytes(result: ClientResult) -> int:
    if result.uplink_bytes is not None:
        return int(result.uplink_bytes)
    return sum(4 * v.numel() for v in result.uplink.values())


def _own(result: ClientResult) -> ClientResult:
    """A copy whose tensors the executor will not reuse (its buffers are per round)."""
    uplink = {k: v.detach().to("cpu", torch.float32).clone() for k, v in result.uplink.items()}
    return ClientResult(uplink, result.num_samples, dict(result.weights), dict(result.metrics))

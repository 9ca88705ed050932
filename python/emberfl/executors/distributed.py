"""Run a round's clients across the ranks of a ``torch.distributed`` job.

:class:`DistributedExecutor` wraps a local executor (serial, thread, process or vectorized,
with its own parallelism). Every rank holds the whole simulation (server state, client
state store, sampling): the round's client list is split into contiguous shares balanced
by the clients' training samples, each rank trains its share with its local executor, and
the results are then broadcast from their owners **in the order of the client list**, so
that every rank hands every client's result (and the client's new state, for algorithms
that keep some) to ``consume`` in the same order as a single process would. Server-side
arithmetic is therefore the same operations in the same order on every rank and for every
world size: the global model is bitwise the one of the same run without
``torch.distributed``, for any world size, algorithm and aggregator.

What travels: each client's uplink (and state) once from its owner to the others, in
broadcasts of consecutive results of about :data:`EXCHANGE_BYTES`; no rank holds more than
its own share of results at a time.

A rank whose clients failed tells the others, and every rank raises the same
:class:`~emberfl.errors.ClientError` for the first failing client of the list, so no rank
is left waiting in a collective. A rank that dies or cuts the connection makes the others'
collectives fail (at once for a closed connection, after the process group's timeout for
a hung rank): they raise :class:`~emberfl.errors.RankLostError`.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from emberfl.algorithms.base import ClientResult
from emberfl.errors import ClientError, ConfigError, RankLostError
from emberfl.executors.base import Consume, Executor, RoundPlan

__all__ = ["EXCHANGE_BYTES", "DistributedExecutor", "backend_reason", "split_by_size"]


def split_by_size(sizes: Sequence[int], world_size: int) -> list[int]:
    """Give each position of a client list to a rank: contiguous shares of about equal data.

    Position ``p`` goes to rank ``floor(world_size * m_p / total)``, ``m_p`` the midpoint
    of its samples in the cumulative sum (all sizes count at least 1), so shares are
    contiguous, ordered by rank and balanced by training samples.

    Args:
        sizes: Each position's training samples.
        world_size: The number of ranks (>= 1).

    Returns:
        The rank of every position.

    Example:
        >>> split_by_size([10, 10, 10, 10], 2)
        [0, 0, 1, 1]
        >>> split_by_size([30, 5, 5], 2)
        [0, 1, 1]
    """
    if world_size < 1:
        raise ConfigError(f"world_size must be at least 1, got {world_size}")
    weights = [max(1, int(s)) for s in sizes]
    total = sum(weights)
    owners, before = [], 0
    for w in weights:
        owners.append(min(world_size - 1, (world_size * (2 * before + w)) // (2 * total)))
        before += w
    return owners


EXCHANGE_BYTES = 64 << 20
"""About how many bytes of consecutive results of one rank travel in one broadcast."""


def _groups(owners: Sequence[int], size: int) -> list[list[int]]:
    """Runs of consecutive positions with the same owner, at most ``size`` long."""
    groups: list[list[int]] = []
    for position, owner in enumerate(owners):
        if groups and owners[groups[-1][0]] == owner and len(groups[-1]) < size:
            groups[-1].append(position)
        else:
            groups.append([position])
    return groups


@contextlib.contextmanager
def _collective(round_: int, doing: str) -> Iterator[None]:
    """Turn a failed collective (a rank that died, hung past the timeout or cut the
    connection) into one :class:`~emberfl.errors.RankLostError`."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed.DistBackendError is one
        raise RankLostError(
            f"lost another rank in round {round_ + 1} {doing}: {backend_reason(exc)}"
        ) from None


def backend_reason(exc: BaseException) -> str:
    """The gist of a ``torch.distributed`` backend error, without its source location."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    return text.split(" This is typically")[0].strip()[:300]


def _detached(result: ClientResult) -> ClientResult:
    return ClientResult(
        uplink={k: v.detach().to("cpu", copy=True) for k, v in result.uplink.items()},
        num_samples=result.num_samples,
        weights=dict(result.weights),
        metrics=dict(result.metrics),
        uplink_bytes=result.uplink_bytes,
    )


class DistributedExecutor(Executor):
    """Trains this rank's share of each round with a local executor; see the module docs.

    Attributes:
        local: The executor that trains this rank's clients.
        rank: This process's rank.
        world_size: The number of ranks.
        group: The process group (``None``: the default one).
        last_round: Where the last round's time went on this rank, in seconds:
            ``train_s`` (its share), ``wait_s`` (for the slowest rank's share) and
            ``exchange_s`` (the results' broadcasts).
    """

    name = "distributed"

    def __init__(
        self,
        local: Executor,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        group: Any = None,
    ) -> None:
        """Wrap ``local``.

        Args:
            local: The local executor (its setup is the simulation's).
            rank: This rank (default: ``torch.distributed.get_rank()``).
            world_size: The ranks (default: ``torch.distributed.get_world_size()``).
            group: The process group (``None``: the default one).

        Raises:
            ConfigError: If ``torch.distributed`` is not initialised.
        """
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError(
                "DistributedExecutor needs torch.distributed: launch with torchrun (or call "
                "torch.distributed.init_process_group first)"
            )
        super().__init__(local.setup, intra_op_threads=local.intra_op_threads, client_timeout=None)
        self.local = local
        self.group = group
        self.rank = dist.get_rank(group) if rank is None else rank
        self.world_size = dist.get_world_size(group) if world_size is None else world_size
        self.last_round: dict[str, float] = {}

    @property
    def parallelism(self) -> int:
        """Clients trained at once on this rank."""
        return self.local.parallelism

    def owners(self, cids: Sequence[int]) -> list[int]:
        """The rank that trains each position of ``cids``."""
        return split_by_size([self.setup.num_samples(c) for c in cids], self.world_size)

    def run(self, plan: RoundPlan, consume: Consume) -> None:
        """Train this rank's share, then deliver every result in list order on every rank.

        Raises:
            ClientError: On every rank, for the first client of the list that failed on
                any rank.
        """
        if self.world_size == 1:  # nothing to share: the local executor streams as usual
            started = time.perf_counter()
            self.local.run(plan, consume)
            self.last_round = {
                "train_s": time.perf_counter() - started,
                "wait_s": 0.0,
                "exchange_s": 0.0,
            }
            return
        owners = self.owners(plan.cids)
        mine = [p for p, r in enumerate(owners) if r == self.rank]
        kept: dict[int, tuple[ClientResult, dict[str, torch.Tensor]]] = {}

        def keep(index: int, cid: int, result: ClientResult) -> None:
            state = {}
            if plan.state is not None:
                state = {k: v.clone() for k, v in plan.state.views(cid).items()}
            kept[mine[index]] = (_detached(result), state)

        failure: tuple[int, int, str, str] | None = None
        started = time.perf_counter()
        if mine:
            sub = RoundPlan(
                algorithm=plan.algorithm,
                broadcast=plan.broadcast,
                cids=[plan.cids[p] for p in mine],
                round=plan.round,
                layout=plan.layout,
                streams=plan.streams,
                state=plan.state,
            )
            try:
                self.local.run(sub, keep)
            except ClientError as exc:
                position = plan.cids.index(exc.cid) if exc.cid in plan.cids else mine[0]
                summary = exc.summary.removeprefix(f"client {exc.cid}: ")
                failure = (position, exc.cid, summary, exc.worker_traceback)
        trained = time.perf_counter()
        failures: list[Any] = [None] * self.world_size
        with _collective(plan.round, "while the ranks compared their clients' outcomes"):
            dist.all_gather_object(failures, failure, group=self.group)
        waited = time.perf_counter()
        found = [f for f in failures if f is not None]
        if found:
            position, cid, summary, trace = min(found)
            raise ClientError(cid, f"{summary} (trained on rank {owners[position]})", trace)
        for group in _groups(owners, self._group_size(plan)):
            owner = owners[group[0]]
            src = self._global(owner)
            first = plan.cids[group[0]]
            with _collective(plan.round, f"waiting for client {first}'s result from rank {src}"):
                items = self._exchange(
                    [kept.pop(p) for p in group] if owner == self.rank else None, src
                )
            for position, (result, state) in zip(group, items, strict=True):
                cid = plan.cids[position]
                if plan.state is not None and owner != self.rank:
                    views = plan.state.views(cid)
                    for name, value in state.items():
                        views[name].copy_(value)
                consume(position, cid, result)
        self.last_round = {
            "train_s": trained - started,
            "wait_s": waited - trained,
            "exchange_s": time.perf_counter() - waited,
        }

    def _exchange(
        self, items: list[tuple[ClientResult, dict[str, torch.Tensor]]] | None, src: int
    ) -> list[tuple[ClientResult, dict[str, torch.Tensor]]]:
        """Broadcast ``src``'s results: their tensors as one flat float32 buffer, the rest
        (names, shapes, sizes, weights, metrics) as a small pickled header."""
        header: list[Any] = [None]
        if items is not None:
            header[0] = [
                (
                    [(k, tuple(v.shape), v.dtype) for k, v in result.uplink.items()],
                    [(k, tuple(v.shape), v.dtype) for k, v in state.items()],
                    result.num_samples,
                    result.weights,
                    result.metrics,
                    result.uplink_bytes,
                )
                for result, state in items
            ]
        dist.broadcast_object_list(header, src=src, group=self.group)
        meta = header[0]
        specs = [spec for entry in meta for spec in (*entry[0], *entry[1])]
        if any(dtype != torch.float32 for _, _, dtype in specs):
            box: list[Any] = [items]  # not all float32: the tensors travel pickled
            dist.broadcast_object_list(box, src=src, group=self.group)
            received: list[tuple[ClientResult, dict[str, torch.Tensor]]] = box[0]
            return received
        sizes = [math.prod(shape) for _, shape, _ in specs]
        if items is not None:
            parts = [t.reshape(-1) for r, st in items for t in (*r.uplink.values(), *st.values())]
            flat = torch.cat(parts) if parts else torch.zeros(0)
        else:
            flat = torch.empty(sum(sizes), dtype=torch.float32)
        if flat.numel():
            dist.broadcast(flat, src=src, group=self.group)
        if items is not None:
            return items
        chunks = iter(torch.split(flat, sizes))
        out = []
        for up_specs, state_specs, num_samples, weights, metrics, uplink_bytes in meta:
            uplink = {k: next(chunks).view(shape) for k, shape, _ in up_specs}
            state = {k: next(chunks).view(shape) for k, shape, _ in state_specs}
            result = ClientResult(uplink, num_samples, weights, metrics, uplink_bytes)
            out.append((result, state))
        return out

    def _group_size(self, plan: RoundPlan) -> int:
        """Results sent in one broadcast: about :data:`EXCHANGE_BYTES` of uplinks."""
        floats = sum(t.numel() for t in plan.broadcast.values()) * max(1, len(plan.streams))
        return max(1, EXCHANGE_BYTES // max(1, 4 * floats))

    def _global(self, rank: int) -> int:
        if self.group is None:
            return rank
        return int(dist.get_global_rank(self.group, rank))

    def close(self) -> None:
        """Close the local executor."""
        self.local.close()

"""The thread executor: ``num_parallels`` clients train at once in a thread pool.

PyTorch releases the GIL inside its kernels, so the threads run in parallel. Each thread
trains on its own copy of the model; at most ``2 * num_parallels`` clients are submitted
ahead of the one being consumed, so finished results waiting for an earlier client stay
bounded by the parallelism. The bits are the serial executor's: every client's randomness
is its own stream, and results are consumed in client-list order.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import ClassVar

import torch
from torch import nn

from emberfl.algorithms.base import ClientResult
from emberfl.core._threads import ClientThreads
from emberfl.core.intra_op import intra_op_threads
from emberfl.errors import ClientError
from emberfl.executors.base import (
    ClientSetup,
    Consume,
    Executor,
    RoundPlan,
    as_client_error,
    broadcast_marks,
    check_broadcast,
    check_positive_int,
    check_result,
)

__all__ = ["ThreadExecutor"]

_DRAIN_S = 1.0  # after a failure or Ctrl-C, how long running clients get to stop


class ThreadExecutor(Executor):
    """Clients in a pool of ``num_parallels`` threads.

    Attributes:
        num_parallels: Threads.
    """

    name: ClassVar[str] = "thread"

    def __init__(
        self,
        setup: ClientSetup,
        *,
        num_parallels: int,
        intra_op_threads: int | None = 1,
        client_timeout: float | None = None,
    ) -> None:
        """Create the executor.

        Args:
            setup: The clients' setup.
            num_parallels: Threads (>= 1).
            intra_op_threads: PyTorch's intra-op thread count while clients train.
            client_timeout: Seconds a client may train before the round fails with a
                :class:`~emberfl.errors.ClientTimeoutError` (``None``: no limit).

        Raises:
            ConfigError: ``num_parallels < 1``.
        """
        check_positive_int("num_parallels", num_parallels)
        super().__init__(setup, intra_op_threads=intra_op_threads, client_timeout=client_timeout)
        self.num_parallels = num_parallels
        self._models: queue.SimpleQueue[nn.Module] = queue.SimpleQueue()
        for _ in range(num_parallels):
            self._models.put(setup.template())

    @property
    def parallelism(self) -> int:
        """Threads."""
        return self.num_parallels

    def _train(
        self,
        plan: RoundPlan,
        cid: int,
        state: dict[str, torch.Tensor],
        is_new: bool,
        check: Callable[[int], None],
    ) -> ClientResult:
        model = self._models.get()
        try:
            client = self.client(plan, cid, model, state=state, state_is_new=is_new)
            update = plan.algorithm.client_update(client)
            check(cid)  # in the client's thread, as it returns (see run)
            return check_result(update, plan, cid)
        finally:
            self._models.put(model)

    def run(self, plan: RoundPlan, consume: Consume) -> None:
        """Train ``plan.cids`` in the pool, calling ``consume`` in order (see :class:`Executor`).

        Raises:
            ClientError: The first failing client in list order; the others are stopped.
            ClientTimeoutError: A client trained longer than ``client_timeout``; it is
                asked to stop and left running in its (daemon) thread.
            PayloadWriteError: A client wrote into the broadcast, which all threads share.
            KeyboardInterrupt: Ctrl-C; its message names the clients that were still
                training and did not stop within a second.
        """
        self.stop_event.clear()
        window = 2 * self.num_parallels
        marks = broadcast_marks(plan.broadcast)
        lock = threading.Lock()

        def check(cid: int) -> None:
            # Checked as each client returns, in its thread: with one thread the culprit
            # is certain; with several it is this client or one training beside it.
            with lock:
                check_broadcast(plan.broadcast, marks, cid, threads.running())

        threads = ClientThreads(
            self.num_parallels, timeout=self.client_timeout, name="emberfl-client"
        )
        interrupted = False
        with intra_op_threads(self.intra_op_threads):
            pending: deque[tuple[int, Future[ClientResult]]] = deque()
            try:
                following = iter(plan.cids)
                for position in range(len(plan.cids)):
                    while len(pending) < window:
                        cid = next(following, None)
                        if cid is None:
                            break
                        # State slots are allocated here, in one thread.
                        state = plan.state.views(cid) if plan.state is not None else {}
                        is_new = plan.state is None or not plan.state.is_written(cid)
                        future = threads.submit(cid, self._train, plan, cid, state, is_new, check)
                        pending.append((cid, future))
                    cid, future = pending.popleft()
                    try:
                        result = threads.result(future)
                    except ClientError:
                        raise
                    except Exception as exc:
                        raise as_client_error(cid, exc) from exc
                    consume(position, cid, result)
            except KeyboardInterrupt:
                interrupted = True
                raise
            finally:
                self.stop_event.set()
                stuck = threads.close(drain_s=_DRAIN_S)
                if stuck:
                    # Their threads keep their models: give the next round fresh ones.
                    self._models = queue.SimpleQueue()
                    for _ in range(self.num_parallels):
                        self._models.put(self.setup.template())
                if interrupted and stuck:
                    raise KeyboardInterrupt(
                        f"clients {', '.join(map(str, stuck))} were still training and were "
                        "left running in their threads"
                    )

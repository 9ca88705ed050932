"""The serial executor: clients train one after another in the calling thread.

The reference mode: the other executors give the same bits (thread, process) or the same
numbers up to float rounding (vectorized). Errors name the client and keep its traceback.
"""

from __future__ import annotations

from typing import ClassVar

from emberfl.core._threads import Deadline
from emberfl.core.intra_op import intra_op_threads
from emberfl.errors import ClientTimeoutError
from emberfl.executors.base import (
    ClientSetup,
    Consume,
    Executor,
    RoundPlan,
    as_client_error,
    broadcast_marks,
    check_broadcast,
    check_result,
)

__all__ = ["SerialExecutor"]


class SerialExecutor(Executor):
    """One client at a time, on one private copy of the model."""

    name: ClassVar[str] = "serial"

    def __init__(
        self,
        setup: ClientSetup,
        *,
        intra_op_threads: int | None = 1,
        client_timeout: float | None = None,
    ) -> None:
        """Create the executor.

        Args:
            setup: The clients' setup.
            intra_op_threads: PyTorch's intra-op thread count while clients train.
            client_timeout: Seconds a client may train before the round fails with a
                :class:`~emberfl.errors.ClientTimeoutError` (``None``: no limit).
        """
        super().__init__(setup, intra_op_threads=intra_op_threads, client_timeout=client_timeout)
        self._model = setup.template()

    def run(self, plan: RoundPlan, consume: Consume) -> None:
        """Train ``plan.cids`` in order, calling ``consume`` after each (see :class:`Executor`).

        Raises:
            ClientError: A client raised (it names the client and keeps the traceback).
            ClientTimeoutError: A client trained longer than ``client_timeout`` (enforced
                when the round runs in the main thread: the client is interrupted as by
                Ctrl-C).
            PayloadWriteError: A client wrote into the broadcast (its values are put
                back before the error is raised).
        """
        self.stop_event.clear()
        marks = broadcast_marks(plan.broadcast)
        with intra_op_threads(self.intra_op_threads):
            for position, cid in enumerate(plan.cids):
                client = self.client(plan, cid, self._model)
                deadline = Deadline(self.client_timeout)
                try:
                    with deadline:
                        update = plan.algorithm.client_update(client)
                    result = check_result(update, plan, cid)
                except KeyboardInterrupt:
                    if deadline.fired and self.client_timeout is not None:
                        raise ClientTimeoutError(
                            cid, deadline.elapsed, self.client_timeout, (cid,), "it was interrupted"
                        ) from None
                    raise
                except Exception as exc:
                    raise as_client_error(cid, exc) from exc
                check_broadcast(plan.broadcast, marks, cid)
                consume(position, cid, result)

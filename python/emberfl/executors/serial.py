"""The serial executor: clients train one after another in the calling thread.

The reference mode: the other executors give the same bits (thread, process) or the same
numbers up to float rounding (vectorized). Errors name the client and keep its traceback.
"""

from __future__ import annotations

from typing import ClassVar

from emberfl.core.intra_op import intra_op_threads
from emberfl.executors.base import (
    ClientSetup,
    Consume,
    Executor,
    RoundPlan,
    as_client_error,
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
        super().__init__(
            setup, intra_op_threads=intra_op_threads, client_timeout=client_timeout
        )
        self._model = setup.template()

    def run(self, plan: RoundPlan, consume: Consume) -> None:
        """Train ``plan.cids`` in order, calling ``consume`` after each (see :class:`Executor`)."""
        self.stop_event.clear()
        with intra_op_threads(self.intra_op_threads):
            for position, cid in enumerate(plan.cids):
                client = self.client(plan, cid, self._model)
                try:
                    result = check_result(plan.algorithm.client_update(client), plan, cid)
                except Exception as exc:
                    raise as_client_error(cid, exc) from exc
                consume(position, cid, result)

"""The process executor: clients train in a persistent pool of worker processes.

The pool (:mod:`emberfl.core._process_pool`, shared with BlazeFL-style process trainers)
starts ``num_parallels`` workers once, forked where that is safe and spawned otherwise.
Per round:

* the broadcast is written once into a shared arena, and every worker reads it in place;
* the algorithm, the data set and the model travel to each worker once and stay there;
* a client's per-client state is read and written **in place** in the parent's
  :class:`~emberfl.state_store.ClientStateStore` arenas, which the worker attaches to;
* a worker writes its client's uplink into one of ``2 * num_parallels`` shared slots, and
  the parent folds it straight from the slot (no copy, no pickle) before the slot goes to
  another client.

So the parent holds at most ``2 * num_parallels`` uplinks, and results are consumed in
client-list order. A worker that raises gives a :class:`~emberfl.errors.ClientError` with
the worker's traceback (the pool stays usable); one that dies gives a
:class:`~emberfl.errors.WorkerDiedError` and the pool restarts on the next round.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from emberfl.algorithms.base import Algorithm, Client, ClientResult, ModelLayout, Split
from emberfl.core._process_pool import ProcessPool, StartMethod, resolve_start_method
from emberfl.core.shared_memory import SHMHandle
from emberfl.errors import TensorMismatchError
from emberfl.executors.base import (
    ClientSetup,
    Consume,
    Executor,
    RoundPlan,
    check_positive_int,
    check_result,
)
from emberfl.state_store import StateLocation, attach_state

__all__ = ["ModelTemplate", "ProcessExecutor"]


class ModelTemplate:
    """A model that travels to worker processes as one pickle, unpickled once there.

    Objects shared by every client are sent to each worker once, with their tensors moved
    to shared memory as plain tensors; this wrapper holds the model's pickle instead, so its
    parameters come back as ``nn.Parameter`` with their ``requires_grad``.

    Workers only copy it (``copy.deepcopy(template.model)``), so the process pool hands every
    client of a worker the same instance (``_emberfl_read_only``) instead of a private copy.

    Attributes:
        data: The model, pickled.
    """

    _emberfl_read_only = True

    def __init__(self, model: nn.Module) -> None:
        """Pickle ``model``.

        Raises:
            Exception: Whatever pickling the model raises (a lambda, a local class).
        """
        self.data = pickle.dumps(model)
        self._model: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        """The model (unpickled on first use, then cached)."""
        if self._model is None:
            self._model = pickle.loads(self.data)
        return self._model

    def __getstate__(self) -> dict[str, Any]:
        """Send the pickle only."""
        return {"data": self.data, "_model": None}


@dataclass
class _Shared:
    """Everything the round's clients share; sent to each worker once and kept there."""

    algorithm: Algorithm
    dataset: Any
    model: ModelTemplate
    layout: ModelLayout
    batch_size: int
    seed: int
    streams: dict[str, int]


@dataclass
class _Task:
    """One client of a round."""

    shared: _Shared
    cid: int
    round: int
    num_samples: int
    state: StateLocation | None
    state_is_new: bool


def _loader_factory(shared: _Shared, cid: int) -> Any:
    def make(split: Split, generator: torch.Generator) -> Any:
        return shared.dataset.get_dataloader(
            split, cid, batch_size=shared.batch_size, generator=generator
        )

    return make


def _process_client(
    task: _Task,
    payload: dict[str, torch.Tensor],
    device: str,
    stop_event: Any,
    *,
    shm_buffer: ClientResult | None = None,
) -> ClientResult:
    """Train one client in a worker process and leave its uplink in ``shm_buffer``."""
    shared = task.shared
    state = attach_state(task.state) if task.state is not None else {}
    client = Client(
        cid=task.cid,
        round=task.round,
        seed=shared.seed,
        device=device,
        model=shared.model.model,
        layout=shared.layout,
        broadcast=payload,
        state=state,
        state_is_new=task.state_is_new,
        loader_factory=_loader_factory(shared, task.cid),
        num_samples=task.num_samples,
        stop_event=stop_event,
    )
    result = shared.algorithm.client_update(client)
    if not isinstance(result, ClientResult):
        raise TensorMismatchError(
            f"client {task.cid}: {type(shared.algorithm).__name__}.client_update returned a "
            f"{type(result).__name__}, not a ClientResult"
        )
    if shm_buffer is None:
        raise RuntimeError("the process executor always provides an uplink buffer")
    if set(result.uplink) != set(shared.streams):
        raise TensorMismatchError(
            f"client {task.cid}: {type(shared.algorithm).__name__} declared uplink streams "
            f"{sorted(shared.streams)} but the client sent {sorted(result.uplink)}"
        )
    for name, tensor in result.uplink.items():
        target = shm_buffer.uplink[name]
        if not isinstance(tensor, torch.Tensor) or tensor.numel() != target.numel():
            got = (
                f"a {tensor.dtype} tensor of shape {tuple(tensor.shape)}"
                if isinstance(tensor, torch.Tensor)
                else f"a {type(tensor).__name__}"
            )
            raise TensorMismatchError(
                f"client {task.cid} sent uplink {name!r} as {got}; "
                f"{type(shared.algorithm).__name__} declares {target.numel()} values"
            )
        target.copy_(tensor.detach().reshape(-1))
    result.uplink = {name: SHMHandle() for name in result.uplink}  # type: ignore[misc]
    return result


class ProcessExecutor(Executor):
    """Clients in a persistent pool of ``num_parallels`` worker processes.

    Use it as a context manager, or call :meth:`close`, to stop the workers.

    Attributes:
        num_parallels: Worker processes.
        start_method: How they start (``"auto"``: forked where safe, else spawned).
        drain_timeout_s: After an error or Ctrl-C, how long running clients get to stop
            before the workers are killed.
    """

    name: ClassVar[str] = "process"

    def __init__(
        self,
        setup: ClientSetup,
        *,
        num_parallels: int,
        intra_op_threads: int | None = 1,
        client_timeout: float | None = None,
        start_method: StartMethod = "auto",
        drain_timeout_s: float = 10.0,
    ) -> None:
        """Create the executor; the workers start on the first round (or :meth:`start`).

        Args:
            setup: The clients' setup (its data set and model are sent to each worker
                once: mutate them only before the first round, or :meth:`close` after).
            num_parallels: Worker processes (>= 1).
            intra_op_threads: PyTorch's intra-op thread count in each worker.
            client_timeout: Seconds a client may train before the round fails with a
                :class:`~emberfl.errors.ClientTimeoutError` (``None``: no limit).
            start_method: ``"auto"``, ``"fork"``, ``"spawn"`` or ``"forkserver"``.
            drain_timeout_s: Grace period for running clients after an error.

        Raises:
            ConfigError: ``num_parallels < 1``.
        """
        check_positive_int("num_parallels", num_parallels)
        super().__init__(setup, intra_op_threads=intra_op_threads, client_timeout=client_timeout)
        self.num_parallels = num_parallels
        self.start_method: StartMethod = start_method
        self.drain_timeout_s = drain_timeout_s
        self._event_context = ""
        self._stop_event_for(self._start_method())
        self._template = ModelTemplate(setup.template())
        self._pool: ProcessPool | None = None
        self._shared: _Shared | None = None
        self._device_count = torch.cuda.device_count() if setup.device == "cuda" else 0

    @property
    def parallelism(self) -> int:
        """Worker processes."""
        return self.num_parallels

    def start(self) -> None:
        """Start the worker processes now (idempotent)."""
        self._live_pool()

    def pids(self) -> list[int]:
        """The worker processes' ids (empty before they start)."""
        return [] if self._pool is None or self._pool.closed else self._pool.pids()

    def _start_method(self) -> str:
        device = str(self.setup.device)
        return resolve_start_method(self.start_method, self.intra_op_threads, device)

    def _stop_event_for(self, method: str) -> None:
        """Make ``stop_event`` an event of ``method``'s kind. A forked worker inherits an
        unnamed semaphore; a spawned one needs a named one, which multiprocessing's
        resource tracker unlinks (and warns about) if this process is killed."""
        context = "fork" if method == "fork" else "spawn"
        if context != self._event_context:
            event = multiprocessing.get_context(context).Event()
            self.stop_event = event  # type: ignore[assignment]
            self._event_context = context

    def _live_pool(self) -> ProcessPool:
        if self._pool is not None and self._pool.alive():
            return self._pool
        if self._pool is not None:
            self._pool.close()
        method = self._start_method()  # CUDA may have been initialised since
        self._stop_event_for(method)
        self._pool = ProcessPool(
            self.num_parallels,
            self.stop_event,
            intra_op_threads=self.intra_op_threads,
            drain_timeout_s=self.drain_timeout_s,
            start_method=cast(StartMethod, method),
            device=str(self.setup.device),
        )
        return self._pool

    def _shared_for(self, plan: RoundPlan) -> _Shared:
        streams = {name: spec.dim for name, spec in plan.streams.items()}
        shared = self._shared
        if (
            shared is None
            or shared.algorithm is not plan.algorithm
            or shared.layout != plan.layout
            or shared.streams != streams
        ):
            shared = _Shared(
                algorithm=plan.algorithm,
                dataset=self.setup.dataset,
                model=self._template,
                layout=plan.layout,
                batch_size=self.setup.batch_size,
                seed=self.setup.seed,
                streams=streams,
            )
            self._shared = shared
        return shared

    def _device(self, cid: int) -> str:
        if self.setup.device == "cuda" and self._device_count > 0:
            return f"cuda:{cid % self._device_count}"
        return self.setup.device

    def run(self, plan: RoundPlan, consume: Consume) -> None:
        """Train ``plan.cids`` in the workers, calling ``consume`` in order (see :class:`Executor`).

        Raises:
            ClientError: A client raised in its worker (with the worker's traceback).
            WorkerDiedError: A worker process died; the pool restarts next round.
            TensorMismatchError: A client's uplink does not match the declared streams.
        """
        if not plan.cids:
            return
        pool = self._live_pool()
        shared = self._shared_for(plan)
        template = ClientResult(
            uplink={
                n: torch.zeros(spec.dim, dtype=torch.float32) for n, spec in plan.streams.items()
            },
            num_samples=0,
        )
        clients = []
        for cid in plan.cids:
            location = None
            is_new = True
            if plan.state is not None:
                location = plan.state.location(cid)
                is_new = not plan.state.is_written(cid)
            task = _Task(shared, cid, plan.round, self.setup.num_samples(cid), location, is_new)
            clients.append((cid, self._device(cid), task))
        self.stop_event.clear()
        try:
            jobs = pool.start_round(
                _process_client,
                dict(plan.broadcast),
                template,
                clients,
                borrow=True,
                pin=[shared],
                check_payload=True,
                timeout=self.client_timeout,
            )
            for position, job in enumerate(jobs):
                result = check_result(job.get(), plan, job.cid)
                try:
                    consume(position, job.cid, result)
                finally:
                    # A view of shared memory: an error's traceback must not keep it.
                    del result
                    job.release()
        finally:
            self.stop_event.set()
            pool.finish_round()

    def close(self) -> None:
        """Stop the workers and release the shared memory. Idempotent."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._shared = None

    def __del__(self) -> None:
        """Stop the workers when the executor is garbage collected."""
        with contextlib.suppress(Exception):
            self.close()

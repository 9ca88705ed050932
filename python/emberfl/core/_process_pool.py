"""The persistent worker-process pool behind :class:`~emberfl.core.ProcessPoolClientTrainer`.

Design:

* ``P`` worker processes are started once and reused for every round until
  :meth:`ProcessPool.close` (called by the trainer's ``shutdown()``, its context manager,
  or garbage collection).
* How they start (:data:`StartMethod`): ``"auto"`` forks them from the parent when that is
  safe (Linux, CPU clients, CUDA not initialised in the parent, one intra-op thread per
  worker) and spawns them otherwise. A forked worker starts in milliseconds, a spawned one
  imports PyTorch (seconds). A forked worker closes its copies of every pool's pipe ends at
  once, so a parent that dies still ends every worker's ``recv`` with EOF.
* Each worker talks to the parent over its own pipe; the parent waits on the pipes and
  the processes' sentinels at once, so a worker that dies is noticed at once.
* Tensors never go through the pipes. The downlink payload's tensors are written once
  per round into a one-slot arena and every worker rebuilds the payload from zero-copy
  views. Uplink buffers live in an arena of work slots plus one slot holding the buffer's
  initial values; each task is given a free work slot when it is dispatched. By default
  (``P`` work slots) the parent copies a client's result out of its slot as soon as it
  arrives; with ``borrow=True`` (``2 * P`` work slots, what emberfl's process executor
  uses) the result is handed over as views of its slot, which stays reserved until the
  consumer releases it, so results are folded without a copy while workers go on. Either
  way shared memory is bounded by the parallelism, not by the number of clients.
* Objects shared by several client configs (data sets, model selectors) are sent to each
  worker once and cached there; their tensors go into their own arena, shared by all
  workers.
* Results are handed back in ``cid_list`` order whatever order the clients finish in.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import pickle
import signal
import sys
import time
import traceback
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from multiprocessing.connection import Connection, wait
from pathlib import PurePath
from typing import Any, Generic, Literal, TypeVar, get_args

import torch

from emberfl.core._transport import PackedLayout, adopt_tensors, pack, unpack, write_tensors
from emberfl.core._tree import map_tensors
from emberfl.core.shared_memory import reconstruct_from_shared_memory
from emberfl.errors import (
    ClientError,
    ClientTimeoutError,
    ConfigError,
    EmberflError,
    PayloadWriteError,
    TensorMismatchError,
    WorkerDiedError,
)

__all__ = ["ClientJob", "ProcessPool", "StartMethod", "resolve_start_method"]

B = TypeVar("B")

StartMethod = Literal["auto", "fork", "spawn", "forkserver"]
"""How worker processes start: ``"fork"`` (a copy of the parent, milliseconds),
``"spawn"`` (a fresh interpreter that imports PyTorch, seconds), ``"forkserver"`` (forked
from a server process that has imported PyTorch once) or ``"auto"`` (see
:func:`resolve_start_method`)."""

_PICKLE_PROTOCOL = 5
_POLL_S = 0.5
_SIMPLE_TYPES = (str, bytes, int, float, complex, bool, type(None), Enum, PurePath)


# Parent ends of the pipes of every live pool in this process, by id. A forked worker closes
# its copies at once: otherwise a worker would keep the other workers' pipes open and none
# of them would see EOF if the parent died.
_PARENT_CONNS: dict[int, Connection] = {}


def resolve_start_method(
    start_method: str, intra_op_threads: int | None, device: str = "cpu"
) -> str:
    """Return the start method a pool uses for ``start_method``.

    ``"auto"`` is ``"fork"`` on Linux when the clients train on the CPU, CUDA is not
    initialised in this process and the workers run one intra-op thread, and ``"spawn"``
    otherwise: a child forked after CUDA was initialised cannot use CUDA (and on a GPU the
    seconds a spawned worker takes to start matter little), and PyTorch's OpenMP runtime
    (GNU libgomp) hangs in a forked child that runs more than one thread once the parent
    has used its thread pool.

    Args:
        start_method: A :data:`StartMethod`.
        intra_op_threads: The workers' ``torch.set_num_threads`` value.
        device: Where the clients train (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).

    Returns:
        ``"fork"``, ``"spawn"`` or ``"forkserver"``.

    Raises:
        ConfigError: For an unknown start method, or one this platform lacks.
    """
    if start_method not in get_args(StartMethod):
        raise ConfigError(
            f"start_method={start_method!r} is not one of {', '.join(get_args(StartMethod))}"
        )
    if start_method == "auto":
        fork_ok = (
            sys.platform.startswith("linux")
            and torch.device(device).type == "cpu"
            and intra_op_threads == 1
            and not torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        )
        return "fork" if fork_ok else "spawn"
    if start_method not in multiprocessing.get_all_start_methods():
        raise ConfigError(f"start_method={start_method!r} is not available on {sys.platform}")
    return start_method


def _new_arena(num_floats: int, num_slots: int) -> Any:
    from emberfl.arena import ParamArena

    template = {"packed": torch.zeros(num_floats, dtype=torch.float32)}
    return ParamArena.from_model(template, num_slots)


def _attach_arena(handle: Any, *, private: bool = False) -> Any:
    from emberfl.arena import ParamArena

    return ParamArena.attach(handle, private=private)


def _close_quietly(arena: Any) -> None:
    if arena is not None:
        with contextlib.suppress(Exception):
            arena.close()


# --------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------


def _read_only(obj: Any) -> bool:
    # emberfl's own immutable carriers (ModelTemplate): never re-checked, never copied.
    return bool(getattr(type(obj), "_emberfl_read_only", False))


class _StickyUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, state: _WorkerState, fresh: bool) -> None:
        super().__init__(io.BytesIO(data))
        self._state = state
        self._fresh = fresh
        self._copies: dict[int, Any] = {}

    def persistent_load(self, pid: Any) -> Any:
        shared = self._state.sticky[pid]
        if not self._fresh or _read_only(shared):
            return shared
        # A private copy for this client, as if its config had been pickled for it alone
        # (tensors stay zero-copy views of the shared arena).
        if pid not in self._copies:
            self._copies[pid] = self._state.rebuild_sticky(pid)
        return self._copies[pid]


@dataclass
class _WorkerState:
    index: int
    stop_event: Any
    worker_fn: Callable[..., Any] | None = None
    payload_skeleton: Any = None
    down_layout: PackedLayout | None = None
    down_arena: Any = None
    down_handle: Any = None
    down_gen: int = -1
    up_gen: int = -1
    up_layout: PackedLayout | None = None
    up_skeleton: Any = None
    up_arena: Any = None
    template_slot: int = 0
    sticky: dict[int, Any] = field(default_factory=dict)
    sticky_raw: dict[int, tuple[bytes, PackedLayout | None]] = field(default_factory=dict)
    sticky_arenas: dict[int, Any] = field(default_factory=dict)

    def rebuild_sticky(self, token: int) -> Any:
        data, layout = self.sticky_raw[token]
        obj = pickle.loads(data)
        arena = self.sticky_arenas.get(token)
        if layout is not None and arena is not None:
            obj = unpack(obj, layout, arena.slot(0), clone=False)
        return obj

    def shared_storages(self, *extra: Any) -> set[int]:
        ptrs = set()
        for arena in (self.down_arena, self.up_arena, *self.sticky_arenas.values(), *extra):
            if arena is not None:
                ptrs.add(arena.slot(0).untyped_storage().data_ptr())
        return ptrs

    def close(self) -> None:
        self.sticky.clear()
        self.sticky_raw.clear()
        for arena in (self.down_arena, self.up_arena, *self.sticky_arenas.values()):
            _close_quietly(arena)
        self.sticky_arenas.clear()
        self.down_arena = self.up_arena = None


def _worker_main(
    index: int, conn: Connection, stop_event: Any, intra_op_threads: int | None
) -> None:
    """Entry point of a worker process: serve messages until told to exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # A forked worker inherits the parent's Python handlers: terminate() must end it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for inherited in _PARENT_CONNS.values():  # non-empty in a forked worker only
        inherited.close()
    _PARENT_CONNS.clear()
    if intra_op_threads is not None:
        torch.set_num_threads(intra_op_threads)
    state = _WorkerState(index=index, stop_event=stop_event)
    exit_code = 0
    try:
        _serve(state, conn)
    except BaseException:
        traceback.print_exc()
        exit_code = 1
    finally:
        state.close()
        conn.close()
        # Skip interpreter teardown: PyTorch's exit handlers take about a second, and the
        # worker owns nothing that needs them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def _serve(state: _WorkerState, conn: Connection) -> None:
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the parent went away (closed, reset or killed): nothing to report
        kind = message[0]
        if kind == "exit":
            return
        if kind == "task":
            reply = _run_task(state, *message[1:])
            try:
                conn.send_bytes(reply)
            except OSError:
                return  # the parent went away while the client trained
        else:
            _apply_control(state, message)


def _apply_control(state: _WorkerState, message: tuple[Any, ...]) -> None:
    kind = message[0]
    if kind == "payload":
        _, worker_fn, skeleton, layout, handle, generation = message
        state.worker_fn = worker_fn
        state.payload_skeleton = skeleton
        state.down_layout = layout
        if generation != state.down_gen:
            _close_quietly(state.down_arena)
            state.down_arena = _attach_arena(handle) if handle is not None else None
            state.down_handle = handle
            state.down_gen = generation
    elif kind == "uplink":
        _, skeleton, layout, handle, template_slot, generation = message
        state.up_skeleton, state.up_layout, state.template_slot = skeleton, layout, template_slot
        if generation != state.up_gen:
            _close_quietly(state.up_arena)
            state.up_arena = _attach_arena(handle) if handle is not None else None
            state.up_gen = generation
    elif kind == "sticky":
        _, token, data, layout, handle = message
        obj = pickle.loads(data)
        if handle is not None:
            # Copy-on-write: a client that writes into a shared object's tensors changes
            # neither the parent's copy nor the other workers'.
            arena = _attach_arena(handle, private=True)
            state.sticky_arenas[token] = arena
            obj = unpack(obj, layout, arena.slot(0), clone=False)
        state.sticky[token] = obj
        state.sticky_raw[token] = (data, layout)
    elif kind == "forget":
        for token in message[1]:
            state.sticky.pop(token, None)
            state.sticky_raw.pop(token, None)
            _close_quietly(state.sticky_arenas.pop(token, None))


def _run_task(
    state: _WorkerState,
    task_id: int,
    cid: int,
    device: str,
    config_bytes: bytes,
    slot_index: int,
    fresh: bool,
    check_payload: bool,
) -> bytes:
    own_payload = None
    try:
        config = _StickyUnpickler(config_bytes, state, fresh).load()
        payload = state.payload_skeleton
        if state.down_layout is not None and state.down_arena is not None:
            # Each client reads the payload through its own copy-on-write mapping: a
            # client that writes into it cannot change what the other clients start from.
            own_payload = _attach_arena(state.down_handle, private=True)
            payload = unpack(payload, state.down_layout, own_payload.slot(0), clone=False)
        shm_buffer = None
        slot = None
        if state.up_layout is not None and state.up_arena is not None:
            slot = state.up_arena.slot(slot_index)
            slot.copy_(state.up_arena.slot(state.template_slot))
            shm_buffer = unpack(state.up_skeleton, state.up_layout, slot, clone=False)
        elif state.up_skeleton is not None:
            shm_buffer = pickle.loads(pickle.dumps(state.up_skeleton))
        assert state.worker_fn is not None
        result = state.worker_fn(config, payload, device, state.stop_event, shm_buffer=shm_buffer)
        if check_payload and own_payload is not None and state.down_layout is not None:
            changed = _changed_entry(
                state.down_layout, own_payload.slot(0), state.down_arena.slot(0)
            )
            if changed is not None:
                return pickle.dumps(("payload_write", task_id, changed))
        if slot is not None and state.up_layout is not None:
            adopt_tensors(shm_buffer, state.up_layout, slot, cid=cid, what="uplink buffer")
        shared = state.shared_storages(own_payload)

        def detach_shared(_path: str, tensor: torch.Tensor) -> torch.Tensor:
            # A view into an arena would pickle the whole arena: send a private copy.
            if tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() in shared:
                return tensor.clone()
            return tensor

        result = map_tensors(result, detach_shared)
        return pickle.dumps(("done", task_id, pickle.dumps(result, _PICKLE_PROTOCOL)))
    except TensorMismatchError as exc:
        return pickle.dumps(("mismatch", task_id, str(exc)))
    except BaseException as exc:
        try:
            exc_bytes: bytes | None = pickle.dumps(exc, _PICKLE_PROTOCOL)
        except Exception:
            exc_bytes = None
        return pickle.dumps(
            (
                "error",
                task_id,
                f"{type(exc).__name__}: {exc}",
                traceback.format_exc(),
                exc_bytes,
            )
        )
    finally:
        # Views of it that the client kept alive keep the mapping; the rest goes now.
        _close_quietly(own_payload)


def _changed_entry(layout: PackedLayout, own: torch.Tensor, shared: torch.Tensor) -> str | None:
    """Return the path of the first payload tensor whose bytes differ between the slots."""
    raw_own, raw_shared = own.view(torch.int32), shared.view(torch.int32)
    if torch.equal(raw_own, raw_shared):
        return None
    for index, entry in enumerate(layout.entries):
        if not torch.equal(
            layout.view(own, index).view(torch.uint8), layout.view(shared, index).view(torch.uint8)
        ):
            return entry.path or "<package>"
    return "<padding>"


# --------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: Any
    conn: Connection
    task: int | None = None  # index into the round's tasks
    started: float = 0.0  # time.monotonic() when the task was sent
    sent_tokens: set[int] = field(default_factory=set)


@dataclass
class _Sticky:
    token: int
    obj: Any  # strong reference: keeps id(obj) from being reused
    data: bytes
    layout: PackedLayout | None
    arena: Any
    marks: list[tuple[torch.Tensor, int]]  # each tensor and its version counter


def _tensor_marks(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
    # An in-place change bumps a tensor's version counter (shared by its views); a new
    # tensor is another object.
    return [(t, t._version) for t in tensors]


def _same_marks(a: list[tuple[torch.Tensor, int]], b: list[tuple[torch.Tensor, int]]) -> bool:
    return len(a) == len(b) and all(
        ta is tb and va == vb for (ta, va), (tb, vb) in zip(a, b, strict=True)
    )


@dataclass
class _Task:
    cid: int
    device: str
    config_bytes: bytes
    tokens: list[int]
    slot: int = -1  # the uplink slot it writes into, once dispatched


class _Resources:
    """Everything the pool must release; closed by the pool or by its finalizer."""

    def __init__(self) -> None:
        self.workers: list[_Worker] = []
        self.arenas: list[Any] = []
        self.closed = False

    def close(self, *, graceful: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        for worker in self.workers:
            if graceful and worker.process.is_alive():
                with contextlib.suppress(OSError):
                    worker.conn.send_bytes(pickle.dumps(("exit",)))
        deadline = time.monotonic() + (2.0 if graceful else 0.0)
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(2.0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            _PARENT_CONNS.pop(id(worker.conn), None)
            worker.conn.close()
            worker.process.close()
        self.workers.clear()
        for arena in self.arenas:
            _close_quietly(arena)
        self.arenas.clear()


class ClientJob(Generic[B]):
    """One client's pending result in process-pool mode (what ``progress_fn`` iterates).

    Attributes:
        cid: The client id.
    """

    def __init__(self, pool: ProcessPool, index: int, cid: int) -> None:
        """Create the job (done by the pool).

        Args:
            pool: The pool running the round.
            index: Position in ``cid_list``.
            cid: The client id.
        """
        self._pool = pool
        self._index = index
        self.cid = cid

    def ready(self) -> bool:
        """Return whether the client's result has arrived."""
        return self._pool._ready(self._index)

    def release(self) -> None:
        """Give back the shared memory of a borrowed result (see :meth:`ProcessPool.start_round`).

        The result's tensors must not be used afterwards: the slot goes to another client.
        Idempotent; a no-op for copied results.
        """
        self._pool._release(self._index)

    def get(self) -> B:
        """Wait for the client's result (running the pool meanwhile) and return it.

        Returns:
            The client's buffer package, rebuilt from the arena.

        Raises:
            ClientError: If any client of the round failed.
            WorkerDiedError: If a worker process died.
        """
        result: B = self._pool._wait(self._index)
        return result


class ProcessPool:
    """A persistent pool of worker processes (private to emberfl.core)."""

    def __init__(
        self,
        num_workers: int,
        stop_event: Any,
        *,
        intra_op_threads: int | None,
        drain_timeout_s: float,
        start_method: StartMethod = "spawn",
        device: str = "cpu",
        mirror_event: Any = None,
    ) -> None:
        """Start ``num_workers`` worker processes.

        Args:
            num_workers: How many processes.
            stop_event: A multiprocessing event handed to every worker.
            mirror_event: An event of the caller's (e.g. a ``threading.Event``) that the
                workers cannot share: while a round runs, ``stop_event`` is set as soon
                as this one is.
            intra_op_threads: ``torch.set_num_threads`` value in each worker.
            drain_timeout_s: How long to wait for running clients to stop after an error
                or Ctrl-C before killing the workers.
            start_method: How the workers start (:func:`resolve_start_method`).
            device: Where the clients train (for ``start_method="auto"``).
        """
        self.requested_start_method = start_method
        self.start_method = resolve_start_method(start_method, intra_op_threads, device)
        ctx: Any = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            ctx.set_forkserver_preload(["torch", __name__])
        self.num_workers = num_workers
        self.stop_event = stop_event
        self.mirror_event = mirror_event
        self.user_stop_event = mirror_event if mirror_event is not None else stop_event
        self._fresh = False
        self._check_payload = False
        self._timeout: float | None = None
        self.intra_op_threads = intra_op_threads
        self.drain_timeout_s = drain_timeout_s
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, self._res.close)
        self._down_arena: Any = None
        self._down_layout: PackedLayout | None = None
        self._up_arena: Any = None
        self._up_layout: PackedLayout | None = None
        self._up_skeleton: Any = None
        self._down_gen = 0
        self._up_gen = 0
        self._retired: list[Any] = []
        self._sticky: dict[int, _Sticky] = {}
        self._next_token = 0
        self._tasks: list[_Task] = []
        self._results: list[Any] = []
        self._done: list[bool] = []
        self._next_task = 0
        self._failure: BaseException | None = None
        self._borrow = False
        self._free_slots: list[int] = []
        self._held: dict[int, int] = {}  # task index -> slot of a borrowed result
        try:
            for index in range(num_workers):
                parent_conn, child_conn = multiprocessing.Pipe(duplex=True)
                process = ctx.Process(
                    target=_worker_main,
                    args=(index, child_conn, stop_event, intra_op_threads),
                    name=f"emberfl-worker-{index}",
                    daemon=True,
                )
                # Registered before the fork: the worker closes its copy of its own
                # parent end too.
                _PARENT_CONNS[id(parent_conn)] = parent_conn
                try:
                    with warnings.catch_warnings():
                        # Python >= 3.12 warns about fork() in a process with threads;
                        # resolve_start_method only forks where the worker is safe.
                        warnings.filterwarnings(
                            "ignore", "This process .* is multi-threaded", DeprecationWarning
                        )
                        process.start()
                except BaseException:
                    _PARENT_CONNS.pop(id(parent_conn), None)
                    parent_conn.close()
                    raise
                finally:
                    child_conn.close()
                self._res.workers.append(_Worker(index, process, parent_conn))
        except BaseException:
            self.close(graceful=False)
            raise

    @property
    def closed(self) -> bool:
        """Whether the pool has been shut down."""
        return self._res.closed

    def pids(self) -> list[int]:
        """Return the worker processes' ids."""
        return [w.process.pid for w in self._res.workers]

    def alive(self) -> bool:
        """Return whether every worker process is running."""
        return not self.closed and all(w.process.is_alive() for w in self._res.workers)

    def close(self, *, graceful: bool = True) -> None:
        """Stop the workers and release every arena. Idempotent.

        Args:
            graceful: Ask the workers to exit (and wait briefly) before terminating them.
        """
        self._res.arenas.extend(a for a in (self._down_arena, self._up_arena) if a is not None)
        self._res.arenas.extend(s.arena for s in self._sticky.values() if s.arena is not None)
        self._res.arenas.extend(self._retired)
        self._sticky.clear()
        self._retired.clear()
        self._down_arena = self._up_arena = None
        # Drop the round's results too: a borrowed result is a view of an arena, and an
        # error's traceback keeps this pool (and so the arena's memory) alive.
        self._tasks, self._results, self._done, self._held = [], [], [], {}
        self._up_skeleton = None
        self._res.close(graceful=graceful)
        self._finalizer.detach()

    # -- round setup -------------------------------------------------------------------

    def start_round(
        self,
        worker_fn: Callable[..., Any],
        payload: Any,
        uplink_template: Any,
        clients: Sequence[tuple[int, str, Any]],
        *,
        borrow: bool = False,
        pin: Sequence[Any] = (),
        fresh_shared: bool = False,
        check_payload: bool = False,
        timeout: float | None = None,
    ) -> list[ClientJob[Any]]:
        """Prepare a round and return one job per client, in ``clients`` order.

        Args:
            worker_fn: The trainer's static ``worker``.
            payload: The downlink package.
            uplink_template: ``prepare_uplink_package_buffer()``'s result, or ``None``.
            clients: ``(cid, device, config)`` per client.
            borrow: Hand results back as views of their uplink slot instead of copies.
                The slot stays reserved until :meth:`ClientJob.release`; the pool has
                ``2 * num_workers`` slots, so workers keep going while up to
                ``num_workers`` results wait to be consumed in order.
            pin: Objects of the configs that are sent to each worker once and kept
                there even when only one config of the round holds them.
            fresh_shared: Give each client its own copy of the objects shared by several
                configs (rebuilt in the worker from what was sent once), so that a client
                changing them does not affect the next client of the same worker. Without
                it, a worker's clients share one copy (which may keep caches). Objects
                whose class sets ``_emberfl_read_only = True`` are always shared (and not
                checked for changes).
            check_payload: Fail the round with a :class:`~emberfl.errors.PayloadWriteError`
                when a client wrote into the payload. Either way each client reads the
                payload through its own copy-on-write mapping, so a write never reaches
                the other clients.
            timeout: Seconds a client may train; a client still running after that fails
                the round with a :class:`~emberfl.errors.ClientTimeoutError` and the
                workers are killed (the pool is closed; start a new one).

        Returns:
            The jobs; clients are dispatched as jobs are waited on.
        """
        if self.closed:
            raise RuntimeError("the process pool is shut down")
        self._failure = None
        for arena in self._retired:
            _close_quietly(arena)
        self._retired.clear()
        self._borrow = borrow
        self._fresh = fresh_shared
        self._check_payload = check_payload
        self._timeout = timeout
        self._held = {}
        self._broadcast_payload(worker_fn, payload)
        self._prepare_uplink(uplink_template)
        self._tasks = self._prepare_tasks(clients, pin)
        self._results = [None] * len(self._tasks)
        self._done = [False] * len(self._tasks)
        self._next_task = 0
        self._dispatch()
        return [ClientJob(self, i, task.cid) for i, task in enumerate(self._tasks)]

    def _send(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        try:
            data = pickle.dumps(message, _PICKLE_PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"could not pickle a message for the worker processes ({exc}); the trainer's "
                "worker must be a static method of a module-level class and packages must "
                "be picklable"
            ) from exc
        try:
            worker.conn.send_bytes(data)
        except OSError as exc:
            self._raise_died(worker, cause=exc)

    def _retire(self, arena: Any) -> None:
        # Workers may still have to attach an arena announced earlier, so a replaced arena
        # is closed at the start of the next round, once every worker has gone idle.
        if arena is not None:
            self._retired.append(arena)

    def _broadcast_payload(self, worker_fn: Callable[..., Any], payload: Any) -> None:
        skeleton, layout, tensors = pack(payload)
        if not tensors:
            self._broadcast(("payload", worker_fn, skeleton, None, None, -1))
            return
        if self._down_arena is None or self._down_layout != layout:
            self._retire(self._down_arena)
            self._down_arena = _new_arena(layout.num_floats, 1)
            self._down_layout = layout
            self._down_gen += 1
        write_tensors(layout, self._down_arena.slot(0), tensors)
        self._broadcast(
            ("payload", worker_fn, skeleton, layout, self._down_arena.handle, self._down_gen)
        )

    def _prepare_uplink(self, template: Any) -> None:
        self._free_slots = []
        if template is None:
            self._up_skeleton = self._up_layout = None
            self._broadcast(("uplink", None, None, None, 0, -1))
            return
        skeleton, layout, tensors = pack(template)
        if not tensors:
            self._up_skeleton, self._up_layout = skeleton, None
            self._broadcast(("uplink", skeleton, None, None, 0, -1))
            return
        work_slots = self.num_workers * (2 if self._borrow else 1)
        if (
            self._up_arena is None
            or self._up_layout != layout
            or self._up_arena.num_slots < work_slots + 1
        ):
            self._retire(self._up_arena)
            self._up_arena = _new_arena(layout.num_floats, work_slots + 1)
            self._up_layout = layout
            self._up_gen += 1
        self._up_skeleton = skeleton
        template_slot = self._up_arena.num_slots - 1
        self._free_slots = list(range(template_slot - 1, -1, -1))
        write_tensors(layout, self._up_arena.slot(template_slot), tensors)
        handle = self._up_arena.handle
        self._broadcast(("uplink", skeleton, layout, handle, template_slot, self._up_gen))

    def _broadcast(self, message: tuple[Any, ...]) -> None:
        for worker in self._res.workers:
            self._send(worker, message)

    def _prepare_tasks(
        self, clients: Sequence[tuple[int, str, Any]], pin: Sequence[Any] = ()
    ) -> list[_Task]:
        # Objects shared by several configs (or already cached) are sent once per worker.
        counts: Counter[int] = Counter({id(obj): 2 for obj in pin})
        candidates: dict[int, Any] = {id(obj): obj for obj in pin}
        for _, _, config in clients:
            for value in _top_level_values(config):
                if not isinstance(value, (*_SIMPLE_TYPES, torch.Tensor)):
                    counts[id(value)] += 1
                    candidates[id(value)] = value
        keep = {oid for oid, n in counts.items() if n >= 2 or oid in self._sticky}
        # An object changed in this process since it was sent (a data set the user
        # updated between rounds) is sent again: workers must see what a fresh pickle
        # of the config would show them.
        changed = {
            oid: packed
            for oid in keep
            if oid in self._sticky
            and not _read_only(self._sticky[oid].obj)
            and (packed := self._repacked_if_changed(self._sticky[oid])) is not None
        }
        dropped = [s.token for oid, s in self._sticky.items() if oid not in keep or oid in changed]
        if dropped:
            self._broadcast(("forget", dropped))
            for worker in self._res.workers:
                worker.sent_tokens.difference_update(dropped)
            for oid in [oid for oid in self._sticky if oid not in keep or oid in changed]:
                self._retire(self._sticky.pop(oid).arena)
        for oid in keep:
            if oid not in self._sticky:
                self._sticky[oid] = self._make_sticky(candidates[oid], changed.get(oid))
        tokens_by_id = {oid: s.token for oid, s in self._sticky.items()}
        tasks = []
        for cid, device, config in clients:
            used: list[int] = []
            buffer = io.BytesIO()
            pickler = _StickyPickler(buffer, tokens_by_id, used)
            try:
                pickler.dump(config)
            except Exception as exc:
                raise ClientError(
                    cid, f"its config could not be pickled for a worker process: {exc}"
                ) from exc
            tasks.append(_Task(cid, device, buffer.getvalue(), used))
        return tasks

    def _repacked_if_changed(self, sticky: _Sticky) -> _Packed | None:
        packed = _pack_sticky(sticky.obj)
        layout = packed.layout if packed.tensors else None
        if (
            packed.data == sticky.data
            and layout == sticky.layout
            and _same_marks(_tensor_marks(packed.tensors), sticky.marks)
        ):
            return None
        return packed

    def _make_sticky(self, obj: Any, packed: _Packed | None = None) -> _Sticky:
        token = self._next_token
        self._next_token += 1
        if packed is None:
            packed = _pack_sticky(obj)
        arena = None
        if packed.tensors:
            arena = _new_arena(packed.layout.num_floats, 1)
            write_tensors(packed.layout, arena.slot(0), packed.tensors)
        return _Sticky(
            token,
            obj,
            packed.data,
            packed.layout if packed.tensors else None,
            arena,
            _tensor_marks(packed.tensors),
        )

    # -- running -----------------------------------------------------------------------

    def _ready(self, index: int) -> bool:
        return self._done[index]

    def _dispatch(self) -> None:
        by_token = {s.token: s for s in self._sticky.values()}
        for worker in self._res.workers:
            if self._next_task >= len(self._tasks):
                return
            if worker.task is not None:
                continue
            if self._up_layout is not None and not self._free_slots:
                return  # every slot holds a result still waiting to be consumed
            index = self._next_task
            task = self._tasks[index]
            task.slot = self._free_slots.pop() if self._up_layout is not None else -1
            for token in task.tokens:
                if token not in worker.sent_tokens:
                    sticky = by_token[token]
                    handle = sticky.arena.handle if sticky.arena is not None else None
                    self._send(worker, ("sticky", token, sticky.data, sticky.layout, handle))
                    worker.sent_tokens.add(token)
            message = (
                "task",
                index,
                task.cid,
                task.device,
                task.config_bytes,
                task.slot,
                self._fresh,
                self._check_payload,
            )
            self._send(worker, message)
            worker.task = index
            worker.started = time.monotonic()
            self._next_task += 1

    def _wait(self, index: int) -> Any:
        try:
            while not self._done[index]:
                if self._failure is not None:
                    raise self._failure
                self._pump()
        except BaseException as exc:
            self._abort(exc)
            raise
        return self._results[index]

    def _pump(self) -> None:
        workers = self._res.workers
        conns = {w.conn: w for w in workers}
        sentinels = {w.process.sentinel: w for w in workers}
        if self.mirror_event is not None and self.mirror_event.is_set():
            self.stop_event.set()
        poll = _POLL_S
        if self._timeout is not None:
            busy = [w.started for w in workers if w.task is not None]
            if busy:
                poll = min(poll, max(0.0, min(busy) + self._timeout - time.monotonic()))
        ready = wait([*conns, *sentinels], timeout=poll)
        died: list[_Worker] = []
        # Read messages first: a worker that reported and then died has its last word heard.
        for obj in ready:
            worker = conns.get(obj)  # type: ignore[call-overload]
            if worker is None:
                continue
            try:
                message = pickle.loads(worker.conn.recv_bytes())
            except (EOFError, OSError):
                died.append(worker)
                continue
            if worker.task is not None:
                self._handle(worker, message)
        for obj in ready:
            worker = sentinels.get(obj)
            if worker is not None and worker not in died:
                died.append(worker)
        if died:
            self._raise_died(died[0])
        if self._timeout is not None and self._failure is None:
            self._check_timeouts()
        if self._failure is None:
            self._dispatch()

    def _check_timeouts(self) -> None:
        assert self._timeout is not None
        now = time.monotonic()
        busy = sorted((w for w in self._res.workers if w.task is not None), key=lambda w: w.started)
        if not busy or now - busy[0].started < self._timeout:
            return
        late = busy[0]
        assert late.task is not None
        running = tuple(self._tasks[w.task].cid for w in busy if w.task is not None)
        error = ClientTimeoutError(
            self._tasks[late.task].cid,
            now - late.started,
            self._timeout,
            running,
            f"worker process {late.process.pid} was killed and the process pool shut down "
            "(the next round starts a new one)",
        )
        self.stop_event.set()
        self.close(graceful=False)
        raise error

    def _handle(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind, index = message[0], message[1]
        worker.task = None
        cid = self._tasks[index].cid
        if kind == "done":
            task = self._tasks[index]
            try:
                result = pickle.loads(message[2])
                if self._up_layout is not None and self._up_arena is not None:
                    slot = self._up_arena.slot(task.slot)
                    buffer = unpack(
                        self._up_skeleton, self._up_layout, slot, clone=not self._borrow
                    )
                    result = reconstruct_from_shared_memory(result, buffer)
            except Exception as exc:
                self._failure = ClientError(cid, f"its result could not be rebuilt: {exc}")
                return
            if self._up_layout is not None:
                if self._borrow:
                    self._held[index] = task.slot
                else:
                    self._free_slots.append(task.slot)
            self._results[index] = result
            self._done[index] = True
        elif kind == "payload_write":
            self._free_task_slot(index)
            self._failure = PayloadWriteError(
                cid,
                f"wrote into the round's broadcast ({message[2]!r}), which every client of "
                "the round starts from; the write was discarded. Copy a broadcast tensor "
                "before changing it (tensor.clone())",
            )
        elif kind == "mismatch":
            self._free_task_slot(index)
            self._failure = TensorMismatchError(message[2])
        elif kind == "error":
            self._free_task_slot(index)
            _, _, text, worker_tb, exc_bytes = message
            error = ClientError(cid, text, worker_tb)
            if exc_bytes is not None:
                with contextlib.suppress(Exception):
                    error.__cause__ = pickle.loads(exc_bytes)
            self._failure = error

    def _free_task_slot(self, index: int) -> None:
        slot = self._tasks[index].slot
        if slot >= 0 and slot not in self._free_slots:
            self._free_slots.append(slot)

    def _release(self, index: int) -> None:
        slot = self._held.pop(index, None)
        if slot is None:
            return
        self._results[index] = None
        self._free_slots.append(slot)
        if self._failure is None and not self.closed:
            self._dispatch()

    def _raise_died(self, worker: _Worker, cause: BaseException | None = None) -> None:
        process = worker.process
        process.join(1.0)
        code = process.exitcode
        if code is not None and code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        if worker.task is not None:
            what = f"while training client {self._tasks[worker.task].cid}"
        else:
            what = "while idle"
        error = WorkerDiedError(
            f"worker process {process.pid} {how} {what}; the process pool was shut down "
            "(the next local_process call starts a new one)"
        )
        self.close(graceful=False)
        if cause is not None:
            raise error from cause
        raise error

    def _abort(self, exc: BaseException) -> None:
        """Stop the round after a failure or Ctrl-C: stop running clients, then drain."""
        if self.closed:
            return
        self._next_task = len(self._tasks)  # dispatch nothing more
        if isinstance(exc, WorkerDiedError):
            return
        self.stop_event.set()
        deadline = time.monotonic() + self.drain_timeout_s
        try:
            while any(w.task is not None for w in self._res.workers):
                if time.monotonic() > deadline:
                    self.close(graceful=False)
                    return
                busy = {w.conn: w for w in self._res.workers if w.task is not None}
                sentinels = [w.process.sentinel for w in self._res.workers]
                for obj in wait([*busy, *sentinels], timeout=_POLL_S):
                    if obj in busy:
                        worker = busy[obj]
                        try:
                            worker.conn.recv_bytes()
                        except (EOFError, OSError):
                            self.close(graceful=False)
                            return
                        worker.task = None
                    else:
                        self.close(graceful=False)
                        return
        except BaseException:
            self.close(graceful=False)
            raise

    def finish_round(self) -> None:
        """Make sure nothing of the round is still running (drains after early exits)."""
        if self.closed:
            return
        if any(w.task is not None for w in self._res.workers) or self._next_task < len(self._tasks):
            self._abort(EmberflError("round abandoned"))
        self._tasks = []
        self._results = []
        self._done = []
        self._held = {}


@dataclass
class _Packed:
    data: bytes  # the pickled skeleton (the object without its tensors)
    layout: PackedLayout
    tensors: list[torch.Tensor]


def _pack_sticky(obj: Any) -> _Packed:
    skeleton, layout, tensors = pack(obj)
    try:
        data = pickle.dumps(skeleton, _PICKLE_PROTOCOL)
    except Exception as exc:
        raise TypeError(
            f"{type(obj).__name__} in the client configs could not be pickled for the "
            f"worker processes: {exc}"
        ) from exc
    return _Packed(data, layout, list(tensors))


class _StickyPickler(pickle.Pickler):
    def __init__(self, buffer: io.BytesIO, tokens_by_id: dict[int, int], used: list[int]) -> None:
        super().__init__(buffer, _PICKLE_PROTOCOL)
        self._tokens_by_id = tokens_by_id
        self._used = used

    def persistent_id(self, obj: Any) -> Any:
        token = self._tokens_by_id.get(id(obj))
        if token is None:
            return None
        if token not in self._used:
            self._used.append(token)
        return token


def _top_level_values(config: Any) -> list[Any]:
    if isinstance(config, dict):
        return list(config.values())
    if isinstance(config, list | tuple):
        return list(config)
    if hasattr(config, "__dict__"):
        return list(vars(config).values())
    return []

"""The client-side protocols and the three execution modes.

* :class:`BaseClientTrainer` — the minimal protocol (``local_process`` +
  ``uplink_package``); a serial trainer implements both itself.
* :class:`ThreadPoolClientTrainer` — clients run in a thread pool of ``num_parallels``
  threads; subclasses implement the instance method ``worker``.
* :class:`ProcessPoolClientTrainer` — clients run in a persistent pool of
  ``num_parallels`` processes; subclasses implement the static method ``worker``. With
  :attr:`IPCMode.SHARED_MEMORY` (the default) model parameters travel through a
  shared-memory arena, never through pickles; with BlazeFL 2.x's :attr:`IPCMode.STORAGE`
  configs, payloads and results travel as files in ``share_dir``.

The names, signatures and semantics are BlazeFL's (3.0, and 2.x where 3.0 dropped
something: ``IPCMode``, ``share_dir``, three type parameters for the process pool);
``docs/blazefl-differences.md`` lists what emberfl does differently and why (results in
``cid_list`` order, a pool that lives across rounds, ``ClientError`` / ``WorkerDiedError``,
one intra-op thread per client).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from contextlib import suppress
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import torch

from emberfl.core._process_pool import ClientJob, ProcessPool, StartMethod
from emberfl.core._threads import ClientThreads
from emberfl.core._tree import iter_tensors
from emberfl.core.intra_op import intra_op_threads
from emberfl.errors import ClientError, ConfigError, PayloadWriteError

__all__ = [
    "BaseClientTrainer",
    "ClientJob",
    "IPCMode",
    "ProcessPoolClientTrainer",
    "StartMethod",
    "ThreadPoolClientTrainer",
]

UplinkPackage = TypeVar("UplinkPackage")
DownlinkPackage = TypeVar("DownlinkPackage", contravariant=True)
ClientConfig = TypeVar("ClientConfig")
BufferPackage = TypeVar("BufferPackage")
_R = TypeVar("_R")


class IPCMode(StrEnum):
    """How a process pool exchanges data with its workers (BlazeFL 2.x's ``ipc_mode``).

    ``STORAGE``: the parent saves the payload and each client's config with
    ``torch.save`` into ``share_dir``, the worker receives their paths, saves its result
    and returns that file's path. ``SHARED_MEMORY``: configs and payloads are objects, the
    payload's tensors and the uplink buffers live in shared memory (BlazeFL 3.0's only
    mode, and emberfl's default).

    Both spellings BlazeFL used are accepted: ``IPCMode("storage")`` (2.0.0-2.0.1) and
    ``IPCMode("STORAGE")`` (2.0.2 on) give the same member, and a member compares equal
    to either string.
    """

    STORAGE = "storage"
    SHARED_MEMORY = "shared_memory"

    @classmethod
    def _missing_(cls, value: object) -> IPCMode | None:
        if isinstance(value, str):
            for member in cls:
                if member.value == value.lower():
                    return member
        return None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return self.value == other.lower()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.value)


def _cuda_device(trainer: Any, cid: int) -> str:
    # As in BlazeFL, device_count is only read (and need only be set) for device "cuda".
    device: str = trainer.device
    if device == "cuda":
        device_count = getattr(trainer, "device_count", 0) or 0
        if device_count > 0:
            return f"cuda:{cid % device_count}"
    return device


def _check_payload_versions(
    marks: list[tuple[str, torch.Tensor, int]], cid: int, running: dict[int, float]
) -> None:
    for path, tensor, version in marks:
        if tensor._version != version:
            others = sorted(c for c in running if c != cid)
            who = (
                f" (or client {', '.join(map(str, others))}, training beside it)" if others else ""
            )
            raise PayloadWriteError(
                cid,
                f"changed the payload's tensor {path or '<payload>'!r} in place{who}; every "
                "thread shares the payload, so other clients saw the change. Copy a payload "
                "tensor before changing it (tensor.clone())",
            )


def _as_client_error(cid: int, exc: BaseException) -> ClientError:
    if isinstance(exc, ClientError):
        return exc
    worker_tb = "".join(traceback.format_exception(exc))
    error = ClientError(cid, f"{type(exc).__name__}: {exc}", worker_tb)
    error.__cause__ = exc
    return error


class BaseClientTrainer(Protocol[UplinkPackage, DownlinkPackage]):
    """Client-side operations of a federated-learning algorithm.

    A serial trainer implements both methods; the pool trainers below implement
    ``local_process`` for you.
    """

    def uplink_package(self) -> list[UplinkPackage]:
        """Return the packages produced since the last call (and usually clear them).

        Returns:
            One package per trained client, in ``cid_list`` order.
        """
        ...

    def local_process(self, payload: DownlinkPackage, cid_list: list[int]) -> None:
        """Train the clients ``cid_list`` on ``payload``.

        Args:
            payload: The server's downlink package.
            cid_list: The clients of this round.
        """
        ...


class ThreadPoolClientTrainer(
    BaseClientTrainer[UplinkPackage, DownlinkPackage],
    Protocol[UplinkPackage, DownlinkPackage],
):
    """Run clients in a pool of ``num_parallels`` threads.

    Subclasses set the attributes below in ``__init__`` and implement :meth:`worker`.
    Results are appended to ``cache`` in ``cid_list`` order, and only once every client
    of the call succeeded.

    While the pool runs, PyTorch's (process-wide) intra-op thread count is set to
    ``intra_op_threads`` (1 by default) and restored afterwards; see
    :mod:`emberfl.core.intra_op` for why.

    Attributes:
        num_parallels: Number of threads.
        device: ``"cpu"``, ``"cuda"`` (clients spread round-robin over the GPUs) or a
            specific device.
        device_count: Number of CUDA devices.
        cache: Uplink packages waiting for :meth:`uplink_package`.
        stop_event: Set to ask running workers to stop (checked once per batch by
            emberfl's algorithms); set automatically on error or Ctrl-C.
        intra_op_threads: ``torch.set_num_threads`` value while clients train, or
            ``None`` to leave it alone.
        client_timeout: Seconds a client may train, or ``None`` (the default) for no
            limit. A client still running after that fails the call with a
            :class:`~emberfl.errors.ClientTimeoutError`; it is asked to stop and its
            (daemon) thread is left behind, as a thread cannot be killed.
    """

    num_parallels: int
    device: str
    device_count: int
    cache: list[UplinkPackage]
    stop_event: threading.Event
    intra_op_threads: int | None = 1
    client_timeout: float | None = None

    def progress_fn(self, it: list[Future[UplinkPackage]]) -> Iterable[Future[UplinkPackage]]:
        """Wrap the futures for progress reporting (e.g. ``tqdm(it)``); no-op by default.

        Args:
            it: One future per client, in ``cid_list`` order.

        Returns:
            An iterable over the same futures, in the same order.
        """
        return it

    def worker(
        self,
        cid: int,
        device: str,
        payload: DownlinkPackage,
        stop_event: threading.Event,
    ) -> UplinkPackage:
        """Train one client (runs in a pool thread).

        Args:
            cid: The client id.
            device: Where to train (from :meth:`get_client_device`).
            payload: The server's downlink package; shared by all threads, so treat it as
                read-only (an in-place change fails the round with
                :class:`~emberfl.errors.PayloadWriteError`).
            stop_event: Stop early (e.g. between batches) once it is set.

        Returns:
            The client's uplink package.
        """
        ...

    def get_client_device(self, cid: int) -> str:
        """Return the device for client ``cid`` (round-robin over GPUs for ``"cuda"``).

        Args:
            cid: The client id.

        Returns:
            A device string.
        """
        return _cuda_device(self, cid)

    def local_process(self, payload: DownlinkPackage, cid_list: list[int]) -> None:
        """Train ``cid_list`` in the thread pool and append their packages to ``cache``.

        Args:
            payload: The server's downlink package.
            cid_list: The clients of this round.

        Raises:
            ClientError: If a worker raised; it names the client and carries the
                traceback. The other clients are stopped and nothing is cached.
            ClientTimeoutError: A client trained longer than :attr:`client_timeout`.
            PayloadWriteError: A client changed a payload tensor in place.
            KeyboardInterrupt: Ctrl-C (the first one stops the call); its message names
                the clients that did not stop within a second.
        """
        self.stop_event.clear()
        results: list[UplinkPackage] = []
        marks = [(path, t, t._version) for path, t in iter_tensors(payload)]
        threads = ClientThreads(
            self.num_parallels, timeout=self.client_timeout, name="emberfl-client"
        )
        interrupted = False
        with intra_op_threads(self.intra_op_threads):
            try:

                def train(cid: int, device: str) -> UplinkPackage:
                    result = self.worker(cid, device, payload, self.stop_event)
                    # Checked in the client's thread, as it returns: with one thread the
                    # culprit is certain, with several it is this client or one beside it.
                    _check_payload_versions(marks, cid, threads.running())
                    return result

                futures = [
                    threads.submit(cid, train, cid, self.get_client_device(cid)) for cid in cid_list
                ]
                cid_of = {id(f): cid for f, cid in zip(futures, cid_list, strict=True)}
                for future in self.progress_fn(futures):
                    cid = cid_of[id(future)]
                    try:
                        result = threads.result(future)
                    except ClientError:
                        raise
                    except Exception as exc:
                        raise _as_client_error(cid, exc) from exc
                    results.append(_returned(self, cid, result))
            except KeyboardInterrupt:
                interrupted = True
                raise
            finally:
                self.stop_event.set()
                stuck = threads.close(drain_s=1.0)
                if interrupted and stuck:
                    raise KeyboardInterrupt(
                        f"clients {', '.join(map(str, stuck))} were still training and were "
                        "left running in their threads"
                    )
        self.cache.extend(results)


class ProcessPoolClientTrainer(
    BaseClientTrainer[UplinkPackage, DownlinkPackage],
    Protocol[UplinkPackage, DownlinkPackage, ClientConfig, BufferPackage],
):
    """Run clients in a persistent pool of ``num_parallels`` worker processes.

    The type parameters are BlazeFL 3.0's ``[Uplink, Downlink, Config, Buffer]``; BlazeFL
    2.x's and 3.0.0a1's ``[Uplink, Downlink, Config]`` is accepted too and means a buffer
    of the uplink type.

    Subclasses set the attributes below in ``__init__`` and implement
    :meth:`get_client_config`, :meth:`prepare_uplink_package_buffer` and the static
    :meth:`worker`. The pool starts on the first :meth:`local_process` call and lives
    until :meth:`shutdown` (also called by ``with trainer:`` and on garbage collection).

    Per round, the payload's tensors are written once into a shared arena and every
    worker reads them zero-copy; each worker writes its client's results into its own
    arena slot (the ``shm_buffer`` argument), from which the parent copies them before
    handing that worker its next client. Shared memory is therefore bounded by
    ``num_parallels``, whatever the number of clients. Results reach ``cache`` in
    ``cid_list`` order. Objects shared by several client configs (data sets, model
    selectors) are sent to each worker once; every round the parent checks them for
    changes (their pickled form without tensors, and each tensor's identity and in-place
    version counter) and sends a changed one again, and each client gets its own copy
    of them, as if its config had been pickled for it alone.

    With ``ipc_mode = IPCMode.STORAGE`` (BlazeFL 2.x) the worker is called as
    ``worker(config_path, payload_path, device, stop_event)`` and returns the path of
    the package it saved; see :class:`IPCMode`.

    Attributes:
        num_parallels: Number of worker processes.
        device: ``"cpu"``, ``"cuda"`` (clients spread round-robin over the GPUs) or a
            specific device.
        device_count: Number of CUDA devices.
        cache: Uplink packages waiting for :meth:`uplink_package`.
        stop_event: Set to ask running workers to stop. A multiprocessing event
            (``multiprocessing.get_context("spawn").Event()`` or a ``Manager().Event()``)
            reaches the workers as it is; a ``threading.Event`` is mirrored into a
            multiprocessing event the workers receive (set within half a second).
        ipc_mode: :class:`IPCMode`, or ``None`` (the default) for BlazeFL's defaults:
            ``STORAGE`` when the trainer has a ``share_dir`` (a 2.x trainer) and
            ``SHARED_MEMORY`` otherwise.
        share_dir: Where ``STORAGE`` mode writes ``payload.pkl`` and ``<cid>.pkl``.
        intra_op_threads: ``torch.set_num_threads`` value in each worker, or ``None``.
        drain_timeout_s: After an error or Ctrl-C, how long running clients get to stop
            before the workers are killed (the pool then restarts on the next call).
        start_method: How the workers start: ``"auto"`` (default) forks them on Linux
            when that is safe (``device`` is the CPU, CUDA not initialised here,
            ``intra_op_threads == 1``) and spawns them otherwise; ``"fork"``,
            ``"spawn"`` or ``"forkserver"`` force one. A forked worker starts in
            milliseconds; a spawned one imports PyTorch first (seconds). The results
            are the same bits either way. A ``worker`` that raises its own thread count
            (``torch.set_num_threads``) needs ``"spawn"``.
        client_timeout: Seconds a client may train, or ``None`` (the default) for no
            limit. A client still running after that is stopped: its worker is killed,
            :meth:`local_process` raises :class:`~emberfl.errors.ClientTimeoutError`
            naming it, and the pool restarts on the next call.
    """

    num_parallels: int
    device: str
    device_count: int
    cache: list[UplinkPackage]
    stop_event: threading.Event
    intra_op_threads: int | None = 1
    drain_timeout_s: float = 10.0
    start_method: StartMethod = "auto"
    ipc_mode: IPCMode | None = None
    share_dir: Path | None = None
    client_timeout: float | None = None

    def __class_getitem__(cls, params: Any) -> Any:
        """Accept BlazeFL 2.x's three type parameters as well as 3.0's four.

        Args:
            params: The type arguments.

        Returns:
            The parameterised class.
        """
        if cls is ProcessPoolClientTrainer and isinstance(params, tuple) and len(params) == 3:
            params = (*params, params[0])
        return super().__class_getitem__(params)  # type: ignore[misc]

    def progress_fn(self, it: list[ClientJob[BufferPackage]]) -> Iterable[ClientJob[BufferPackage]]:
        """Wrap the jobs for progress reporting (e.g. ``tqdm(it)``); no-op by default.

        Args:
            it: One :class:`ClientJob` per client, in ``cid_list`` order.

        Returns:
            An iterable over the same jobs, in the same order.
        """
        return it

    def get_client_config(self, cid: int) -> ClientConfig:
        """Return what a worker needs to train client ``cid`` (it is pickled).

        Args:
            cid: The client id.

        Returns:
            The client's configuration.
        """
        ...

    def get_client_device(self, cid: int) -> str:
        """Return the device for client ``cid`` (round-robin over GPUs for ``"cuda"``).

        Args:
            cid: The client id.

        Returns:
            A device string.
        """
        return _cuda_device(self, cid)

    @staticmethod
    def worker(
        config: ClientConfig,
        payload: DownlinkPackage,
        device: str,
        stop_event: threading.Event,
        *,
        shm_buffer: BufferPackage | None = None,
    ) -> BufferPackage:
        """Train one client (runs in a worker process).

        Write results into ``shm_buffer``'s tensors in place (``copy_``) and return the
        package with those tensors replaced by :class:`~emberfl.core.SHMHandle`; tensors
        returned directly are pickled instead (slower, but allowed).

        Args:
            config: The client's configuration (:meth:`get_client_config`).
            payload: The server's downlink package; its tensors are zero-copy,
                copy-on-write views of shared memory: a write into them stays with this
                client, as if the payload had been pickled for it alone.
            device: Where to train.
            stop_event: Stop early (e.g. between batches) once it is set.
            shm_buffer: This worker's uplink buffer (views into its arena slot), filled
                with :meth:`prepare_uplink_package_buffer`'s values.

        Returns:
            The client's buffer package.
        """
        ...

    def prepare_uplink_package_buffer(self) -> BufferPackage:
        """Return a buffer package whose tensors have the shape of one client's results.

        Called once per round; its tensors define the arena slot layout and their values
        are what each worker's ``shm_buffer`` starts from.

        Returns:
            The template buffer.
        """
        raise NotImplementedError

    def convert_buffer_to_uplink(self, buffer: BufferPackage) -> UplinkPackage:
        """Turn a rebuilt buffer package into the uplink package stored in ``cache``.

        The default returns ``buffer`` unchanged (for when both types are the same).

        Args:
            buffer: The client's buffer package with its tensors restored.

        Returns:
            The uplink package.
        """
        return cast(UplinkPackage, buffer)

    def local_process(self, payload: DownlinkPackage, cid_list: list[int]) -> None:
        """Train ``cid_list`` in the worker processes and append their packages to ``cache``.

        Args:
            payload: The server's downlink package.
            cid_list: The clients of this round.

        Raises:
            ClientError: If a worker raised; it names the client and carries the worker's
                traceback. Running clients are stopped, nothing is cached, and the pool
                stays usable.
            WorkerDiedError: If a worker process died (killed by a signal, out of
                memory, ...). The pool is shut down and restarts on the next call.
            TensorMismatchError: If a worker left a tensor of the wrong shape or dtype in
                its ``shm_buffer``.
        """
        mode = self._ipc_mode()
        pool = self._emberfl_pool()
        self.stop_event.clear()
        pool.stop_event.clear()
        try:
            if mode is IPCMode.STORAGE:
                results = self._storage_round(pool, payload, cid_list)
            else:
                try:
                    template: BufferPackage | None = self.prepare_uplink_package_buffer()
                except NotImplementedError:
                    template = None
                clients = [
                    (cid, self.get_client_device(cid), self.get_client_config(cid))
                    for cid in cid_list
                ]
                jobs: list[ClientJob[BufferPackage]] = pool.start_round(
                    type(self).worker,
                    payload,
                    template,
                    clients,
                    fresh_shared=True,
                    timeout=self.client_timeout,
                )
                results = [
                    self.convert_buffer_to_uplink(_returned(self, job.cid, job.get()))
                    for job in self.progress_fn(jobs)
                ]
        finally:
            self.stop_event.set()
            pool.stop_event.set()
            pool.finish_round()
        self.cache.extend(results)

    def _ipc_mode(self) -> IPCMode:
        mode = self.ipc_mode
        if mode is None:
            return IPCMode.STORAGE if self.share_dir is not None else IPCMode.SHARED_MEMORY
        try:
            return IPCMode(mode)
        except ValueError:
            raise ConfigError(
                f"{type(self).__name__}.ipc_mode={mode!r} is not one of "
                f"{', '.join(repr(m.value) for m in IPCMode)}"
            ) from None

    def _storage_round(
        self, pool: ProcessPool, payload: DownlinkPackage, cid_list: list[int]
    ) -> list[UplinkPackage]:
        if self.share_dir is None:
            raise ConfigError(
                f"{type(self).__name__} uses ipc_mode=IPCMode.STORAGE but has no share_dir "
                "to exchange files in; set self.share_dir (or use IPCMode.SHARED_MEMORY)"
            )
        share_dir = Path(self.share_dir)
        share_dir.mkdir(parents=True, exist_ok=True)
        payload_path = share_dir / "payload.pkl"
        torch.save(payload, payload_path)
        clients: list[tuple[int, str, Any]] = []
        for cid in cid_list:
            config_path = share_dir / f"{cid}.pkl"
            torch.save(self.get_client_config(cid), config_path)
            clients.append((cid, self.get_client_device(cid), config_path))
        jobs: list[ClientJob[Any]] = pool.start_round(
            _StorageWorker(type(self).worker),
            payload_path,
            None,
            clients,
            timeout=self.client_timeout,
        )
        return [self.convert_buffer_to_uplink(_load_result(job)) for job in self.progress_fn(jobs)]

    def start(self) -> None:
        """Start the worker processes now rather than on the first round.

        Spawning returns at once; the workers import PyTorch in the background while the
        caller goes on (loading data, building the server), so the first round does not
        pay for the start-up. Idempotent.

        Raises:
            ConfigError: ``num_parallels`` < 1 or a ``stop_event`` workers cannot share.
        """
        self._emberfl_pool()

    def _emberfl_pool(self) -> ProcessPool:
        pool: ProcessPool | None = self.__dict__.get("_emberfl_process_pool")
        if (
            pool is not None
            and pool.alive()
            and pool.num_workers == self.num_parallels
            and pool.user_stop_event is self.stop_event
            and pool.intra_op_threads == self.intra_op_threads
            and pool.requested_start_method == self.start_method
        ):
            pool.drain_timeout_s = self.drain_timeout_s
            return pool
        if pool is not None:
            pool.close()
        if self.num_parallels < 1:
            raise ConfigError(f"num_parallels must be >= 1, got {self.num_parallels}")
        stop_event: Any = self.stop_event
        mirror = None
        if isinstance(stop_event, threading.Event):
            # Worker processes cannot share a threading.Event: they get a multiprocessing
            # event that the pool sets whenever this one is set.
            mirror = stop_event
            stop_event = multiprocessing.get_context("spawn").Event()
        pool = ProcessPool(
            self.num_parallels,
            stop_event,
            mirror_event=mirror,
            intra_op_threads=self.intra_op_threads,
            drain_timeout_s=self.drain_timeout_s,
            start_method=self.start_method,
            device=str(self.device),
        )
        self.__dict__["_emberfl_process_pool"] = pool
        return pool

    def worker_pids(self) -> list[int]:
        """Return the worker processes' ids (empty before the pool starts).

        Returns:
            One pid per worker process.
        """
        pool: ProcessPool | None = self.__dict__.get("_emberfl_process_pool")
        return [] if pool is None or pool.closed else pool.pids()

    def shutdown(self) -> None:
        """Stop the worker processes and release the shared memory. Idempotent.

        Also shuts down ``self.manager`` if the subclass created a multiprocessing
        manager there (BlazeFL's convention).
        """
        pool: ProcessPool | None = self.__dict__.pop("_emberfl_process_pool", None)
        if pool is not None:
            pool.close()
        manager = self.__dict__.pop("manager", None)
        shutdown = getattr(manager, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def __enter__(
        self,
    ) -> ProcessPoolClientTrainer[UplinkPackage, DownlinkPackage, ClientConfig, BufferPackage]:
        """Return the trainer; :meth:`shutdown` runs on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Call :meth:`shutdown`."""
        self.shutdown()

    def __del__(self) -> None:
        """Call :meth:`shutdown` when the trainer is garbage collected."""
        with suppress(Exception):
            self.shutdown()


class _StorageWorker:
    """Calls a storage-mode worker as BlazeFL 2.x does: four arguments, no ``shm_buffer``."""

    def __init__(self, worker: Callable[..., Any]) -> None:
        self.worker = worker

    def __call__(self, config: Path, payload: Path, device: str, stop_event: Any, **_: Any) -> Any:
        return self.worker(config, payload, device, stop_event)


def _returned(trainer: object, cid: int, result: _R) -> _R:
    """Return a worker's result, or raise if the worker returned ``None``."""
    if result is None:
        raise ClientError(
            cid,
            f"{type(trainer).__name__}.worker returned None; it must return the client's "
            "package (did it forget a return statement?)",
        )
    return result


def _load_result(job: ClientJob[Any]) -> Any:
    result = job.get()
    if not isinstance(result, str | os.PathLike):
        raise ClientError(
            job.cid,
            "in ipc_mode=IPCMode.STORAGE a worker saves its package with torch.save and "
            f"returns the file's path; it returned a {type(result).__name__}",
        )
    try:
        return torch.load(result, weights_only=False)
    except Exception as exc:
        raise ClientError(
            job.cid, f"its package could not be loaded from {os.fspath(result)!r}: {exc}"
        ) from exc

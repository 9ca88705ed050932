"""Client threads for the thread modes, with per-client time limits and a clean Ctrl-C.

:class:`ClientThreads` runs clients on up to ``num_threads`` **daemon** threads, and knows
which client each thread is training and since when. A thread cannot be killed, so a
client that hangs is abandoned instead: the round fails at once (a
:class:`~emberfl.errors.ClientTimeoutError`, or the ``KeyboardInterrupt`` of a Ctrl-C)
while the thread goes on in the background, and, being a daemon, never keeps the
interpreter from exiting. ``concurrent.futures.ThreadPoolExecutor`` would wait for it
both in ``shutdown()`` and at interpreter exit.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from emberfl.errors import ClientTimeoutError

__all__ = ["ClientThreads", "Deadline"]

T = TypeVar("T")

_POLL_S = 0.25


class ClientThreads:
    """Up to ``num_threads`` daemon threads that train clients.

    Attributes:
        num_threads: The most clients trained at once.
        timeout: Seconds a client may train (``None``: no limit).
    """

    def __init__(self, num_threads: int, *, timeout: float | None = None, name: str) -> None:
        """Create the threads' queue (threads start as work arrives).

        Args:
            num_threads: The most clients trained at once (>= 1).
            timeout: Seconds a client may train, enforced by :meth:`result`.
            name: Prefix of the threads' names.
        """
        self.num_threads = max(1, num_threads)
        self.timeout = timeout
        self._name = name
        self._queue: queue.SimpleQueue[tuple[int, Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._running: dict[int, float] = {}  # cid -> time.monotonic() at start
        self._closed = False

    def submit(self, cid: int, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue client ``cid``: ``fn(*args)`` runs on the next free thread.

        Args:
            cid: The client (for time limits and messages).
            fn: The work.
            *args: Its arguments.

        Returns:
            The client's future.
        """
        future: Future[T] = Future()
        self._queue.put((cid, future, lambda: fn(*args)))
        if len(self._threads) < self.num_threads:
            thread = threading.Thread(
                target=self._serve, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return future

    def _serve(self) -> None:
        while (item := self._queue.get()) is not None:
            cid, future, work = item
            if not future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._running[cid] = time.monotonic()
            try:
                value = work()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(value)
            finally:
                with self._lock:
                    self._running.pop(cid, None)

    def running(self) -> dict[int, float]:
        """Return each client being trained now and how long it has been training."""
        now = time.monotonic()
        with self._lock:
            return {cid: now - start for cid, start in self._running.items()}

    def result(self, future: Future[T]) -> T:
        """Wait for ``future``, failing the round if any client exceeds :attr:`timeout`.

        Args:
            future: A future returned by :meth:`submit`.

        Returns:
            Its result.

        Raises:
            ClientTimeoutError: A client (this one or one training beside it) has been
                training for longer than :attr:`timeout`.
            BaseException: Whatever the client raised.
        """
        if self.timeout is None:
            return future.result()
        while True:
            running = self.running()
            late = [(elapsed, cid) for cid, elapsed in running.items() if elapsed >= self.timeout]
            if late:
                elapsed, cid = max(late)
                raise ClientTimeoutError(
                    cid,
                    elapsed,
                    self.timeout,
                    tuple(sorted(running)),
                    "it was asked to stop and left running in its thread (a thread cannot "
                    "be killed)",
                )
            remaining = self.timeout - max(running.values(), default=0.0)
            try:
                return future.result(timeout=min(_POLL_S, max(remaining, 0.01)))
            except FutureTimeout:
                continue

    def close(self, drain_s: float) -> tuple[int, ...]:
        """Cancel queued clients and give running ones ``drain_s`` seconds to finish
        (clients already past :attr:`timeout` are not waited for).

        Args:
            drain_s: How long to wait for running clients (which should have been asked
                to stop).

        Returns:
            The clients still running afterwards (their threads are abandoned).
        """
        if not self._closed:
            self._closed = True
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[1].cancel()
            for _ in self._threads:
                self._queue.put(None)
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:
            running = self.running()
            # Done when nothing runs but clients already past the limit: those are hung,
            # and waiting longer for them would only delay the error.
            if all(self.timeout is not None and t >= self.timeout for t in running.values()):
                break
            time.sleep(0.005)
        return tuple(sorted(self.running()))


class Deadline:
    """Interrupt the main thread, as Ctrl-C does, once ``timeout`` seconds have passed.

    Used as ``with Deadline(t) as deadline: ...`` around work in the main thread (a
    serial client): if the work is still running after ``t`` seconds, a ``SIGINT`` is
    sent to the main thread, so the work stops with ``KeyboardInterrupt`` even inside a
    blocking call, and :attr:`fired` tells the caller that it was the deadline. It does
    nothing when ``timeout`` is ``None``, outside the main thread, or when the program
    has installed its own ``SIGINT`` handler.

    Attributes:
        timeout: The limit in seconds.
        fired: Whether the limit was reached.
        elapsed: Seconds from the start to the interrupt (0 until it fires).
    """

    def __init__(self, timeout: float | None) -> None:
        """Prepare the deadline (it starts on ``__enter__``).

        Args:
            timeout: Seconds, or ``None`` for no limit.
        """
        self.timeout = timeout
        self.fired = False
        self.elapsed = 0.0
        self._done = threading.Event()
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> Deadline:
        """Start the watcher thread."""
        if (
            self.timeout is None
            or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        ):
            return self
        main = threading.main_thread().ident
        assert main is not None
        start = time.monotonic()
        timeout = self.timeout

        def watch() -> None:
            if not self._done.wait(timeout):
                self.fired = True
                self.elapsed = time.monotonic() - start
                signal.pthread_kill(main, signal.SIGINT)

        self._watcher = threading.Thread(target=watch, name="emberfl-deadline", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        """Stop the watcher; a fired interrupt is delivered before this returns."""
        self._done.set()
        if self._watcher is None:
            return
        self._watcher.join()
        if not self.fired or exc_type is KeyboardInterrupt:
            return  # no interrupt, or it has arrived
        # The signal is on its way to this thread: take it here, inside the caller's
        # ``try``, not at some later line (the sleep ends as soon as it lands).
        if exc_type is None:
            time.sleep(1.0)
            return
        # Another exception is on its way out: it wins, and the interrupt is absorbed.
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(1.0)

"""A bounded, best-effort pool for background work (SPEC section 15).

Replies, registry reports and key backfill run here so that neither an API call nor the
port-444 handler waits on a slow peer or registry. Everything submitted is best effort: when
the queue is full the task is dropped with a WARNING, and a failing task is logged without
taking its worker down. The trust store's writer never runs here (SPEC 10).
"""

from __future__ import annotations

import logging
import threading
import time
from queue import Full, Queue
from typing import Any, Callable

from .constants import POOL_QUEUE, POOL_WORKERS

__all__ = ["BackgroundPool"]

log = logging.getLogger(__name__)

_Task = tuple[Callable[..., object], tuple[Any, ...], tuple[type[BaseException], ...]]


class BackgroundPool:
    """``workers`` daemon threads fed by a queue of at most ``queue`` tasks.

    Threads start lazily, on the first ``submit``. After ``shutdown`` the pool refuses work.
    """

    def __init__(self, workers: int = POOL_WORKERS, queue: int = POOL_QUEUE) -> None:
        """A pool of ``workers`` threads and a queue bounded at ``queue`` tasks."""
        self._workers = workers
        self._queue: Queue[_Task | None] = Queue(maxsize=queue)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._unfinished = 0  # submitted and not yet done: queued or running
        self._closed = False

    def submit(
        self,
        fn: Callable[..., object],
        *args: Any,
        quiet: tuple[type[BaseException], ...] = (),
    ) -> bool:
        """Queue ``fn(*args)``; False (and a WARNING) when the queue is full or the pool is shut
        down. Exceptions of a type in ``quiet`` are logged at DEBUG, any other at WARNING."""
        with self._lock:
            if self._closed:
                log.warning("background pool stopped: dropped %s", _name(fn))
                return False
            self._start_workers()
            try:
                self._queue.put_nowait((fn, args, quiet))
            except Full:
                log.warning("background queue full: dropped %s", _name(fn))
                return False
            self._unfinished += 1
        return True

    def drain(self, timeout: float | None) -> bool:
        """Wait until every submitted task has finished; False if ``timeout`` ran out first."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._unfinished, timeout)

    def shutdown(self, timeout: float) -> bool:
        """Refuse new work, wait for queued work and stop the workers, all within ``timeout``
        seconds in total (one deadline, not one per step).

        Returns False if work was still running when the time ran out (its threads are
        daemons and do not keep the process alive). Calling it again waits for nothing and
        says whether the pool is idle.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._lock:
            again, self._closed = self._closed, True
            if again:
                return not self._unfinished
        finished = self.drain(timeout)
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            try:
                self._queue.put_nowait(None)
            except Full:
                break  # workers still busy with stale work; they are daemons
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        if not finished:
            log.warning("background work still running after %.1f s at shutdown", timeout)
        return finished

    def _start_workers(self) -> None:
        while len(self._threads) < self._workers:
            thread = threading.Thread(
                target=self._run, name=f"handshake-bg-{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _run(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            fn, args, quiet = task
            try:
                fn(*args)
            except quiet as exc:
                log.debug("background %s failed: %s", _name(fn), exc)
            except Exception:
                log.warning("background %s failed", _name(fn), exc_info=True)
            finally:
                with self._idle:
                    self._unfinished -= 1
                    if not self._unfinished:
                        self._idle.notify_all()


def _name(fn: Callable[..., object]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)

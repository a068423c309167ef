"""The one OS thread that loads the model and then runs the engine loop.

Why one thread for both: libgomp keeps a separate OpenMP thread pool for every thread that
runs parallel regions.  Loading on the main thread and stepping on another leaves two pools,
more OpenMP threads than cores on a small CPU, and libgomp then stops spinning between
parallel regions, so each of the ~150 regions of a decode step pays a futex wake-up
(measured 8 -> 17 ms per one-row step on 2 cores).  Tasks submitted here all run on the same
daemon thread, in order; the HTTP thread never runs a tensor op.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class EngineThread:
    def __init__(self, name: str = "pesc-engine") -> None:
        self._tasks: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            fn, future = self._tasks.get()
            if fn is None:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to whoever waits on the future
                    future.set_exception(exc)

    def submit(self, fn: Callable[[], T]) -> Future:
        """Queue ``fn`` to run on this thread after everything submitted before it."""
        future: Future[Any] = Future()
        self._tasks.put((fn, future))
        return future

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on this thread and wait for its result (exceptions re-raise here)."""
        return self.submit(fn).result()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Let the thread exit once the tasks already queued have run."""
        self._tasks.put((None, None))

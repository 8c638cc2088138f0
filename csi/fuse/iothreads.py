"""Worker threads for the blocking file I/O of FUSE reads (object opens and preads).

``trio.to_thread.run_sync`` is general (cancellation, thread cache, limiter tokens) and
costs about 130 us of CPU per call on the project machine; a read of a small file that is
not cached makes one such call, so its cost is a large share of serving the read. This pool
does only what the read path needs: a queue, threads blocked on it, and the result handed
back to the waiting task through trio's ``run_sync_soon`` (about a third less CPU per call,
measured in docs/benchmarks.md). Calls cannot be cancelled while they run (file I/O on local
disks ends by itself).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_Job = tuple[Callable[..., Any], tuple[Any, ...], trio.lowlevel.Task, trio.lowlevel.TrioToken]


class IoThreads:
    """At most ``max_threads`` threads, started as calls need them, daemonic."""

    def __init__(self, max_threads: int, name: str = "fuse-io") -> None:
        self.max_threads = max(1, max_threads)
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        #: Calls submitted and not yet answered (only touched on the trio thread).
        self._busy = 0

    def __len__(self) -> int:
        return len(self._threads)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread; its result, or its exception raised here."""
        self._busy += 1
        if self._busy > len(self._threads) and len(self._threads) < self.max_threads:
            t = threading.Thread(
                target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(t)
            t.start()
        task = trio.lowlevel.current_task()
        self._jobs.put((fn, args, task, trio.lowlevel.current_trio_token()))
        try:
            result: T = await trio.lowlevel.wait_task_rescheduled(_no_abort)
        finally:
            self._busy -= 1
        return result

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, task, token = job
            result = outcome.capture(fn, *args)
            # RunFinishedError: the loop is gone, so nobody waits any more.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    def close(self) -> None:
        """Let the threads end once the queued calls are done."""
        for _ in self._threads:
            self._jobs.put(None)
        self._threads.clear()


def _no_abort(_: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


__all__ = ["IoThreads"]

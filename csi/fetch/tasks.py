"""The table of object downloads in flight, shared by the fetches of one client.

Concurrent fetches that need the same object (in the same store) join one :class:`Task`
instead of downloading it twice (the store's single-flight covers other processes). A task
counts the fetches still interested in it: one that nobody wants any more (every fetch that
wanted it failed) is skipped when it would start.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from .errors import FetchError
from .progress import FetchProgress

#: What a finished task gives: (stored by this task, bytes it received).
Outcome = tuple[bool, int]


class Cancelled(FetchError):
    """A shared download was abandoned because every fetch that wanted it had failed."""

    code = "ABORTED"


class Task:
    """One object download shared by the fetches that want it."""

    __slots__ = ("future", "interest", "progress", "size")

    def __init__(self, size: int | None, progress: FetchProgress) -> None:
        self.future: Future[Outcome] = Future()
        self.interest = 1
        self.size = size
        self.progress = progress


class TaskTable:
    """Downloads in flight, by (store, digest). ``mu`` guards the table and every task's
    ``interest``."""

    def __init__(self) -> None:
        self.mu = threading.Lock()
        self.inflight: dict[tuple[int, bytes], Task] = {}

    def register(
        self, store: object, digest: bytes, size: int | None, progress: FetchProgress
    ) -> tuple[Task, bool]:
        """The shared task downloading ``digest`` (created if needed). (task, created)."""
        key = (id(store), digest)
        with self.mu:
            task = self.inflight.get(key)
            if task is not None:
                task.interest += 1
                return task, False
            task = self.inflight[key] = Task(size, progress)
        return task, True

    def forget(self, store: object, digest: bytes) -> None:
        with self.mu:
            self.inflight.pop((id(store), digest), None)

    def settle(
        self,
        store: object,
        digest: bytes,
        task: Task,
        *,
        result: Outcome | None = None,
        error: BaseException | None = None,
    ) -> None:
        """End ``task`` with ``result`` or ``error`` (once: later calls do nothing) and take
        it out of the table."""
        with self.mu:
            if self.inflight.get((id(store), digest)) is task:
                del self.inflight[(id(store), digest)]
        if task.future.done():
            return
        if error is not None:
            task.future.set_exception(error)
        else:
            assert result is not None
            task.future.set_result(result)


def chain(src: Future[Outcome], dst: Future[Outcome]) -> None:
    """Pass the outcome of ``src`` (a pool job) on to ``dst`` (a task's future)."""
    if src.cancelled():
        dst.set_exception(Cancelled("the client was closed"))
        return
    exc = src.exception()
    if exc is not None:
        dst.set_exception(exc)
    else:
        dst.set_result(src.result())

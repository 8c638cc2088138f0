"""The table of object downloads in flight, shared by the fetches of one client.

Concurrent fetches that need the same object (in the same store) join one :class:`Task`
instead of downloading it twice (the store's single-flight covers other processes). A task
counts the fetches still interested in it: one that nobody wants any more (every fetch that
wanted it failed) is skipped when it would start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

from .errors import FetchError
from .progress import FetchProgress

log = logging.getLogger(__name__)

#: What a finished task gives: (stored by this task, bytes it received).
Outcome = tuple[bool, int]


class Cancelled(FetchError):
    """A shared download was abandoned because every fetch that wanted it had failed."""

    code = "ABORTED"


class Task:
    """One object download shared by the fetches that want it. It ends once, with an outcome
    or an error (:meth:`end`), and then calls the callbacks of the fetches waiting for it.

    Not a ``concurrent.futures.Future``: a big fetch makes one task per object, and a future
    with its condition, lock and lists is about a dozen objects for the cyclic GC to scan;
    over 100k objects the GC's full passes cost the fetching process seconds
    (docs/benchmarks.md)."""

    __slots__ = ("_callbacks", "_done", "_error", "_result", "interest", "progress", "size")

    def __init__(self, size: int | None, progress: FetchProgress) -> None:
        self.interest = 1
        self.size = size
        self.progress = progress
        self._done = False
        self._result: Outcome | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Task], None]] | None = None

    def done(self) -> bool:
        return self._done

    @property
    def error(self) -> BaseException | None:
        """The error it ended with (None while running, or if it succeeded)."""
        return self._error

    @property
    def result(self) -> Outcome:
        """The outcome it ended with; raises its error, or if it has not ended."""
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise RuntimeError("the task has not ended")
        return self._result

    def add_done_callback(self, fn: Callable[[Task], None]) -> None:
        """Call ``fn(task)`` once the task has ended (now, if it has). A ``fn`` that is a
        :class:`Waiter` is called once per batch of tasks ended together (:func:`end_many`)."""
        with _mu:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        fn(self)

    def end(self, result: Outcome | None = None, error: BaseException | None = None) -> bool:
        """End with ``result`` or ``error`` and call the callbacks; False (and nothing done)
        if it had ended already."""
        if error is None and result is None:
            raise ValueError("a task ends with a result or an error")
        return end_many([(self, result, error)]) == 1


#: Guards every task's end and callbacks (held for a few instructions at a time).
_mu = threading.Lock()


class Waiter:
    """A done-callback that takes the tasks ended together in one call (:meth:`many`): a
    chunk of a bulk fetch ends thousands at once, and one call (with its locks) per task
    was a serial cost of the fetching process."""

    def __call__(self, task: Task) -> None:
        self.many([task])

    def many(self, tasks: list[Task]) -> None:
        raise NotImplementedError


def end_many(ends: list[tuple[Task, Outcome | None, BaseException | None]]) -> int:
    """End each task with its outcome or error (those that ended already are left as they
    are), then call the callbacks: a :class:`Waiter` once with all of its tasks, others once
    per task (as a Future does, one waiter's bug does not stop the others). How many ended."""
    calls: list[tuple[Task, list[Callable[[Task], None]]]] = []
    ended = 0
    with _mu:
        for task, result, error in ends:
            if task._done:
                continue
            ended += 1
            task._done = True
            task._result, task._error = result, error
            callbacks, task._callbacks = task._callbacks, None
            if callbacks:
                calls.append((task, callbacks))
    waiters: dict[int, tuple[Waiter, list[Task]]] = {}
    for task, callbacks in calls:
        for fn in callbacks:
            if isinstance(fn, Waiter):
                waiters.setdefault(id(fn), (fn, []))[1].append(task)
                continue
            try:
                fn(task)
            except Exception:
                log.exception("callback of a download task failed")
    for waiter, tasks in waiters.values():
        try:
            waiter.many(tasks)
        except Exception:
            log.exception("callback of a download task failed")
    return ended


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

    def settle_many(self, store: object, ends: list[tuple[bytes, Task, Outcome]]) -> None:
        """:meth:`settle` with a result, for many tasks at once (one lock, one callback per
        :class:`Waiter`)."""
        sid = id(store)
        with self.mu:
            inflight = self.inflight
            for digest, task, _ in ends:
                if inflight.get((sid, digest)) is task:
                    del inflight[(sid, digest)]
        end_many([(task, result, None) for _, task, result in ends])

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
        if error is not None:
            task.end(error=error)
        else:
            assert result is not None
            task.end(result=result)


def chain(src: Future[Outcome], dst: Task) -> None:
    """End ``dst`` with the outcome of ``src`` (a pool job)."""
    if src.cancelled():
        dst.end(error=Cancelled("the client was closed"))
        return
    exc = src.exception()
    if exc is not None:
        dst.end(error=exc)
    else:
        dst.end(result=src.result())

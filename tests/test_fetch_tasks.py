"""The shared download task: it ends once, and every waiter hears of it exactly once."""

from __future__ import annotations

import logging
import threading

import pytest

from csi.fetch.progress import FetchProgress
from csi.fetch.tasks import Task, TaskTable, Waiter


def test_a_task_ends_once_and_calls_each_waiter_once() -> None:
    task = Task(10, FetchProgress())
    heard: list[tuple[str, object]] = []
    task.add_done_callback(lambda t: heard.append(("a", t.result)))
    task.add_done_callback(lambda t: heard.append(("b", t.result)))
    assert not task.done() and task.error is None
    with pytest.raises(RuntimeError, match="not ended"):
        task.result  # noqa: B018
    assert task.end(result=(True, 10))
    assert not task.end(error=OSError("late"))  # the first end stands
    assert task.done() and task.result == (True, 10) and task.error is None
    task.add_done_callback(lambda t: heard.append(("late waiter", t.result)))  # called at once
    assert heard == [("a", (True, 10)), ("b", (True, 10)), ("late waiter", (True, 10))]


def test_an_error_reaches_every_waiter_and_a_failing_callback_stops_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    task = Task(None, FetchProgress())
    heard: list[BaseException | None] = []

    def broken(t: Task) -> None:
        raise ValueError("a waiter's bug")

    task.add_done_callback(broken)
    task.add_done_callback(lambda t: heard.append(t.error))
    err = OSError("disk on fire")
    with caplog.at_level(logging.ERROR, logger="csi.fetch.tasks"):
        assert task.end(error=err)
    assert heard == [err]
    assert "callback of a download task failed" in caplog.text
    with pytest.raises(OSError, match="disk on fire"):
        task.result  # noqa: B018
    with pytest.raises(ValueError, match="result or an error"):
        Task(1, FetchProgress()).end()


def _race_once() -> tuple[list[int], list[bool]]:
    task = Task(1, FetchProgress())
    calls: list[int] = []
    wins: list[bool] = []
    go = threading.Barrier(8)

    def waiter(i: int) -> None:
        go.wait()
        task.add_done_callback(lambda t: calls.append(i))

    def ender(i: int) -> None:
        go.wait()
        wins.append(task.end(result=(True, i)))

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=ender, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return calls, wins


def test_racing_ends_and_waiters_each_happen_exactly_once() -> None:
    """Threads add waiters while others try to end the task: one end wins, and every waiter
    (added before or after the end) is called exactly once."""
    for _ in range(50):
        calls, wins = _race_once()
        assert sorted(calls) == [0, 1, 2, 3]
        assert wins.count(True) == 1


def test_settle_takes_the_task_out_of_the_table() -> None:
    table = TaskTable()
    store = object()
    task, created = table.register(store, b"\x01" * 32, 5, FetchProgress())
    again, created_again = table.register(store, b"\x01" * 32, 5, FetchProgress())
    assert created and not created_again and again is task and task.interest == 2
    table.settle(store, b"\x01" * 32, task, result=(False, 0))
    assert table.inflight == {} and task.result == (False, 0)


class _Batches(Waiter):
    def __init__(self) -> None:
        self.calls: list[list[Task]] = []

    def many(self, tasks: list[Task]) -> None:
        self.calls.append(list(tasks))


def test_settle_many_ends_each_task_once_and_calls_a_waiter_once_per_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    table = TaskTable()
    store = object()
    prog = FetchProgress()
    tasks = [table.register(store, bytes([i]) * 32, 10, prog)[0] for i in range(5)]
    batches = _Batches()
    plain: list[Task] = []
    for t in tasks:
        t.add_done_callback(batches)
        t.add_done_callback(plain.append)  # not a Waiter: once per task

    def broken(t: Task) -> None:
        raise ValueError("a waiter's bug")

    tasks[0].add_done_callback(broken)
    assert tasks[4].end(result=(False, 0))  # ended alone first: its own call, left as it is
    with caplog.at_level(logging.ERROR, logger="csi.fetch.tasks"):
        table.settle_many(store, [(bytes([i]) * 32, tasks[i], (True, i)) for i in range(5)])
    assert [t.result for t in tasks] == [(True, 0), (True, 1), (True, 2), (True, 3), (False, 0)]
    assert batches.calls == [[tasks[4]], tasks[:4]]
    assert plain == [tasks[4], *tasks[:4]]
    assert "a waiter's bug" in caplog.text
    assert table.inflight == {}  # every task left the table, the early one too
    batches.calls.clear()
    tasks[1].add_done_callback(batches)  # after the end: called at once, alone
    assert batches.calls == [[tasks[1]]]

"""The shared download task: it ends once, and every waiter hears of it exactly once."""

from __future__ import annotations

import logging
import threading

import pytest

from csi.fetch.progress import FetchProgress
from csi.fetch.tasks import Task, TaskTable


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

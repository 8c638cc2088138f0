"""csi.gcpause: the cyclic collector is off during bursts, and back as it was after."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from csi import gcpause


@pytest.fixture(autouse=True)
def _collector_restored() -> Iterator[None]:
    was = gc.isenabled()
    yield
    gc.enable() if was else gc.disable()


def test_paused_turns_the_collector_off_and_back_on() -> None:
    gc.enable()
    with gcpause.paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_overlapping_bursts_in_threads_end_with_the_last() -> None:
    gc.enable()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def second() -> None:
        first_in.wait()
        with gcpause.paused():
            second_in.set()
            first_out.wait()
            seen.append(gc.isenabled())  # the first burst ended: still off for this one

    t = threading.Thread(target=second)
    t.start()
    with gcpause.paused():
        first_in.set()
        second_in.wait()
    first_out.set()
    t.join()
    assert seen == [False]
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    with gcpause.paused():
        pass
    assert not gc.isenabled()


def test_an_error_in_the_burst_still_restores_it() -> None:
    gc.enable()
    with pytest.raises(ValueError), gcpause.paused():
        raise ValueError("boom")
    assert gc.isenabled()

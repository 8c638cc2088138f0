"""Pausing Python's cyclic garbage collector around bursts of allocation.

Walking a 100k-file image, or registering and planning the fetch of 100k objects, allocates
hundreds of thousands of objects that all stay alive until the burst ends. Each allocation
threshold crossed makes the collector scan them again, and none of it is garbage: in the
100k walk that scanning was a quarter of the time (1.15 s with the collector, 0.87 s
without). :func:`paused` switches it off for such a burst and back on after; bursts in
several threads overlap, and the collector comes back when the last one ends (and only if
it was on when the first began). Reference counting frees everything as usual meanwhile;
only cycles wait for the next collection.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_mu = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No cyclic garbage collection while the block runs (in any thread of the process)."""
    global _depth, _was_enabled
    with _mu:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _mu:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()

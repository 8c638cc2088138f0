"""Per-key operation locks: a second operation on a busy key is refused with ABORTED (the spec's
"operation pending for volume"), never queued behind the first."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import aborted


class KeyedLocks:
    def __init__(self, what: str) -> None:
        self._what = what
        self._mu = threading.Lock()
        self._busy: set[str] = set()

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._mu:
            if key in self._busy:
                raise aborted(f"an operation on {self._what} {key!r} is already in progress")
            self._busy.add(key)
        try:
            yield
        finally:
            with self._mu:
                self._busy.discard(key)

    def busy(self) -> set[str]:
        with self._mu:
            return set(self._busy)

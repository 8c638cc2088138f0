"""Per-fetch progress counters, updated by worker threads and read by anyone at any time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProgressSnapshot:
    """A consistent copy of a fetch's counters.

    ``objects_total`` counts the objects the image references (known once the image is parsed;
    0 before). ``bytes_total`` is their total size when the image tells it, else ``None``.
    ``bytes_done`` counts bytes of objects that are complete (present or stored);
    ``bytes_downloaded`` counts bytes received so far by this fetch, partial transfers included.
    """

    phase: str
    objects_total: int
    objects_done: int
    objects_fetched: int
    objects_present: int
    bytes_total: int | None
    bytes_done: int
    bytes_downloaded: int
    elapsed: float

    @property
    def finished(self) -> bool:
        return self.phase in ("done", "failed")


Listener = Callable[[ProgressSnapshot], None]


class FetchProgress:
    """Thread-safe counters of one fetch. Pass one to :func:`csi.fetch.fetch_image` and call
    :meth:`snapshot` from any thread while it runs. ``listener``, if given, is called with a
    snapshot after every change (from worker threads; keep it cheap), or, with
    ``min_interval``, after a change of phase or totals and at most that often otherwise (a
    fetch of 100k objects makes hundreds of thousands of changes)."""

    def __init__(self, listener: Listener | None = None, *, min_interval: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._listener = listener
        self._min_interval = min_interval
        self._told = 0.0  # when the listener was last called
        self._t0 = time.monotonic()
        self._phase = "resolving"
        self._objects_total = 0
        self._objects_fetched = 0
        self._objects_present = 0
        self._bytes_total: int | None = None
        self._bytes_done = 0
        self._bytes_downloaded = 0

    def snapshot(self) -> ProgressSnapshot:
        with self._lock:
            return self._snap()

    def _snap(self) -> ProgressSnapshot:
        return ProgressSnapshot(
            phase=self._phase,
            objects_total=self._objects_total,
            objects_done=self._objects_fetched + self._objects_present,
            objects_fetched=self._objects_fetched,
            objects_present=self._objects_present,
            bytes_total=self._bytes_total,
            bytes_done=self._bytes_done,
            bytes_downloaded=self._bytes_downloaded,
            elapsed=time.monotonic() - self._t0,
        )

    def _update(self, **delta: int | str | None) -> None:
        with self._lock:
            for key, value in delta.items():
                attr = "_" + key
                if key in ("phase", "bytes_total", "objects_total"):
                    setattr(self, attr, value)
                else:
                    setattr(self, attr, getattr(self, attr) + value)
            snap = self._snap() if self._listener is not None else None
        if snap is not None and self._listener is not None:
            self._listener(snap)

    def set_phase(self, phase: str) -> None:
        self._update(phase=phase)

    def set_totals(self, objects: int, size: int | None) -> None:
        self._update(objects_total=objects, bytes_total=size)

    # The two calls made once or more per object update their fields directly (no keyword
    # dispatch): a fetch of 10k objects makes tens of thousands of them.

    def _due(self) -> bool:
        """Whether to tell the listener about a per-object change (the lock is held)."""
        if self._listener is None:
            return False
        if not self._min_interval:
            return True
        now = time.monotonic()
        if now - self._told < self._min_interval:
            return False
        self._told = now
        return True

    def downloaded(self, n: int) -> None:
        with self._lock:
            self._bytes_downloaded += n
            snap = self._snap() if self._due() else None
        if snap is not None and self._listener is not None:
            self._listener(snap)

    def object_done(self, size: int, *, fetched: bool) -> None:
        self.objects_done(1, size, fetched=fetched)

    def objects_done(self, count: int, size: int, *, fetched: bool) -> None:
        """``count`` objects of ``size`` bytes in all are done."""
        with self._lock:
            if fetched:
                self._objects_fetched += count
            else:
                self._objects_present += count
            self._bytes_done += size
            snap = self._snap() if self._due() else None
        if snap is not None and self._listener is not None:
            self._listener(snap)

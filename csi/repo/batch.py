"""Making many temp files durable with one filesystem sync, then naming them.

``Repository.add_object_file`` makes each object durable on its own (an ``fsync`` each: 1-4 ms
on the disks here, which dominates a 20k-file build or fetch). Instead, :func:`make_durable`
flushes a whole group of finished temp files with one ``syncfs`` and then collects each file's
own writeback error (``sync_file_range`` on a descriptor opened before the file was written,
so an I/O error on any of its pages is reported to it, as ``fsync`` would); only files that
pass are renamed into place. The guarantees are those of ``fsync`` + rename: a name appears
only once its bytes are verified and on disk; a crash leaves temp files, which the next
opening of the repository (or store) removes.

:class:`GroupCommit` (the node store) batches them: many threads each finish one file and call
``submit``; the first to find no flush running leads one for everyone pending, the others wait
for it. One object alone waits for one sync; N concurrent writers share one. (``composefs-csi
build`` does the same from worker processes: :mod:`csi.repo.parallel`.)
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from .tmpfiles import TempFile

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
# SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
_SFR_ALL = 1 | 2 | 4

T = TypeVar("T")

#: ``syncfs``-like function used by :func:`make_durable` (tests substitute failures).
SyncFn = Callable[[Path], None]


def syncfs(path: Path) -> None:
    """Flush every dirty page and inode of the filesystem holding ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def writeback_error(fd: int, name: str = "") -> OSError | None:
    """The writeback error of ``fd``'s file not yet reported to ``fd``, if any.

    Writes back and waits for any dirty page of the file first (none after a ``syncfs``).
    The error is the one ``fsync(fd)`` would have returned for data lost on the way to disk.
    """
    if _libc.sync_file_range(fd, 0, 0, _SFR_ALL) == 0:
        return None
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err), name or None)


def make_durable(
    root: Path,
    temps: Sequence[TempFile],
    sync: SyncFn | None = None,
    *,
    direct: Sequence[bool] | None = None,
) -> list[OSError | None]:
    """Flush the filesystem of ``root`` once; then, per temp file, ``None`` if its bytes are
    durable, else the error (every file fails if the sync itself fails).

    A file written with direct I/O (``direct[i]``) has no page of its own to write back: an
    error writing its data was returned by ``write`` itself, and the sync (which writes its
    size and block map) reports its own. Only the others are asked for a writeback error.
    """
    try:
        (sync or syncfs)(root)
    except OSError as e:
        return [OSError(e.errno, e.strerror, str(t.path)) for t in temps]
    skip = direct or [False] * len(temps)
    return [
        None if d else writeback_error(t.lock_fd, str(t.path))
        for t, d in zip(temps, skip, strict=True)
    ]


class _Slot(Generic[T]):
    """One submitted item; ``wake`` (a locked lock) is released once, when the item is done
    or when its submitter is to lead the next flush."""

    __slots__ = ("done", "error", "item", "wake")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = False
        self.error: BaseException | None = None
        self.wake = threading.Lock()
        self.wake.acquire()


class GroupCommit(Generic[T]):
    """Leader/follower group commit of items submitted by many threads.

    ``flush(items)`` returns one outcome per item (``None`` or the exception for that item).
    ``submit(item)`` returns once a flush including ``item`` has finished, raising the item's
    exception if it had one. Only one flush runs at a time; items submitted meanwhile form
    the next group, flushed by one of their submitters: a finishing leader wakes each
    submitter of its group, and hands the lead to the oldest waiting submitter (each thread
    is woken once, no thundering herd).
    """

    def __init__(self, flush: Callable[[list[T]], Sequence[BaseException | None]]) -> None:
        self._flush = flush
        self._mu = threading.Lock()
        self._pending: list[_Slot[T]] = []
        self._running = False
        #: Flushes run and items flushed (for tests and benchmarks).
        self.flushes = 0
        self.items = 0

    @property
    def waiting(self) -> int:
        """Items submitted and not yet taken by a flush."""
        with self._mu:
            return len(self._pending)

    def submit(self, item: T) -> None:
        """Return once a flush including ``item`` has finished; raise the item's error."""
        error = self.submit_all([item])[0]
        if error is not None:
            raise error

    def submit_all(self, items: Sequence[T]) -> list[BaseException | None]:
        """Submit several items at once; return once all are flushed, with each one's outcome.

        The items join the pending list together, and every flush takes the whole list, so
        they are flushed together: waiting on the first is waiting on all.
        """
        if not items:
            return []
        slots = [_Slot(i) for i in items]
        with self._mu:
            self._pending.extend(slots)
            lead = not self._running
            if lead:
                self._running = True
                group, self._pending = self._pending, []
        if not lead:
            slots[0].wake.acquire()  # done, or handed the lead (``_running`` stays True)
            if not slots[0].done:
                with self._mu:
                    group, self._pending = self._pending, []
                lead = True
        if lead:
            self._lead(group)
        return [s.error for s in slots]

    def _lead(self, group: list[_Slot[T]]) -> None:
        outcomes: Sequence[BaseException | None]
        try:
            outcomes = self._flush([s.item for s in group])
            if len(outcomes) != len(group):
                raise RuntimeError("group commit: flush returned the wrong number of outcomes")
        except BaseException as e:
            outcomes = [e] * len(group)
        for s, o in zip(group, outcomes, strict=True):
            s.error = o
            s.done = True
        with self._mu:
            self.flushes += 1
            self.items += len(group)
            successor = self._pending[0] if self._pending else None
            if successor is None:
                self._running = False
        for s in group:
            s.wake.release()
        if successor is not None:
            successor.wake.release()

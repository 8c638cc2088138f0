"""Filling the kernel's page cache of files before they are read (FUSE ``notify_store``).

Reading ahead into the object files' page cache (:meth:`ObjectStoreAccess.warm`) hides the
disk, but each small file still costs its reader one READ round trip through the daemon,
about as long as the kernel mount takes for the whole file. Instead, the contents of the next
files of a directory read in turn are written straight into the page cache of their FUSE
inodes: the kernel opens files itself (no-open) and keeps their pages, so the reader finds
the data there and the daemon hears nothing until the reader gets past what was stored.

The stores run on threads of their own, never on a thread that answers requests: storing a
page waits for the page's lock, which a READ in flight for that page holds until the daemon
answers it. Only objects already in the store are read (a lazy view's missing object is
skipped, not fetched: its read fetches it), and only whole files, from offset 0, so every
page stored holds the file's true contents. Inodes the kernel no longer holds are skipped
(ENOENT). View slots are never reused, so an inode number always names the same file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import threading
import time
from collections.abc import Callable

from . import metrics

log = logging.getLogger(__name__)

#: (FUSE inode, object path, size) of one file to store.
Item = tuple[int, str | os.PathLike[str], int]
#: Stores into the kernel's page cache of an inode: ``(inode, offset, data)``.
StoreFn = Callable[[int, int, bytes], None]

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY
#: Threads storing files. Several, so that several disk reads are in flight; measured on the
#: small-file benchmark (docs/benchmarks.md): 1 thread leaves half the files to READ.
THREADS = 4
#: Files queued at most; a batch that does not fit is not queued (the reader has outrun the
#: threads, and the caller falls back to warming the objects).
MAX_QUEUED = 256


def _advise(items: list[Item]) -> None:
    """Have the page cache read the objects of ``items`` (without waiting for the disk)."""
    for _, path, size in items:
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError:
            continue
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
        os.close(fd)


class PagePusher:
    """Threads storing whole small files into the kernel's page cache, in queued order."""

    def __init__(self, store: StoreFn, threads: int = THREADS, name: str = "fuse-pagepush"):
        self._store = store
        self._name = name
        self.max_threads = max(1, threads)
        self._jobs: queue.Queue[Item | list[Item] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        #: False once the kernel said it cannot store pages (ENOSYS), or after :meth:`stop`.
        self.enabled = True

    def push(self, items: list[Item]) -> bool:
        """Queue ``items`` to be stored in order; False when not queued (too many waiting,
        stopped, or the kernel cannot store pages): the caller may warm the objects instead."""
        if not self.enabled or not items or self._jobs.qsize() + len(items) >= MAX_QUEUED:
            return False
        while len(self._threads) < self.max_threads:
            t = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(t)
            t.start()
        # First one thread asks the disk for all of them, without waiting, so that the disk
        # works on several at once while the threads store them one by one.
        self._jobs.put(items)
        for item in items:
            self._jobs.put(item)
        return True

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if isinstance(job, list):
                    _advise(job)
                elif self._push(*job):
                    metrics.READAHEAD_FILES.inc()
                    metrics.PAGES_STORED_BYTES.inc(job[2])
            except Exception as e:  # a background nicety: never the daemon's end
                log.debug("reading ahead into the page cache failed: %s", e)

    def _push(self, ino: int, path: str | os.PathLike[str], size: int) -> bool:
        if not self.enabled:
            return False
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError:  # not in the store (lazy view): its read fetches it
            return False
        try:
            data = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        if len(data) != size or not self.enabled:
            return False  # not the size the image records: its READ reports that
        try:
            self._store(ino, 0, data)
        except OSError as e:
            if e.errno == errno.ENOSYS:
                self.enabled = False
                log.warning(
                    "the kernel cannot store FUSE pages (notify_store): reading ahead into "
                    "the object files only"
                )
            elif e.errno != errno.ENOENT:  # ENOENT: the kernel no longer holds the inode
                log.debug("storing inode %d in the page cache: %s", ino, e)
            return False
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Drop what is queued and wait up to ``timeout`` seconds in all for the threads to
        end (before the FUSE session closes: a store needs the session; one waiting for a
        page whose READ will not be answered any more ends when the mount goes)."""
        self.enabled = False
        with contextlib.suppress(queue.Empty):
            while True:
                self._jobs.get_nowait()
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("%s did not end within %.0f s", t.name, timeout)
        self._threads.clear()

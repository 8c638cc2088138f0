"""Object files behind a view: a bounded cache of open descriptors and lazy fetching.

Objects in the store are verified (their fs-verity digest recomputed) when the store inserts
them, and the store never changes an object in place, so the data plane trusts what it finds
under ``objects/`` and does not re-hash on open.

Descriptors are reference counted: a FUSE open holds its object's descriptor until release, and
released descriptors stay open in an LRU of at most ``max_idle`` entries, so hot files are not
reopened and a descriptor is never closed under a concurrent ``pread``.

Lazy views fetch a missing object on first open. Fetches are single-flight per object: a read
that finds the object already being fetched (by another read or by the background prefetch)
waits for that fetch. Reads that wait get their own pool of threads, so they never queue behind
the background prefetch; opens of objects already in the store never touch the fetcher.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import trio

from . import metrics
from .iothreads import IoThreads

log = logging.getLogger(__name__)

OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY


class ObjectSource(Protocol):
    """Where a lazy view gets missing objects from (a configured repository)."""

    def fetch(self, digest: bytes, size: int) -> None:
        """Fetch one object of ``size`` bytes (as the image records it: the download stops
        there) into the store and verify it; blocking; raise on failure."""
        ...


class ObjectMissing(Exception):
    """The object is not in the store and cannot be fetched (the kernel answers ENOENT)."""


class ObjectUnavailable(Exception):
    """Fetching the object failed or timed out (answered with EIO)."""


#: Reads this large that continue the previous one are treated as a sequential stream.
_SEQUENTIAL_MIN = 128 * 1024
#: Reads up to this size are first tried on the calling (trio) thread with ``RWF_NOWAIT``:
#: served from the page cache without a trip to a worker thread, or not at all.
_NOWAIT_MAX = _SEQUENTIAL_MIN
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
#: Small reads of local objects that are not cached are done on the trio thread itself, as
#: long as such reads take less than this on average: handing one to a worker thread and
#: back costs the trio thread about 0.1-0.15 ms of CPU on the project machine, more than a
#: local disk takes to answer, and the kernel sends a sequential reader's requests one at a
#: time anyway. Slower storage (network disks) keeps them on worker threads, where several
#: run at once.
INLINE_IO_MAX = 0.0005
#: Weight of each new measurement in the average I/O time.
_IO_EWMA_WEIGHT = 0.05
#: How far ahead of a sequential stream the object's pages are requested from the disk.
_READ_AHEAD = 8 << 20


def _pread(fd: int, size: int, offset: int, sequential: bool) -> bytes:
    """``pread``; for a sequential stream, also start reading the next stretch from disk, so
    the disk works while the kernel and the FUSE round trip deliver this chunk."""
    data = os.pread(fd, size, offset)
    if sequential and len(data) == size:
        os.posix_fadvise(fd, offset + size, _READ_AHEAD, os.POSIX_FADV_WILLNEED)
    return data


def _pread_cached(fd: int, size: int, offset: int) -> bytearray | None:
    """The ``size`` bytes at ``offset`` if the page cache holds all of them (or all up to
    the end of the file), without blocking; None if the disk would be needed."""
    buf = bytearray(size)
    try:
        n = os.preadv(fd, [buf], offset, _RWF_NOWAIT)
    except BlockingIOError:
        return None
    if n == size:
        return buf
    # Short: the end of the file, or only part of it cached. A short reply tells the kernel
    # the file ends there, so only a read that shows the end is used.
    if n == 0 or os.fstat(fd).st_size > offset + n:
        return None
    del buf[n:]
    return buf


def _open_pread(path: str | os.PathLike[str], size: int, offset: int) -> tuple[int, bytes, float]:
    """Open an object and read from it (one trip to a worker thread for both); also how
    long that took."""
    started = time.perf_counter()
    fd = os.open(path, OPEN_FLAGS)
    try:
        data = os.pread(fd, size, offset)
    except BaseException:
        os.close(fd)
        raise
    return fd, data, time.perf_counter() - started


def _timed_pread(fd: int, size: int, offset: int) -> tuple[bytes, float]:
    started = time.perf_counter()
    data = os.pread(fd, size, offset)
    return data, time.perf_counter() - started


def _open_willneed(paths: list[str | os.PathLike[str]], sizes: list[int]) -> list[int]:
    """Open each object and ask the page cache to read it whole, without waiting for the
    disk; a descriptor each (-1 where the object could not be opened)."""
    fds = []
    for path, size in zip(paths, sizes, strict=True):
        try:
            fd = os.open(path, OPEN_FLAGS)
        except OSError:
            fds.append(-1)
            continue
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
        fds.append(fd)
    return fds


@dataclass(eq=False, slots=True)
class ObjectFile:
    digest: bytes
    fd: int
    refs: int = 0
    #: Where the last read through this descriptor ended (sequential stream detection).
    next_offset: int = -1


class FdCache:
    """Open object descriptors by digest; idle ones kept in an LRU of bounded size.

    Only ever used from the trio thread (no locking needed).
    """

    def __init__(self, max_idle: int) -> None:
        self.max_idle = max(0, max_idle)
        self._files: dict[bytes, ObjectFile] = {}
        self._idle: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._files

    def acquire(self, digest: bytes) -> ObjectFile | None:
        f = self._files.get(digest)
        if f is None:
            return None
        if f.refs == 0:
            self._idle.pop(digest, None)
        f.refs += 1
        return f

    def insert(self, digest: bytes, fd: int) -> ObjectFile:
        """Add a freshly opened descriptor, acquired; if one raced in first, use that one."""
        existing = self.acquire(digest)
        if existing is not None:
            os.close(fd)
            return existing
        f = ObjectFile(digest, fd, 1)
        self._files[digest] = f
        metrics.OBJECT_FDS.set(len(self._files))
        return f

    def release(self, f: ObjectFile) -> None:
        f.refs -= 1
        if f.refs > 0:
            return
        if self._files.get(f.digest) is not f:  # already dropped by close_all
            os.close(f.fd)
            return
        self._idle[f.digest] = None
        while len(self._idle) > self.max_idle:
            digest, _ = self._idle.popitem(last=False)
            victim = self._files.pop(digest)
            os.close(victim.fd)
        metrics.OBJECT_FDS.set(len(self._files))

    def close_all(self) -> None:
        """Close idle descriptors; those in use are closed when released."""
        for digest in list(self._idle):
            os.close(self._files.pop(digest).fd)
        self._idle.clear()
        self._files.clear()  # descriptors still in use are closed by their last release
        metrics.OBJECT_FDS.set(0)


@dataclass(eq=False)
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


@dataclass
class FetchProgress:
    """Background prefetch state of one lazy view (for the control API's status)."""

    total: int = 0
    missing: int = 0
    fetched: int = 0
    failed: int = 0
    state: str = "idle"  # idle | running | done | failed | cancelled
    last_error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "objects": self.total,
            "missing": self.missing,
            "fetched": self.fetched,
            "failed": self.failed,
            "state": self.state,
            "last_error": self.last_error,
        }


class ObjectStoreAccess:
    """Opens objects of the store for reads, fetching missing ones for lazy views."""

    def __init__(
        self,
        object_path: Callable[[bytes], str | os.PathLike[str]],
        *,
        fd_cache_size: int,
        io_threads: int,
        demand_fetch_threads: int,
        prefetch_threads: int,
        fetch_timeout: float,
    ) -> None:
        self.object_path = object_path
        self.fds = FdCache(fd_cache_size)
        #: Threads for the opens and reads of FUSE requests.
        self.io = IoThreads(io_threads)
        #: For other file work that goes to trio's threads (prefetch scans).
        self.io_limiter = trio.CapacityLimiter(io_threads)
        self._demand_limiter = trio.CapacityLimiter(demand_fetch_threads)
        self._prefetch_workers = max(1, prefetch_threads)
        self._prefetch_limiter = trio.CapacityLimiter(self._prefetch_workers)
        # Fetch threads of flights already admitted by one of the two limiters above.
        self._flight_limiter = trio.CapacityLimiter(demand_fetch_threads + prefetch_threads)
        self.fetch_timeout = fetch_timeout
        #: Average time of a small object read that was not cached (seconds).
        self.io_time = 0.0
        self._flights: dict[bytes, _Flight] = {}
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Give the access a nursery for fetches that outlive the request that started them."""
        self._nursery = nursery

    def has_object(self, digest: bytes) -> bool:
        return os.path.isfile(self.object_path(digest))

    async def acquire(self, digest: bytes, size: int, source: ObjectSource | None) -> ObjectFile:
        """An open descriptor for the object of ``size`` bytes (release it with
        :meth:`release`)."""
        cached = self.fds.acquire(digest)
        if cached is not None:
            return cached
        path = self.object_path(digest)
        try:
            fd = await self.io.run(os.open, path, OPEN_FLAGS)
        except FileNotFoundError:
            if source is None:
                metrics.MISSING_OBJECTS.inc()
                log.warning("object %s is not in the store (%s)", digest.hex(), path)
                raise ObjectMissing(digest.hex()) from None
            await self._wait_for(digest, size, source)
            try:
                fd = await self.io.run(os.open, path, OPEN_FLAGS)
            except FileNotFoundError:
                log.error("object %s still missing after a successful fetch", digest.hex())
                raise ObjectUnavailable(digest.hex()) from None
        return self.fds.insert(digest, fd)

    def release(self, f: ObjectFile) -> None:
        self.fds.release(f)

    def warm(self, objects: list[tuple[bytes, int]]) -> None:
        """Have the page cache read ``objects`` (digest, size) in the background and keep
        their descriptors ready; objects not in the store are skipped (nothing is fetched)."""
        todo = [(d, size) for d, size in objects if d not in self.fds]
        if todo and self._nursery is not None:
            self._nursery.start_soon(self._warm, todo)

    async def _warm(self, todo: list[tuple[bytes, int]]) -> None:
        try:
            fds = await self.io.run(
                _open_willneed, [self.object_path(d) for d, _ in todo], [s for _, s in todo]
            )
        except Exception as e:  # a background nicety: never the daemon's end
            log.debug("read-ahead of %d object(s) failed: %s", len(todo), e)
            return
        warmed = 0
        for (digest, _), fd in zip(todo, fds, strict=True):
            if fd >= 0:
                self.fds.release(self.fds.insert(digest, fd))
                warmed += 1
        metrics.READAHEAD_FILES.inc(warmed)

    async def read(
        self, digest: bytes, size: int, source: ObjectSource | None, length: int, offset: int
    ) -> bytes:
        """``length`` bytes at ``offset`` of the object of ``size`` bytes, fetched first for
        a lazy view (``source``), without holding a descriptor afterwards (reads that name
        the inode: the kernel opened the file itself).

        Small reads are served on the calling thread when the page cache has the data, or
        while local reads are fast (:data:`INLINE_IO_MAX`); otherwise one trip to a worker
        thread opens (when no descriptor is cached) and reads.
        """
        small = length <= _NOWAIT_MAX
        f = self.fds.acquire(digest)
        if f is None:
            path = self.object_path(digest)
            try:
                if small and self.io_time < INLINE_IO_MAX:
                    fd, data, took = _open_pread(path, length, offset)
                else:
                    fd, data, took = await self.io.run(_open_pread, path, length, offset)
            except FileNotFoundError:
                f = await self.acquire(digest, size, source)
            else:
                if small:
                    self._observe(took)
                f = self.fds.insert(digest, fd)
                f.next_offset = offset + len(data)
                self.fds.release(f)
                return data
        try:
            if not small:
                return await self.pread(f, length, offset)
            if _RWF_NOWAIT:
                cached = _pread_cached(f.fd, length, offset)
                if cached is not None:
                    f.next_offset = offset + len(cached)
                    return bytes(cached)
            if self.io_time < INLINE_IO_MAX:
                data, took = _timed_pread(f.fd, length, offset)
            else:
                data, took = await self.io.run(_timed_pread, f.fd, length, offset)
            self._observe(took)
            f.next_offset = offset + len(data)
            return data
        finally:
            self.fds.release(f)

    def _observe(self, seconds: float) -> None:
        self.io_time += (seconds - self.io_time) * _IO_EWMA_WEIGHT

    async def pread(self, f: ObjectFile, size: int, offset: int) -> bytes:
        sequential = offset == f.next_offset and size >= _SEQUENTIAL_MIN
        f.next_offset = offset + size
        return await self.io.run(_pread, f.fd, size, offset, sequential)

    # -- lazy fetching -------------------------------------------------------------------

    async def _wait_for(self, digest: bytes, size: int, source: ObjectSource) -> None:
        started = time.monotonic()
        flight = self._flights.get(digest)
        if flight is None:
            flight = self._start_flight(digest, size, source, self._demand_limiter, "demand")
        with trio.move_on_after(self.fetch_timeout) as scope:
            await flight.done.wait()
        metrics.LAZY_FETCH_WAIT.observe(time.monotonic() - started)
        if scope.cancelled_caught:
            log.error(
                "object %s: no fetch result after %.0f s; failing the read",
                digest.hex(),
                self.fetch_timeout,
            )
            raise ObjectUnavailable(digest.hex())
        if flight.error is not None:
            raise ObjectUnavailable(digest.hex()) from flight.error

    def _start_flight(
        self,
        digest: bytes,
        size: int,
        source: ObjectSource,
        limiter: trio.CapacityLimiter,
        trigger: str,
    ) -> _Flight:
        if self._nursery is None:
            raise RuntimeError("ObjectStoreAccess.start() was not called")
        flight = _Flight()
        self._flights[digest] = flight
        self._nursery.start_soon(self._run_flight, digest, size, source, limiter, flight, trigger)
        return flight

    async def _run_flight(
        self,
        digest: bytes,
        size: int,
        source: ObjectSource,
        limiter: trio.CapacityLimiter | None,
        flight: _Flight,
        trigger: str,
    ) -> None:
        try:
            if limiter is not None:
                await limiter.acquire()
            try:
                await trio.to_thread.run_sync(
                    source.fetch, digest, size, limiter=self._flight_limiter
                )
            finally:
                if limiter is not None:
                    limiter.release()
            metrics.LAZY_FETCHES.labels(trigger, "ok").inc()
        except Exception as e:
            metrics.LAZY_FETCHES.labels(trigger, "error").inc()
            log.error("fetching object %s failed: %s", digest.hex(), e)
            flight.error = e
        finally:
            if self._flights.get(digest) is flight:
                del self._flights[digest]
            flight.done.set()

    async def prefetch(
        self, sizes: Mapping[bytes, int], source: ObjectSource, progress: FetchProgress
    ) -> None:
        """Fetch every missing object of ``sizes`` (digest: size; runs until done or
        cancelled)."""
        todo = sorted(sizes)
        progress.total = len(todo)
        missing = await trio.to_thread.run_sync(
            lambda: [d for d in todo if not self.has_object(d)], limiter=self.io_limiter
        )
        progress.missing = len(missing)
        progress.state = "running"
        queue = iter(missing)

        async def worker() -> None:
            for digest in queue:
                flight = self._flights.get(digest)
                if flight is None:
                    async with self._prefetch_limiter:
                        flight = self._flights.get(digest)
                        if flight is None:
                            if await trio.to_thread.run_sync(
                                self.has_object, digest, limiter=self.io_limiter
                            ):
                                progress.missing -= 1
                                continue
                            # A read may have started a fetch while we looked: join it.
                            flight = self._flights.get(digest)
                            if flight is None:
                                flight = _Flight()
                                self._flights[digest] = flight
                                await self._run_flight(
                                    digest, sizes[digest], source, None, flight, "prefetch"
                                )
                if not flight.done.is_set():
                    await flight.done.wait()
                if flight.error is None:
                    progress.fetched += 1
                    progress.missing -= 1
                else:
                    progress.failed += 1
                    progress.last_error = f"{digest.hex()}: {flight.error}"

        try:
            async with trio.open_nursery() as n:
                for _ in range(self._prefetch_workers):
                    n.start_soon(worker)
        except trio.Cancelled:
            progress.state = "cancelled"
            raise
        progress.state = "failed" if progress.failed else "done"

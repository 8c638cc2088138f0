"""Downloading many objects in worker processes.

Fetching objects costs CPU as much as network: every 4 KiB block is hashed (fs-verity) in
Python. In one process the fetching threads queue on the GIL, and so does the store's flush
leader, after each of its system calls: on 2 CPUs a 1 GiB / 10k-object image took 11 s that
way. For an eager fetch of many objects the client therefore hands them, a few at a time, to
worker processes. A worker downloads each object exactly as an in-process download does (the
same mirrors, retries, limits and checks: :meth:`csi.fetch.download.Downloader.download`), into
a temp file of the store named after the parent process (so the store's cleaner leaves it
alone while the parent lives, and removes it once the parent is gone). Then, still in the
worker and under the parent's claim, it makes them durable and names them in the store's
``objects/`` (:mod:`csi.fetch.naming`); the parent only records their rows. Done in the
parent, those ten-odd system calls per object made it the serial part of a big fetch, its
threads passing the GIL at every call (docs/benchmarks.md). Counters a worker moved are
carried back and added to the parent's metrics.

A worker that runs out of space reports it; the parent fetches that object again in-process,
where a full store triggers garbage collection.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import multiprocessing
import os
import secrets
import select
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from prometheus_client import Counter

from csi.image.fsverity import register_idle_thread
from csi.limits import raise_open_files_limit
from csi.repo.tmpfiles import (
    WORKER_TEMP_SUFFIX,
    TempFile,
    pid_alive,
    remove_worker_dirs,
    worker_dir,
)
from csi.store import DigestMismatch, ObjectWriter, StoreFull

from . import errors
from . import metrics as m
from .config import RepositoryConfig
from .download import Downloader, object_relpath
from .errors import SourceCorrupt, SourceError
from .http import HttpSource, Request
from .mirrors import Mirrors
from .naming import Failed, Named, Written, name_written
from .naming import verity_known as naming_verity
from .packs import RangeEntry, RangeJob, RangeSplitter, decode
from .source import Response, Source

log = logging.getLogger(__name__)

#: The counters whose worker-side increments are carried back to the parent.
_CARRIED: dict[str, Counter] = {
    "bytes": m.BYTES,
    "objects": m.OBJECTS,
    "retries": m.RETRIES,
    "digest_mismatches": m.DIGEST_MISMATCHES,
    "pack_ranges": m.PACK_RANGES,
}

CounterDelta = list[tuple[str, dict[str, str], float]]


ChunkResult = tuple[list[Named | Failed], CounterDelta]


class _TempObject:
    """One object being written to a new temp file of the store's temp area, kept (unnamed)
    for the parent once verified. (No lock descriptor: the name says whose file it is; see
    tmpfiles.TempArea.clean.)

    Buffered, not direct I/O: a direct write blocks the worker until the disk has the data,
    and the padded last block costs a read-modify-write at truncation; buffered, the writes
    return at once and the parent's group flush writes them back (docs/benchmarks.md).
    """

    __slots__ = ("digest", "fd", "got", "path", "writer")

    def __init__(self, tmpdir: str, tag: str, digest: bytes) -> None:
        self.digest = digest
        self.got = 0  # bytes received (passed to write)
        self.path = os.path.join(tmpdir, f"{tag}-{_temp_name()}{WORKER_TEMP_SUFFIX}")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            self.writer = ObjectWriter(TempFile(self.path, self.fd, -1), digest)
        except BaseException:
            self.discard()
            raise

    def write(self, chunk: bytes) -> None:
        self.writer.write(chunk)
        self.got += len(chunk)

    def keep(self, kind: str = "object") -> int:
        """Write out and verify: the file then holds exactly the object. Its size. The
        descriptor stays open (:attr:`fd`) while the chunk may keep it (:data:`_fds`), for
        the naming step; otherwise it is closed (-1)."""
        try:
            self.writer.finish()
            actual = self.writer.digest()
        finally:
            self.writer.close()
        if actual != self.digest:
            raise DigestMismatch(self.digest, actual, f"{kind} {self.digest.hex()}")
        if not _mode_exact:
            os.fchmod(self.fd, 0o644)
        if not _fds.take():
            fd, self.fd = self.fd, -1
            os.close(fd)
        return self.writer.size

    def kept(self, received: int | None = None) -> Written:
        """What :meth:`keep` leaves for the naming step (the open descriptor goes with it);
        ``received``: bytes to count for it (default: those written)."""
        fd, self.fd = self.fd, -1
        got = self.got if received is None else received
        return Written(self.digest, self.path, self.writer.size, got, fd)

    def discard(self) -> None:
        """Close and remove the temp file (idempotent)."""
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class _TempSink:
    """What a worker's sequential downloads write into: ``ensure`` as the store has it, but
    each object goes to a :class:`_TempObject`."""

    def __init__(self, tmpdir: str, tag: str) -> None:
        self.tmpdir = tmpdir
        self.tag = tag
        self.written: list[Written] = []

    def ensure(
        self,
        digest: bytes,
        fill: Callable[[ObjectWriter], None],
        *,
        kind: str = "object",
        size_hint: int | None = None,
    ) -> bool:
        obj = _TempObject(self.tmpdir, self.tag, digest)
        try:
            fill(obj.writer)
            obj.keep(kind)
        except BaseException:
            obj.discard()
            raise
        self.written.append(obj.kept())
        return True


# -- worker process -----------------------------------------------------------------------------


class _FdBudget:
    """How many written files a chunk may keep open until they are named (set by
    :func:`_init` from the open-files limit; none in a process that did not run it)."""

    __slots__ = ("left", "per_chunk")

    def __init__(self) -> None:
        self.per_chunk = 0
        self.left = 0

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


#: Keeping the descriptor that wrote a file until it is named saves closing and opening it
#: again (two of the ten-odd system calls per object); not where fs-verity is enabled, which
#: refuses a file open for writing.
_fds = _FdBudget()
#: At most this many per chunk (see :func:`_limits_setup`).
KEPT_FDS_MAX = 640
#: Whether a file created with mode 0644 gets exactly 0644 (the umask takes nothing from it):
#: then no ``fchmod`` per object.
_mode_exact = False
#: Temp names: this process's random part and a counter (no random bytes per file).
_name_prefix: str | None = None
_name_count = itertools.count()


#: This worker's temp directory in each temp area, by (temp area, owner).
_dirs: dict[tuple[str, str], str] = {}


def _own_dir(tmpdir: str, owner: str) -> str:
    """The directory this worker writes its temp files in for ``owner`` (one per worker:
    see :data:`csi.repo.tmpfiles.WORKER_DIR_SUFFIX`)."""
    key = (tmpdir, owner)
    path = _dirs.get(key)
    if path is None or not os.path.isdir(path):  # removed behind our back: made again
        path = _dirs[key] = worker_dir(tmpdir, owner, _name_prefix or secrets.token_hex(6))
    return path


def _temp_name() -> str:
    if _name_prefix is None:
        return secrets.token_hex(8)
    return f"{_name_prefix}{next(_name_count):x}"


def _limits_setup() -> None:
    """At a worker's start: its open-files budget, whether the umask keeps 0644, and its
    temp-name prefix."""
    global _mode_exact, _name_prefix
    soft = raise_open_files_limit()
    # Room for the worker's own descriptors (pipes, connections), and all of them below
    # FD_SETSIZE: a connection opened while files are kept gets the lowest free number, and
    # the multi handle's wait (pycurl's select) does not see a descriptor of 1024 or more.
    _fds.per_chunk = max(0, min(soft - 512, KEPT_FDS_MAX))
    mask = os.umask(0o022)
    os.umask(mask)
    _mode_exact = mask & 0o644 == 0
    _name_prefix = secrets.token_hex(6)


_client: Downloader | None = None  # the worker's downloader (one per process; set by _init)
_parallel = 1  # requests a worker runs at once (set by _init)
#: Small objects: a worker keeps up to this many bytes of them asked for at once (and at most
#: SMALL_PARALLEL_MAX times ``_parallel`` requests), so that round trips do not set the pace.
SMALL_BYTES_IN_FLIGHT = 1 << 20
SMALL_PARALLEL_MAX = 4


def _init(
    config: RepositoryConfig,
    parent: int,
    log_level: int,
    log_format: str | None,
    parallel: int = 1,
) -> None:
    global _client, _parallel
    _parallel = max(1, parallel)
    # Log as the parent does (level and line format; to the stderr we share with it).
    if log_format is not None:
        logging.basicConfig(level=log_level, format=log_format)
    else:
        logging.basicConfig(level=log_level)
    _client = Downloader(Mirrors(config))
    _limits_setup()
    _exit_with(parent)


def _log_setup() -> tuple[int, str | None]:
    root = logging.getLogger()
    for h in root.handlers:
        fmt = getattr(h.formatter, "_fmt", None)
        if isinstance(fmt, str):
            return root.level, fmt
    return root.level, None


def _exit_with(pid: int) -> None:
    """End this worker as soon as process ``pid`` ends (even by SIGKILL): an orphaned pool
    worker would otherwise wait for work forever."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # already gone, or no pidfd (Linux < 5.3)
        if not pid_alive(pid):
            os._exit(70)
        return

    def watch() -> None:
        select.select([pidfd], [], [])
        os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    register_idle_thread()  # it only waits: hashing may go on one block per call


def _counters() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for key, metric in _CARRIED.items():
        for family in metric.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[(key, tuple(sorted(s.labels.items())))] = s.value
    return out


def _fetch_chunk(
    tmpdir: str,
    tag: str,
    items: list[tuple[bytes, int | None]],
    ranges: list[RangeJob] | None,
    repo_root: str,
    fsync: bool,
    verity: bool,
) -> ChunkResult:
    """Worker: fetch ``items`` (digest, size) into temp files in this worker's directory of
    ``tmpdir`` (:func:`_own_dir`), then make
    them durable (``fsync``: the store syncs its writes) and name them under ``repo_root``,
    the store's repository, with fs-verity if ``verity`` (:func:`csi.fetch.naming.name_written`).

    From an HTTP(S) repository the first attempt at each object is one of up to ``_parallel``
    requests run together (:meth:`HttpSource.get_many`): one sleep and wake-up for several
    objects rather than one per object. An object whose first attempt fails goes on, after
    the others, through :meth:`Downloader.download` with that failure counted as its
    first attempt: the same mirrors, retries, limits, checks and metrics as in-process.

    With ``ranges`` the items come out of pack files instead (:func:`_from_ranges`); an item
    that does not goes on the same way.
    """
    downloader = _client
    assert downloader is not None, "bulk worker used before _init"
    before = _counters()
    results: dict[bytes, Written | Failed] = {}
    src = downloader.mirrors.sources[0]
    # fs-verity refuses a file open for writing: keep descriptors only where it is off.
    _fds.left = _fds.per_chunk if not verity or naming_verity() is False else 0
    own = _own_dir(tmpdir, tag)
    try:
        if ranges:
            again = _from_ranges(downloader, src, own, tag, items, ranges, results)
        elif isinstance(src, HttpSource) and len(items) > 1 and _parallel > 1:
            again = _first_attempts(downloader, src, own, tag, items, results)
        else:
            again = [(d, size, None, 0) for d, size in items]
        for digest, size, prior, got in again:
            results[digest] = _fetch_one(downloader, own, tag, digest, size, prior, got)
    except BaseException:
        for r in results.values():  # not named: the temp files are left to the cleaner
            if isinstance(r, Written) and r.fd >= 0:
                os.close(r.fd)
        raise
    named = name_written([results[d] for d, _ in items], tmpdir, repo_root, fsync, verity)
    after = _counters()
    delta: CounterDelta = [
        (key, dict(labels), v - before.get((key, labels), 0.0))
        for (key, labels), v in after.items()
        if v != before.get((key, labels), 0.0)
    ]
    return named, delta


_Again = tuple[bytes, int | None, SourceError | None, int]


def _first_attempts(
    downloader: Downloader,
    src: HttpSource,
    tmpdir: str,
    tag: str,
    items: list[tuple[bytes, int | None]],
    results: dict[bytes, Written | Failed],
) -> list[_Again]:
    """First attempts, run together; fills ``results`` and returns what to try again as
    (digest, size, how its first attempt failed, bytes it received)."""
    again: list[_Again] = []
    started: dict[bytes, _TempObject] = {}

    def begin(item: tuple[bytes, int | None]) -> Request:
        digest, size = item
        obj = started[digest] = _TempObject(tmpdir, tag, digest)
        return Request(object_relpath(digest), obj.write, size)

    try:
        for (digest, size), outcome in src.get_many(items, begin, parallel=in_flight(items)):
            subject = f"object {digest.hex()}"
            obj = started.pop(digest, None)
            if obj is None:  # begin() failed: no temp file; the outcome is its error
                assert not isinstance(outcome, Response)
                results[digest] = _no_space(digest, subject, outcome)
                continue
            if isinstance(outcome, Response):
                try:
                    obj.keep()
                except DigestMismatch as e:
                    obj.discard()
                    again.append((digest, size, downloader.attempt_failed(e, obj.got), obj.got))
                    continue
                except Exception as e:
                    obj.discard()
                    results[digest] = _no_space(digest, subject, e)
                    continue
                downloader.attempt_ok(obj.got, stored=True)
                results[digest] = obj.kept()
                continue
            obj.discard()
            if isinstance(outcome, SourceError):
                again.append((digest, size, downloader.attempt_failed(outcome, obj.got), obj.got))
            else:
                results[digest] = _no_space(digest, subject, outcome)
    finally:
        for obj in started.values():  # started, not ended (an unexpected error above)
            obj.discard()
    return again


def _from_ranges(
    downloader: Downloader,
    src: Source,
    tmpdir: str,
    tag: str,
    items: list[tuple[bytes, int | None]],
    ranges: list[RangeJob],
    results: dict[bytes, Written | Failed],
) -> list[_Again]:
    """Items out of pack ranges (:mod:`csi.fetch.packs`): the ranges' first attempts run
    together over HTTP; a range that fails goes on through the retry loop (every mirror),
    asking only for the entries still missing. Each entry is decoded, written and checked
    against its digest; what is not fetched so (its range failed for good, it did not decode
    or verify, no range holds it) is returned to be fetched from ``objects/``. Only ``items``
    are written (the objects the parent claimed); other entries' bytes are read past."""
    wanted = dict(items)
    again: dict[bytes, _Again] = {}

    def deliver(e: RangeEntry, data: bytes, skipped: int) -> None:
        got = skipped + e.length  # a gap's bytes count with the entry after it
        if e.digest not in wanted or e.digest in results or e.digest in again:
            downloader.attempt_ok(got, stored=False)  # read past: not this chunk's
            return
        subject = f"object {e.digest.hex()}"
        try:
            body = decode(e, data)
        except ValueError as err:
            again[e.digest] = (
                e.digest,
                e.size,
                downloader.attempt_failed(SourceCorrupt(f"from a pack: {err}"), got),
                got,
            )
            return
        try:
            obj = _TempObject(tmpdir, tag, e.digest)
        except OSError as err:
            results[e.digest] = _no_space(e.digest, subject, err)
            return
        try:
            obj.write(body)
            obj.keep()
        except DigestMismatch as err:
            obj.discard()
            again[e.digest] = (e.digest, e.size, downloader.attempt_failed(err, got), got)
            return
        except Exception as err:
            obj.discard()
            results[e.digest] = _no_space(e.digest, subject, err)
            return
        downloader.attempt_ok(got, stored=True)
        results[e.digest] = obj.kept(got)

    def rest_of(job: RangeJob, source: Source) -> None:
        """One attempt at the entries of ``job`` not settled yet."""
        left = [e for e in job.entries if e.digest not in results and e.digest not in again]
        if not left:
            return
        start = left[0].offset
        end = left[-1].offset + left[-1].length
        splitter = RangeSplitter(tuple(e._replace(offset=e.offset - start) for e in left), deliver)
        source.get(job.relpath, splitter.feed, span=(job.offset + start, end - start))

    failed: list[tuple[RangeJob, SourceError | None]] = []
    if isinstance(src, HttpSource) and len(ranges) > 1 and _parallel > 1:

        def begin(job: RangeJob) -> Request:
            splitter = RangeSplitter(job.entries, deliver)
            return Request(job.relpath, splitter.feed, span=(job.offset, job.length))

        for job, outcome in src.get_many(ranges, begin, parallel=_parallel):
            if isinstance(outcome, SourceError):
                failed.append((job, downloader.attempt_failed(outcome, 0)))
            elif not isinstance(outcome, Response):
                raise outcome
            else:
                m.PACK_RANGES.labels(downloader.name, "ok").inc()
    else:
        failed = [(job, None) for job in ranges]
    for job, prior in failed:
        subject = f"{job.relpath} bytes {job.offset}-{job.offset + job.length - 1}"
        try:
            downloader.mirrors.attempts(subject, functools.partial(rest_of, job), prior)
        except errors.FetchError:  # what it held comes from objects/ (below)
            m.PACK_RANGES.labels(downloader.name, "error").inc()
        else:
            m.PACK_RANGES.labels(downloader.name, "ok").inc()
    out = list(again.values())
    out.extend((d, size, None, 0) for d, size in items if d not in results and d not in again)
    return out


def in_flight(items: list[tuple[bytes, int | None]]) -> int:
    """Requests to run at once for ``items``: ``_parallel``, or more for small objects, as
    many as keep :data:`SMALL_BYTES_IN_FLIGHT` asked for (at most ``SMALL_PARALLEL_MAX``
    times ``_parallel``): over a long round trip one request per object is otherwise paced by
    the round trip, not by the bandwidth."""
    known = [size for _, size in items if size is not None]
    if not known:
        return _parallel
    mean = max(1, sum(known) // len(known))
    want = -(-SMALL_BYTES_IN_FLIGHT // mean)
    return max(_parallel, min(SMALL_PARALLEL_MAX * _parallel, want))


def _no_space(digest: bytes, subject: str, e: Exception) -> Failed:
    """A failure on our side (the temp area, not the repository's): the parent fetches the
    object again in-process, where a full store gets garbage-collected."""
    if isinstance(e, StoreFull):
        return Failed(digest, "no_space", str(e), subject, 0)
    if isinstance(e, OSError):
        return Failed(digest, "no_space", f"writing a temp file: {e}", subject, 0)
    raise e


def _fetch_one(
    downloader: Downloader,
    tmpdir: str,
    tag: str,
    digest: bytes,
    size: int | None,
    prior: SourceError | None,
    received: int,
) -> Written | Failed:
    """One object through the download loop (after ``prior``, if any)."""
    h = digest.hex()
    sink = _TempSink(tmpdir, tag)
    subject = f"object {h}"
    try:
        _stored, got = downloader.download(
            sink,
            digest,
            kind="object",
            subject=subject,
            relpath=object_relpath(digest),
            size=size,
            progress=None,
            prior=prior,
        )
    except errors.NoSpace as e:
        return Failed(digest, "no_space", str(e), subject, received)
    except errors.FetchError as e:
        return Failed(digest, type(e).__name__, str(e), e.subject, received)
    except (StoreFull, OSError) as e:
        return _no_space(digest, subject, e)
    w = sink.written[-1]
    return w._replace(received=received + got)


# -- parent ---------------------------------------------------------------------------------------


def default_processes(concurrency: int) -> int:
    """Workers when the configuration does not say: two per CPU, at most 8 and at most
    ``concurrency``."""
    return max(1, min(concurrency, 8, 2 * (os.cpu_count() or 1)))


class BulkPool:
    """The worker processes of one repository client (started on first use, or ahead of it by
    :meth:`warm`)."""

    def __init__(self, config: RepositoryConfig, processes: int) -> None:
        self.config = config
        self.processes = processes
        #: Requests each worker runs at once: together, the configured concurrency.
        self.parallel = max(1, -(-config.concurrency // processes))
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._warming = False
        self._closed = False
        self._id = secrets.token_hex(4)
        #: (temp area, tag) of every fetch handed to the workers: their directories there
        #: are removed once the workers have ended.
        self._areas: set[tuple[str, str]] = set()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker processes were shut down")
            if self._pool is None:
                ctx = multiprocessing.get_context("forkserver")
                # Workers fork from a server that has imported this module (and with it pycurl,
                # the store and the downloader) once, instead of each importing them (if the server
                # runs already, started by someone else, this is a no-op).
                ctx.set_forkserver_preload([__name__])
                self._pool = ProcessPoolExecutor(
                    self.processes,
                    mp_context=ctx,
                    initializer=_init,
                    initargs=(self.config, os.getpid(), *_log_setup(), self.parallel),
                )
            return self._pool

    def warm(self) -> None:
        """Start the worker processes in the background, so that a fetch about to hand them
        objects does not wait for them to start (about 0.1-0.3 s, paid once per client)."""
        with self._lock:
            if self._pool is not None or self._warming or self._closed:
                return
            self._warming = True
        threading.Thread(target=self._warm, name="bulk-warm", daemon=True).start()

    def _warm(self) -> None:
        try:
            pool = self._executor()
            # Each task submitted while no worker is idle starts one more process.
            for _ in range(self.processes):
                pool.submit(os.getpid)
        except Exception as e:  # shut down meanwhile, or cannot start: fetch() will tell
            log.debug("starting fetch worker processes ahead of use: %s", e)

    def fetch(
        self,
        tmpdir: Path,
        owner: str,
        items: list[tuple[bytes, int | None]],
        ranges: list[RangeJob] | None = None,
        *,
        repo_root: Path,
        fsync: bool = True,
        verity: bool = True,
    ) -> ChunkResult:
        """Fetch ``items`` in a worker and name them in the store whose repository is
        ``repo_root`` (blocks until done; the caller holds their claim); apply its counters
        here. The worker's temp files in ``tmpdir`` are marked with ``owner``, this process's
        owner id in that temp area (:meth:`csi.repo.tmpfiles.TempArea.owner`): in use while
        it lives.

        A worker that dies (killed, out of memory) breaks its pool: this call raises, and
        the next one starts new workers. ``ranges``: take the items out of these pack
        ranges (:mod:`csi.fetch.packs`) where they can.
        """
        pool = self._executor()
        # Marks the temp files and directories as the owner's, and as this pool's.
        tag = f"{owner}-{self._id}"
        with self._lock:
            self._areas.add((str(tmpdir), tag))
        try:
            results, delta = pool.submit(
                _fetch_chunk, str(tmpdir), tag, items, ranges, str(repo_root), fsync, verity
            ).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
                    self._warming = False
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        for key, labels, v in delta:
            _CARRIED[key].labels(**labels).inc(v)
        return results, delta

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            areas, self._areas = self._areas, set()
        for tmpdir, tag in areas:
            remove_worker_dirs(tmpdir, tag)

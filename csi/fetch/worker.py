"""A fetch worker process: downloads a chunk of objects into its temp files
(:mod:`csi.fetch.workertemp`) and names them in the store (:mod:`csi.fetch.naming`).

The parent hands a chunk over once no other of its threads writes those objects
(:meth:`csi.store.Store.claim_in_process`); the worker takes each object's lock across
processes (:class:`csi.repo.tmpfiles.KeyLocks`, the store's per-digest locks), leaves out
those another process holds (:data:`~csi.fetch.naming.CLAIMED`: the parent waits for them)
and those already present, and holds the rest until they are named. Each object is
downloaded exactly as an in-process download does (the same mirrors, retries, limits and
checks: :meth:`csi.fetch.download.Downloader.download`); from an HTTP(S) repository the first
attempts of a chunk run together, and with pack ranges (:mod:`csi.fetch.packs`) the objects
come out of them. Then, still in the worker, the files are made durable and named in the
store's ``objects/``; the parent only records their rows. Counters the worker moved are
handed back with the results and added to the parent's metrics (:data:`CARRIED`).

A worker that runs out of space reports it; the parent fetches that object again in-process,
where a full store triggers garbage collection. The pool that runs these workers, in the
parent, is :mod:`csi.fetch.bulk`.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import threading
from pathlib import Path

from prometheus_client import Counter

from csi.image.fsverity import register_idle_thread
from csi.repo.repository import object_file_exists
from csi.repo.tmpfiles import KeyLocks, pid_alive
from csi.store import DigestMismatch, StoreFull

from . import errors
from . import metrics as m
from .config import RepositoryConfig
from .download import Downloader, object_relpath
from .errors import SourceCorrupt, SourceError
from .http import HttpSource, Request
from .mirrors import Mirrors
from .naming import CLAIMED, Failed, Named, Written, name_written
from .naming import verity_known as naming_verity
from .packs import RangeEntry, RangeJob, RangeSplitter, decode
from .source import Response, Source
from .workertemp import TempObject, TempSink, fds, limits_setup, own_dir

log = logging.getLogger(__name__)

#: The counters whose worker-side increments are carried back to the parent.
CARRIED: dict[str, Counter] = {
    "bytes": m.BYTES,
    "objects": m.OBJECTS,
    "retries": m.RETRIES,
    "digest_mismatches": m.DIGEST_MISMATCHES,
    "pack_ranges": m.PACK_RANGES,
}

CounterDelta = list[tuple[str, dict[str, str], float]]


ChunkResult = tuple[list[Named | Failed], CounterDelta]


_client: Downloader | None = None  # the worker's downloader (one per process; set by init)
_parallel = 1  # requests a worker runs at once (set by init)
#: Small objects: a worker keeps up to this many bytes of them asked for at once (and at most
#: SMALL_PARALLEL_MAX times ``_parallel`` requests), so that round trips do not set the pace.
SMALL_BYTES_IN_FLIGHT = 1 << 20
SMALL_PARALLEL_MAX = 4


def init(
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
    limits_setup()
    _exit_with(parent)


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
    for key, metric in CARRIED.items():
        for family in metric.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[(key, tuple(sorted(s.labels.items())))] = s.value
    return out


def fetch_chunk(
    tmpdir: str,
    tag: str,
    items: list[tuple[bytes, int | None]],
    ranges: list[RangeJob] | None,
    repo_root: str,
    fsync: bool,
    verity: bool,
    locks: str,
) -> ChunkResult:
    """Worker: fetch ``items`` (digest, size) into temp files in this worker's directory of
    ``tmpdir`` (:func:`own_dir`), then make
    them durable (``fsync``: the store syncs its writes) and name them under ``repo_root``,
    the store's repository, with fs-verity if ``verity`` (:func:`csi.fetch.naming.name_written`).

    First each item's lock across processes is taken (``locks``: the store's
    :attr:`~csi.store.Store.key_locks_path`); one another process holds comes back as
    :data:`~csi.fetch.naming.CLAIMED`, one present already as ``Named`` with ``new`` False.
    The locks are held until the objects are named. Results are in the order of ``items``.

    From an HTTP(S) repository the first attempt at each object is one of up to ``_parallel``
    requests run together (:meth:`HttpSource.get_many`): one sleep and wake-up for several
    objects rather than one per object. An object whose first attempt fails goes on, after
    the others, through :meth:`Downloader.download` with that failure counted as its
    first attempt: the same mirrors, retries, limits, checks and metrics as in-process.

    With ``ranges`` the items come out of pack files instead (:func:`_from_ranges`); an item
    that does not goes on the same way.
    """
    downloader = _client
    assert downloader is not None, "bulk worker used before init"
    before = _counters()
    key_locks = _key_locks(locks)
    lock_fds, locked = key_locks.try_hold_many([d for d, _ in items])
    try:
        mine = set(locked)
        present = {d for d in mine if _present(repo_root, d)}
        todo = [(d, size) for d, size in items if d in mine and d not in present]
        named = iter(_fetch_todo(downloader, tmpdir, tag, todo, ranges, repo_root, fsync, verity))
    finally:
        key_locks.release_many(lock_fds)  # named now: another process finds them present
    out: list[Named | Failed] = []
    for d, size in items:
        if d not in mine:
            out.append(Failed(d, CLAIMED, "another process is writing it", f"object {d.hex()}", 0))
        elif d in present:
            out.append(Named(d, size or 0, 0, False, False))
        else:
            out.append(next(named))
    after = _counters()
    delta: CounterDelta = [
        (key, dict(labels), v - before.get((key, labels), 0.0))
        for (key, labels), v in after.items()
        if v != before.get((key, labels), 0.0)
    ]
    return out, delta


def _fetch_todo(
    downloader: Downloader,
    tmpdir: str,
    tag: str,
    items: list[tuple[bytes, int | None]],
    ranges: list[RangeJob] | None,
    repo_root: str,
    fsync: bool,
    verity: bool,
) -> list[Named | Failed]:
    """The objects of ``items`` (locked by this worker, not present) downloaded, verified
    and named, in the order of ``items``."""
    if not items:
        return []
    results: dict[bytes, Written | Failed] = {}
    src = downloader.mirrors.sources[0]
    # fs-verity refuses a file open for writing: keep descriptors only where it is off.
    fds.left = fds.per_chunk if not verity or naming_verity() is False else 0
    own = own_dir(tmpdir, tag)
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
    return name_written([results[d] for d, _ in items], tmpdir, repo_root, fsync, verity)


#: The store's per-digest locks, by lock file (one store per fetch, usually).
_locks: dict[str, KeyLocks] = {}


def _key_locks(path: str) -> KeyLocks:
    kl = _locks.get(path)
    if kl is None:
        kl = _locks[path] = KeyLocks(Path(path))
    return kl


def _present(repo_root: str, digest: bytes) -> bool:
    """Whether the store has the object (as :meth:`csi.repo.Repository.has_object`)."""
    return object_file_exists(f"{repo_root}/{object_relpath(digest)}")


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
    started: dict[bytes, TempObject] = {}

    def begin(item: tuple[bytes, int | None]) -> Request:
        digest, size = item
        obj = started[digest] = TempObject(tmpdir, tag, digest)
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
            obj = TempObject(tmpdir, tag, e.digest)
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
    sink = TempSink(tmpdir, tag)
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

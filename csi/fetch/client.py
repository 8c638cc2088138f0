"""Repository client: resolve references and fill a store with an image and its objects.

One :class:`RepositoryClient` per configured repository, kept for the life of the process: it owns
a pool of ``concurrency`` worker threads (each with its own connection per mirror) shared by all
fetches from that repository, and a table of downloads in flight so that concurrent fetches
needing the same object download it once (the store's single-flight covers other processes).

Every attempt of every download goes through :meth:`RepositoryClient._attempts`: mirrors in
order, permanent failures (404, 401/403, bad answers) drop that mirror for that object, transient
ones (connection errors, timeouts, 5xx, 429, 408, digest mismatches) are retried with exponential
backoff and jitter, honouring Retry-After.
"""

from __future__ import annotations

import logging
import mmap
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from csi.image.errors import FormatError
from csi.image.fsverity import digest_bytes
from csi.store import (
    DigestMismatch,
    ImageRejected,
    ObjectWriter,
    Store,
    StoreFull,
    is_no_space,
)

from . import bulk
from . import metrics as m
from .body import BodyBuffer
from .config import RepositoryConfig
from .errors import (
    Corrupt,
    FetchError,
    NoSpace,
    SourceCorrupt,
    SourceDenied,
    SourceError,
    SourceInvalid,
    SourceNotFound,
    SourceTimeout,
    SourceTransient,
)
from .images import object_sizes
from .progress import FetchProgress
from .quoting import quote, redact
from .refs import parse_digest, parse_ref_target, validate_ref_name
from .sources import Source, make_source

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Fetches needing at least this many new objects download them in worker processes
#: (:mod:`csi.fetch.bulk`) when the repository has any.
BULK_MIN_OBJECTS = 64
#: Objects (and at most bytes) handed to a worker process at a time: at most this many, and
#: few enough that every worker gets two chunks of a smaller fetch (at least _BULK_CHUNK_MIN).
_BULK_CHUNK = 64
_BULK_CHUNK_MIN = 8
_BULK_CHUNK_BYTES = 32 << 20


class ObjectSink(Protocol):
    """Where :meth:`RepositoryClient._download` puts an object: the store, or a worker
    process's temp files (:mod:`csi.fetch.bulk`)."""

    def ensure(
        self,
        digest: bytes,
        fill: Callable[[ObjectWriter], None],
        *,
        kind: Any = ...,
        size_hint: int | None = ...,
    ) -> bool: ...


_RANK: dict[type[SourceError], int] = {
    SourceCorrupt: 6,
    SourceInvalid: 5,
    SourceDenied: 4,
    SourceTimeout: 2,
    SourceTransient: 2,
    SourceNotFound: 1,
}


@dataclass(frozen=True, slots=True)
class FetchResult:
    """What one :meth:`RepositoryClient.fetch_image` did."""

    repository: str
    ref: str
    image: bytes
    #: The image itself was downloaded by this fetch (False: it was already in the store).
    image_fetched: bool
    objects_total: int
    #: Objects this fetch downloaded.
    objects_fetched: int
    #: Objects already present, or downloaded meanwhile by a concurrent fetch (dedup hits).
    objects_present: int
    #: Bytes received by this fetch (image and objects, failed attempts included).
    bytes_downloaded: int
    duration: float

    @property
    def image_hex(self) -> str:
        return self.image.hex()


class Cancelled(FetchError):
    """A shared download was abandoned because every fetch that wanted it had failed."""

    code = "ABORTED"


class _Task:
    """One object download shared by the fetches that want it."""

    __slots__ = ("future", "interest", "progress", "size")

    def __init__(self, size: int | None, progress: FetchProgress) -> None:
        self.future: Future[tuple[bool, int]] = Future()
        self.interest = 1
        self.size = size
        self.progress = progress


def _reason(e: SourceError) -> str:
    if isinstance(e, SourceCorrupt):
        return "corrupt"
    if isinstance(e, SourceTimeout):
        return "timeout"
    msg = str(e)
    if msg.startswith("HTTP 429"):
        return "http_429"
    if msg.startswith("HTTP 408"):
        return "http_408"
    if msg.startswith("HTTP 5"):
        return "http_5xx"
    return "connection"


class RepositoryClient:
    """Talks to one configured repository (all its mirrors)."""

    def __init__(
        self,
        config: RepositoryConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.name = config.name
        self.sources: list[Source] = [make_source(u, config) for u in config.urls]
        self._sleep = sleep
        self._rng = rng
        self._pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix=f"fetch-{self.name}")
        processes = (
            config.processes
            if config.processes is not None
            else bulk.default_processes(config.concurrency)
        )
        self._bulk = bulk.BulkPool(config, processes) if processes > 0 else None
        # Chunk jobs have threads of their own, two per worker process (one waiting on its
        # worker, one storing what came back). On the fetch pool they would hold all of its
        # ``concurrency`` threads for the length of a big fetch, and on-demand (lazy) reads
        # would queue behind them.
        self._bulk_jobs = (
            ThreadPoolExecutor(2 * processes, thread_name_prefix=f"bulk-{self.name}")
            if processes > 0
            else None
        )
        self.bulk_min_objects = BULK_MIN_OBJECTS
        m.init_repository(self.name)
        # The two counters every stored object moves (labels() looks up and locks each time).
        self._bytes_ok = m.BYTES.labels(self.name, "ok")
        self._objects_ok = m.OBJECTS.labels(self.name, "ok")
        self._mu = threading.Lock()
        self._inflight: dict[tuple[int, bytes], _Task] = {}
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._bulk_jobs is not None:
            self._bulk_jobs.shutdown(wait=True, cancel_futures=True)
        if self._bulk is not None:
            self._bulk.close()
        for s in self.sources:
            s.close()

    def __enter__(self) -> RepositoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RepositoryClient({self.config!r})"

    # -- retry loop ------------------------------------------------------------------------

    def _backoff(self, attempt: int, hint: float | None) -> float:
        p = self.config.retries
        if hint is not None:
            return min(hint, p.max_retry_after)
        delay = min(p.max_backoff, p.base_backoff * (2**attempt))
        return float(delay - delay * p.jitter * self._rng())

    def _attempts(
        self, subject: str, attempt: Callable[[Source], T], prior: SourceError | None = None
    ) -> T:
        """Run ``attempt`` against mirrors with retries until one succeeds (see module doc).

        ``prior``: how a first attempt against the first mirror, already made elsewhere (a
        bulk worker's batch of requests), failed; it counts as that attempt.
        """
        if prior is not None:
            run = attempt
            first: list[SourceError] = [prior]

            def attempt(src: Source) -> T:
                if first:
                    raise first.pop()
                return run(src)

        policy = self.config.retries
        dropped: set[int] = set()
        last: dict[int, SourceError] = {}
        prev_reason: str | None = None
        for round_no in range(policy.max_attempts):
            hint: float | None = None
            for i, src in enumerate(self.sources):
                if i in dropped:
                    continue
                if prev_reason is not None:
                    m.RETRIES.labels(self.name, prev_reason).inc()
                try:
                    return attempt(src)
                except SourceError as e:
                    last[i] = e
                    if not e.transient:
                        dropped.add(i)
                        prev_reason = None
                        log.warning(
                            "repository %r: %s: %s: %s",
                            self.name,
                            subject,
                            src.label,
                            self._safe(e),
                        )
                        continue
                    prev_reason = _reason(e)
                    if e.retry_after is not None:
                        hint = max(hint or 0.0, e.retry_after)
                    log.warning(
                        "repository %r: %s: %s: %s (attempt %d of %d)",
                        self.name,
                        subject,
                        src.label,
                        self._safe(e),
                        round_no + 1,
                        policy.max_attempts,
                    )
            if len(dropped) == len(self.sources) or round_no + 1 == policy.max_attempts:
                break
            self._sleep(self._backoff(round_no, hint))
        raise self._public_error(subject, last)

    def _public_error(self, subject: str, last: dict[int, SourceError]) -> FetchError:
        worst = max(last.values(), key=lambda e: _RANK.get(type(e), 3))
        if len(self.sources) == 1:
            detail = f"{self.sources[0].label}: {self._safe(worst)}"
        else:
            detail = "; ".join(
                f"{self.sources[i].label}: {self._safe(e)}" for i, e in sorted(last.items())
            )
        return worst.public(detail, repository=self.name, subject=subject)

    def _safe(self, e: BaseException) -> str:
        """The text of ``e`` without this repository's credentials (a hostile server may
        echo them back in anything it sends)."""
        return redact(str(e), self.config.secrets())

    # -- downloading into the store ----------------------------------------------------------

    def _download(
        self,
        store: ObjectSink,
        digest: bytes,
        *,
        kind: Any,
        subject: str,
        relpath: str,
        size: int | None,
        progress: FetchProgress | None,
        follow_image_link: bool = False,
        prior: SourceError | None = None,
    ) -> tuple[bool, int]:
        """Fetch one object or image into ``store``. Returns (stored by us, bytes received
        by these attempts). ``prior``: see :meth:`_attempts` (its bytes are counted by whoever
        made it)."""
        received = 0
        max_size = (
            size if size is not None else (self.config.max_image_size if kind == "image" else None)
        )

        def attempt(src: Source) -> bool:
            nonlocal received
            got = 0

            def fill(w: ObjectWriter) -> None:
                nonlocal got
                got = 0

                def on_data(chunk: bytes) -> None:
                    nonlocal got
                    w.write(chunk)
                    got += len(chunk)
                    if progress is not None:
                        progress.downloaded(len(chunk))

                resp = src.get(
                    relpath, on_data, accept_symlink=follow_image_link, max_size=max_size
                )
                if resp.symlink_target is not None:
                    h = digest.hex()
                    if resp.symlink_target.strip() != f"../objects/{h[:2]}/{h[2:]}":
                        raise SourceInvalid(
                            f"images/{h} is a link to {quote(resp.symlink_target)}, "
                            "not to its object"
                        )
                    src.get(f"objects/{h[:2]}/{h[2:]}", on_data, max_size=max_size)

            try:
                stored = store.ensure(digest, fill, kind=kind, size_hint=size)
            except DigestMismatch as e:
                received += got
                raise self._attempt_failed(e, got) from None
            except SourceError as e:
                received += got
                raise self._attempt_failed(e, got) from None
            except ImageRejected as e:
                received += got
                m.BYTES.labels(self.name, "corrupt").inc(got)
                raise Corrupt(str(e), repository=self.name, subject=subject) from None
            except StoreFull as e:
                raise NoSpace(str(e), repository=self.name, subject=subject) from None
            received += got
            self._attempt_ok(got, stored=False)
            return stored

        try:
            stored = self._attempts(subject, attempt, prior)
        except FetchError as e:
            m.OBJECTS.labels(self.name, _result_label(e)).inc()
            raise
        if stored:
            self._objects_ok.inc()
        return stored, received

    def _attempt_ok(self, got: int, *, stored: bool) -> None:
        """Count an attempt that received ``got`` bytes of a verified object (and, with
        ``stored``, the object as fetched: otherwise the caller counts it)."""
        self._bytes_ok.inc(got)
        if stored:
            self._objects_ok.inc()

    def _attempt_failed(self, error: DigestMismatch | SourceError, got: int) -> SourceError:
        """Count a failed attempt (its ``got`` bytes, a digest mismatch); the error that the
        retry loop then handles."""
        if isinstance(error, DigestMismatch):
            m.BYTES.labels(self.name, "corrupt").inc(got)
            m.DIGEST_MISMATCHES.labels(self.name).inc()
            return SourceCorrupt(
                f"digest mismatch: received {got} bytes hashing to {error.actual.hex()}"
            )
        m.BYTES.labels(self.name, "error").inc(got)
        return error

    def _object_task(self, store: Store, digest: bytes, task: _Task) -> tuple[bool, int]:
        h = digest.hex()
        with self._mu:
            if task.interest == 0:
                del self._inflight[(id(store), digest)]
                raise Cancelled(
                    "every fetch that wanted it failed", repository=self.name, subject=f"object {h}"
                )
        try:
            return self._download(
                store,
                digest,
                kind="object",
                subject=f"object {h}",
                relpath=f"objects/{h[:2]}/{h[2:]}",
                size=task.size,
                progress=task.progress,
            )
        finally:
            with self._mu:
                self._inflight.pop((id(store), digest), None)

    def _register(
        self, store: Store, digest: bytes, size: int | None, progress: FetchProgress
    ) -> tuple[_Task, bool]:
        """The shared task downloading ``digest`` (created if needed). (task, created)."""
        key = (id(store), digest)
        with self._mu:
            task = self._inflight.get(key)
            if task is not None:
                task.interest += 1
                return task, False
            task = self._inflight[key] = _Task(size, progress)
        return task, True

    def _warm_bulk(self, objects: int) -> None:
        """Have the worker processes start now if ``objects`` new objects would go to them."""
        if self._bulk is not None and objects >= self.bulk_min_objects:
            self._bulk.warm()

    def _start(self, store: Store, digest: bytes, task: _Task) -> None:
        fut = self._pool.submit(self._object_task, store, digest, task)
        fut.add_done_callback(lambda f: _chain(f, task.future))

    def _start_bulk(self, store: Store, new: list[tuple[bytes, _Task]]) -> None:
        """Hand ``new`` tasks to the worker processes, a chunk per job of the thread pool."""
        assert self._bulk is not None
        per_chunk = max(
            _BULK_CHUNK_MIN, min(_BULK_CHUNK, -(-len(new) // (2 * self._bulk.processes)))
        )
        chunk: list[tuple[bytes, _Task]] = []
        size = 0
        for d, task in new:
            chunk.append((d, task))
            size += task.size or 0
            if len(chunk) >= per_chunk or size >= _BULK_CHUNK_BYTES:
                self._submit_bulk(store, chunk)
                chunk, size = [], 0
        if chunk:
            self._submit_bulk(store, chunk)

    def _submit_bulk(self, store: Store, chunk: list[tuple[bytes, _Task]]) -> None:
        def done(f: Future[None]) -> None:
            # A job cancelled (the client closed) or failed unexpectedly: no task may hang.
            if f.cancelled():
                error: BaseException | None = Cancelled("the client was closed")
            else:
                error = f.exception()
            if error is not None:
                for d, task in chunk:
                    self._settle(store, d, task, error=error)

        assert self._bulk_jobs is not None
        self._bulk_jobs.submit(self._bulk_job, store, chunk).add_done_callback(done)

    def _bulk_job(self, store: Store, chunk: list[tuple[bytes, _Task]]) -> None:
        """Thread-pool job: one chunk through a worker process, then into the store.

        Only objects this job could claim in the store go to the worker; one being written
        by another thread or process is waited for in-process (``store.ensure``).
        """
        assert self._bulk is not None
        with self._mu:  # every fetch that wanted these failed meanwhile: skip them
            dropped = [(d, t) for d, t in chunk if t.interest == 0]
        for d, task in dropped:
            error = Cancelled(
                "every fetch that wanted it failed",
                repository=self.name,
                subject=f"object {d.hex()}",
            )
            self._settle(store, d, task, error=error)
        chunk = [(d, t) for d, t in chunk if not t.future.done()]
        tasks = dict(chunk)
        with store.claim(tasks) as mine:
            for d in tasks.keys() - mine:
                if store.has_object(d):
                    self._settle(store, d, tasks[d], result=(False, 0))
            if mine:
                self._bulk_claimed(store, [(d, tasks[d]) for d in tasks if d in mine])
        for d, task in chunk:  # claimed elsewhere: wait for it (or write it) here
            if not task.future.done():
                self._finish_in_process(store, d, task)

    def _bulk_claimed(self, store: Store, chunk: list[tuple[bytes, _Task]]) -> None:
        assert self._bulk is not None
        tasks = dict(chunk)
        try:
            results, _ = self._bulk.fetch(
                store.repo.tmp.path, store.repo.tmp.owner(), [(d, t.size) for d, t in chunk]
            )
        except Exception as e:  # the worker died, or could not start: the caller retries
            log.warning(
                "repository %r: worker process failed (%s); fetching %d objects in-process",
                self.name,
                e,
                len(chunk),
            )
            return
        written = [r for r in results if isinstance(r, bulk.Written)]
        try:
            outcomes: list[bool | BaseException] = list(
                store.adopt([(w.digest, w.path, w.size) for w in written])
            )
        except BaseException as e:
            outcomes = [e] * len(written)
        for w, outcome in zip(written, outcomes, strict=True):
            task = tasks[w.digest]
            task.progress.downloaded(w.received)
            if isinstance(outcome, BaseException) and is_no_space(outcome):
                # Left unsettled: fetched again in-process, where the store can make room.
                log.info(
                    "repository %r: store full adopting %s; fetching it in-process",
                    self.name,
                    w.digest.hex(),
                )
            elif isinstance(outcome, BaseException):
                self._settle(store, w.digest, task, error=outcome)
            else:
                self._settle(store, w.digest, task, result=(outcome, w.received))
        for r in results:
            if not isinstance(r, bulk.Failed):
                continue
            if r.error == "no_space":
                # Left unsettled: fetched again in-process, where the store can make room.
                log.info("repository %r: %s; fetching it in-process", self.name, r.message)
            else:  # final: the worker already tried every mirror
                self._settle(store, r.digest, tasks[r.digest], error=r.to_exception())

    def _finish_in_process(self, store: Store, digest: bytes, task: _Task) -> None:
        try:
            res = self._object_task(store, digest, task)
        except BaseException as e:
            self._settle(store, digest, task, error=e)
        else:
            self._settle(store, digest, task, result=res)

    def _settle(
        self,
        store: Store,
        digest: bytes,
        task: _Task,
        *,
        result: tuple[bool, int] | None = None,
        error: BaseException | None = None,
    ) -> None:
        with self._mu:
            if self._inflight.get((id(store), digest)) is task:
                del self._inflight[(id(store), digest)]
        if task.future.done():
            return
        if error is not None:
            task.future.set_exception(error)
        else:
            assert result is not None
            task.future.set_result(result)

    # -- public API --------------------------------------------------------------------------

    def resolve(self, ref: str) -> bytes:
        """The image digest ``ref`` designates (a digest reference needs no request)."""
        digest, body, _ = self._resolve(ref, None)
        if body is not None:
            body.close()
        return digest

    def _resolve(
        self, ref: str, progress: FetchProgress | None
    ) -> tuple[bytes, mmap.mmap | None, dict[bytes, int] | None]:
        """(image digest, image bytes, object sizes): the bytes (a mapping the caller closes)
        and the sizes (from one validating walk) when the ref was served as the image
        itself."""
        d = parse_digest(ref)
        if d is not None:
            return d, None, None
        try:
            validate_ref_name(ref)
        except FetchError as e:
            e.repository = self.name
            raise
        relpath = f"images/refs/{ref}"

        def attempt(src: Source) -> tuple[bytes, mmap.mmap | None, dict[bytes, int] | None]:
            buf = BodyBuffer()

            def on_data(chunk: bytes) -> None:
                buf.write(chunk)
                if progress is not None:
                    progress.downloaded(len(chunk))

            try:
                resp = src.get(
                    relpath, on_data, accept_symlink=True, max_size=self.config.max_image_size
                )
                if resp.symlink_target is not None:
                    try:
                        return parse_ref_target(ref, resp.symlink_target), None, None
                    except ValueError as e:
                        raise SourceInvalid(str(e)) from None
                n = buf.size
                body = buf.finish()
            finally:
                buf.close()
            try:
                from csi.image.reader import Image

                if body is None:
                    raise FormatError("empty")
                sizes = Image(body).object_sizes()  # validates the whole image
                with memoryview(body) as view:
                    digest = digest_bytes(view)
            except FormatError as e:
                if body is not None:
                    body.close()
                raise SourceInvalid(
                    f"answered {n} bytes that are neither a symlink target nor a "
                    f"composefs image ({quote(str(e))})"
                ) from None
            return digest, body, sizes

        return self._attempts(f"ref {ref!r}", attempt)

    def fetch_image(
        self,
        ref: str,
        store: Store,
        progress: FetchProgress | None = None,
        *,
        objects: bool = True,
    ) -> FetchResult:
        """Resolve ``ref``, fetch the image if missing, then its missing objects; record the ref.

        On return every object of the image is in the store (verified); with ``objects=False``
        only the image is (lazy volumes fetch objects on demand). Raises a
        :class:`~csi.fetch.errors.FetchError`; whatever was stored before a failure is
        verified and stays (a later fetch does not download it again).
        """
        prog = progress if progress is not None else FetchProgress()
        t0 = time.monotonic()
        result = "ok"
        try:
            res = self._fetch_image(ref, store, prog, objects)
        except FetchError as e:
            result = e.code.lower()
            prog.set_phase("failed")
            raise
        except BaseException:
            result = "internal"
            prog.set_phase("failed")
            raise
        finally:
            m.DURATION.labels(self.name, result).observe(time.monotonic() - t0)
        prog.set_phase("done")
        return res

    def _fetch_image(
        self, ref: str, store: Store, prog: FetchProgress, with_objects: bool
    ) -> FetchResult:
        t0 = time.monotonic()
        digest, body, body_sizes = self._resolve(ref, prog)
        try:
            return self._fetch_resolved(
                ref, store, prog, with_objects, t0, digest, body, body_sizes
            )
        finally:
            if body is not None:
                body.close()

    def _fetch_resolved(
        self,
        ref: str,
        store: Store,
        prog: FetchProgress,
        with_objects: bool,
        t0: float,
        digest: bytes,
        body: mmap.mmap | None,
        body_sizes: dict[bytes, int] | None,
    ) -> FetchResult:
        received = len(body) if body is not None else 0
        h = digest.hex()
        with store.pin([digest]):
            image_fetched = False
            if not store.has_image(digest):
                if with_objects and body_sizes is not None:
                    # A new image of many objects: the worker processes start while the
                    # image is stored and its objects are looked up.
                    self._warm_bulk(len(body_sizes))
                prog.set_phase("image")
                if body is not None:
                    try:
                        # validated by _resolve, which listed its objects on the way
                        known = set(body_sizes) if body_sizes is not None else None
                        with memoryview(body) as view:
                            store.add_image_bytes(view, objects=known)
                    except ImageRejected as e:
                        raise Corrupt(str(e), repository=self.name, subject=f"image {h}") from None
                    except StoreFull as e:
                        raise NoSpace(str(e), repository=self.name, subject=f"image {h}") from None
                    image_fetched = True
                else:
                    image_fetched, got = self._download(
                        store,
                        digest,
                        kind="image",
                        subject=f"image {h}",
                        relpath=f"images/{h}",
                        size=None,
                        progress=prog,
                        follow_image_link=True,
                    )
                    received += got
            objects = store.image_objects(digest)
            missing = {d for d in objects if not store.has_object(d)}
            present = len(objects) - len(missing)
            fetched = 0
            if with_objects:
                self._warm_bulk(len(missing))
                sizes: dict[bytes, int] = {}
                if missing:
                    # The object file: has_image() checked it (the images/ link may lag).
                    sizes = body_sizes or object_sizes(store.object_path(digest))
                total_size = sum(sizes.get(d, 0) for d in objects) if sizes else None
                prog.set_totals(len(objects), total_size)
                prog.set_phase("objects")
                for d in objects - missing:
                    prog.object_done(sizes.get(d, 0), fetched=False)
                fetched, shared, got = self._fetch_objects(store, missing, sizes, prog)
                received += got
                present += shared
                if present:
                    m.DEDUP_HITS.labels(self.name).inc(present)
            else:  # lazy: the objects come later, on demand
                prog.set_totals(len(objects), None)
            if parse_digest(ref) is None:
                store.set_ref(self.name, ref, digest)
        return FetchResult(
            repository=self.name,
            ref=ref,
            image=digest,
            image_fetched=image_fetched,
            objects_total=len(objects),
            objects_fetched=fetched,
            objects_present=present,
            bytes_downloaded=received,
            duration=time.monotonic() - t0,
        )

    def fetch_objects(
        self, store: Store, sizes: Mapping[bytes, int], progress: FetchProgress | None = None
    ) -> int:
        """Make the objects of ``sizes`` (digest: the size an image gives it) present in
        ``store`` (e.g. for lazy reads). Each download stops at its size: a server that sends
        more fails that attempt. Returns bytes received."""
        prog = progress if progress is not None else FetchProgress()
        wanted = {d for d in sizes if not store.has_object(d)}
        return self._fetch_objects(store, wanted, dict(sizes), prog)[2]

    def _fetch_objects(
        self, store: Store, missing: set[bytes], sizes: dict[bytes, int], prog: FetchProgress
    ) -> tuple[int, int, int]:
        """Download ``missing`` through shared tasks. (fetched by us, by others, bytes)."""
        if not missing:
            return 0, 0, 0
        if self._closed:
            raise FetchError("client is closed", repository=self.name)
        unsized = [d for d in missing if d not in sizes]
        if unsized:  # every download is bounded by the size an image records
            raise FetchError(
                f"{len(unsized)} object(s) to fetch have no known size "
                f"(first: {unsized[0].hex()}); the image that lists them could not be read",
                repository=self.name,
            )
        mine: dict[Future[tuple[bool, int]], tuple[bytes, _Task, bool]] = {}
        new: list[tuple[bytes, _Task]] = []
        for d in sorted(missing):
            task, created = self._register(store, d, sizes.get(d), prog)
            mine[task.future] = (d, task, created)
            if created:
                new.append((d, task))
        if self._bulk is not None and len(new) >= self.bulk_min_objects:
            self._start_bulk(store, new)
        else:
            for d, task in new:
                self._start(store, d, task)
        # Each task is counted (and reported to ``prog``) as it ends, by a callback in the
        # thread that ends it; this thread waits for the last one, or for the first error.
        mu = threading.Lock()
        finished = threading.Event()
        left = len(mine)
        fetched = shared = received = 0
        error: BaseException | None = None
        over = False  # set once this thread has taken the result: later callbacks do nothing

        def ended(f: Future[tuple[bool, int]]) -> None:
            nonlocal left, fetched, shared, received, error
            d, _task, created = mine[f]
            exc = f.exception()
            with mu:
                if over:
                    return
                if exc is not None:
                    error = error or exc
                    finished.set()
                    return
                stored, got = f.result()
                mine_now = created and stored
                if mine_now:
                    fetched += 1
                else:
                    shared += 1
                if created:
                    received += got
                left -= 1
                if not left:
                    finished.set()
            prog.object_done(sizes.get(d, 0), fetched=mine_now)

        for f in mine:
            f.add_done_callback(ended)
        finished.wait()
        with mu:
            over = True
            failed = error
        if failed is not None:
            with self._mu:
                for f, (_, task, _) in mine.items():
                    if not f.done():
                        task.interest -= 1
            # Downloads already running go on to their end (those nobody wants any more are
            # skipped when they would start). Wait for them: the caller's pin must cover
            # them, or the room they make on a full disk (GC) could be this very image.
            futures_wait(mine)
            raise failed
        return fetched, shared, received


def _chain(src: Future[tuple[bool, int]], dst: Future[tuple[bool, int]]) -> None:
    if src.cancelled():
        dst.set_exception(Cancelled("the client was closed"))
        return
    exc = src.exception()
    if exc is not None:
        dst.set_exception(exc)
    else:
        dst.set_result(src.result())


def _result_label(e: FetchError) -> str:
    return {
        "NOT_FOUND": "not_found",
        "DATA_LOSS": "corrupt",
    }.get(e.code, "error")


# -- plain functions ------------------------------------------------------------------------


def resolve(repo: RepositoryConfig | RepositoryClient, ref: str) -> bytes:
    """Image digest of ``ref`` in ``repo`` (a config gets a short-lived client)."""
    if isinstance(repo, RepositoryClient):
        return repo.resolve(ref)
    with RepositoryClient(repo) as client:
        return client.resolve(ref)


def fetch_image(
    repo: RepositoryConfig | RepositoryClient,
    ref: str,
    store: Store,
    progress: FetchProgress | None = None,
) -> FetchResult:
    """Fetch image ``ref`` and its missing objects from ``repo`` into ``store``."""
    if isinstance(repo, RepositoryClient):
        return repo.fetch_image(ref, store, progress)
    with RepositoryClient(repo) as client:
        return client.fetch_image(ref, store, progress)

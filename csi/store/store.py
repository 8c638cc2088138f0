"""The per-node store (BRIEF §2.3): a repository plus SQLite state and a temp area.

Concurrency model:

* ``ensure`` is single-flight: in-process, one thread per digest runs ``fill`` while the others
  wait on an event; across processes, a per-digest lock (an OFD byte-range lock on one file of
  the temp area, :class:`csi.repo.tmpfiles.KeyLocks`) does the same.
* Group commit: a writer whose temp file is complete and verified submits it to
  :class:`csi.repo.batch.GroupCommit`. One submitter at a time leads a flush for everything
  pending: one ``syncfs`` plus a per-file writeback-error check, then the renames and one
  SQLite transaction recording them all. A name appears only after its bytes are durable; a
  file whose flush failed is not named (its writer gets the error, its temp file is removed).
* The store directory itself is ``flock``'d: shared while files are published and recorded
  (and while leases and pins change), exclusive for GC, fsck repairs and start-up recovery.
  ``fill`` runs outside that lock: its temp file is invisible to GC.
* Lock order: per-digest lock, then the store lock, then the in-process DB mutex. A flush
  leader holds its own per-digest lock and takes the store lock; GC takes only the store
  lock, so it can run from inside ``ensure`` (to make room) without deadlock.
* Gauges are set from the one-row totals after each flush, not recounted per insert.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import os
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

from csi.image.fsverity import digest_bytes
from csi.repo import layout
from csi.repo.batch import GroupCommit, make_durable
from csi.repo.directio import DIRECT_MIN_SIZE
from csi.repo.repository import Progress, Repository
from csi.repo.tmpfiles import TempFile
from csi.repo.verity import UNSUPPORTED_ERRNOS, enable_verity

from . import check
from . import metrics as m
from .collect import collect
from .db import StateDB
from .errors import DigestMismatch, ImageRejected, StoreError, StoreFull
from .holds import Holds
from .refs import RefNotes, RefRecord
from .reports import FsckReport, GcReport, RecoveryReport, StoreUsage, human_bytes
from .writer import ObjectWriter, is_no_space

log = logging.getLogger(__name__)

Kind = Literal["object", "image"]
Fill = Callable[[ObjectWriter], None]
#: Turns image bytes into the set of object digests it references; raises on bad images.
ImageParser = Callable[[bytes], set[bytes]]

STATE_DB = "state.db"
QUARANTINE_DIR = "quarantine"
_READ_CHUNK = 1 << 20
#: Extra room asked of GC beyond the object's own size when the disk is full.
_ROOM_SLACK = 1 << 20
#: :meth:`Store.missing_among` lists ``objects/`` for at least this many objects.
LIST_MIN_OBJECTS = 1024


def default_image_parser(data: bytes) -> set[bytes]:
    """Validate with :class:`csi.image.reader.Image` and list the objects it references."""
    reader: Any = importlib.import_module("csi.image.reader")
    errors: Any = importlib.import_module("csi.image.errors")
    try:
        # object_digests() walks and checks the whole image (it validates as it lists).
        return {bytes(d) for d in reader.Image(data).object_digests()}
    except errors.FormatError as e:
        raise ImageRejected(f"not a valid composefs image: {e}") from e


class _Pending:
    """A verified temp file waiting for the group commit to make it durable and name it."""

    __slots__ = ("digest", "direct", "kind", "published", "refs", "size", "tmp", "verity")

    def __init__(
        self,
        digest: bytes,
        tmp: TempFile,
        kind: Kind,
        size: int,
        verity: bool,
        refs: set[bytes] | None,
        direct: bool = False,
    ) -> None:
        self.digest = digest
        self.direct = direct
        self.tmp = tmp
        self.kind = kind
        self.size = size
        self.verity = verity
        self.refs = refs
        self.published = False


class _Flight:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class Store:
    def __init__(
        self,
        root: Path,
        *,
        size_cap: int | None = None,
        high_watermark: float = 0.9,
        low_watermark: float = 0.8,
        image_parser: ImageParser | None = None,
        enable_fsverity: bool = True,
        fsync: bool = True,
    ) -> None:
        if not 0 < low_watermark <= high_watermark <= 1:
            raise ValueError("watermarks must satisfy 0 < low <= high <= 1")
        if size_cap is not None and size_cap <= 0:
            raise ValueError("size_cap must be positive")
        self.root = Path(root)
        self.repo = Repository(self.root, create=True)
        if self.repo.read_only:
            raise StoreError(f"{self.root}: a read-only repository cannot be used as a store")
        self.size_cap = size_cap
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self._parse = image_parser or default_image_parser
        #: fsync each file before publishing it (off only where durability across power
        #: loss does not matter: tests, tmpfs stores).
        self._fsync = fsync
        self._verity_supported: bool | None = None if enable_fsverity else False
        self._flights: dict[bytes, _Flight] = {}
        self._flights_mu = threading.Lock()
        self._gc_mu = threading.Lock()
        self._gc_floor = -1  # store bytes after the last capacity GC
        self._group: GroupCommit[_Pending] = GroupCommit(self._commit_group)
        (self.root / QUARANTINE_DIR).mkdir(mode=0o700, exist_ok=True)
        self.repo.tmp.ensure_dirs()
        self.db = StateDB(self.root / STATE_DB)
        self._holds = Holds(self.root, self.db, self.repo.tmp, self._lock, self._update_gauges)
        self._refs = RefNotes(self.db, self._lock)
        self._closed = False
        self.recovery = self._recover()
        self._used = 0  # store bytes as of the last flush or gauge update
        self._update_gauges()

    # -- plumbing --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.db.close()
            self.repo.tmp.key_locks.close()
            self.repo.tmp.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _update_gauges(self) -> None:
        u = self.usage()
        self._used = u.bytes
        m.STORE_BYTES.set(u.bytes)
        m.STORE_OBJECTS.set(u.files)
        m.STORE_IMAGES.set(u.images)
        m.LEASES.set(u.lease_holders)
        m.LEASED_IMAGES.set(u.leased_images)

    @property
    def syncs_writes(self) -> bool:
        """Whether objects are made durable before they are named (see ``fsync``)."""
        return self._fsync

    @property
    def tries_verity(self) -> bool:
        """Whether fs-verity is to be enabled on new objects (not turned off, and not found
        unsupported here)."""
        return self._verity_supported is not False

    # -- queries ---------------------------------------------------------------------------

    def has_object(self, digest: bytes) -> bool:
        return self.repo.has_object(digest)

    def object_path(self, digest: bytes) -> Path:
        return self.repo.object_path(digest)

    def image_path(self, digest: bytes) -> Path:
        return self.repo.image_path(digest)

    def has_image(self, digest: bytes) -> bool:
        return self.db.is_image(digest) and self.repo.has_object(digest)

    def holds_images(self) -> bool:
        """Whether any image is recorded (one row read)."""
        return bool(self.db.query("SELECT 1 FROM images LIMIT 1"))

    def image_objects(self, image: bytes) -> set[bytes]:
        layout.check_digest(image)
        if not self.db.is_image(image):
            raise StoreError(f"image {image.hex()} is not in the store at {self.root}")
        return self.db.image_objects(image)

    def missing_objects(self, image: bytes) -> set[bytes]:
        return self.missing_among(self.image_objects(image))

    def missing_among(self, digests: Collection[bytes]) -> set[bytes]:
        """Which of ``digests`` the store has no object file for. Many, in a store not much
        larger: from listings of ``objects/`` (a cold fetch of 100k objects looked each up
        for 0.3 s before its first request); else one lookup each."""
        if len(digests) >= LIST_MIN_OBJECTS and self.db.totals()[1] <= 4 * len(digests):
            return self.repo.missing_by_listing(digests)
        return {d for d in digests if not self.repo.has_object(d)}

    def usage(self) -> StoreUsage:
        total, files = self.db.totals()
        q = self.db.query
        return StoreUsage(
            bytes=total,
            files=files,
            images=q("SELECT count(*) FROM images")[0][0],
            lease_holders=q("SELECT count(DISTINCT holder) FROM leases")[0][0],
            leased_images=q("SELECT count(DISTINCT image) FROM leases")[0][0],
            pinned_images=q("SELECT count(DISTINCT image) FROM pins")[0][0],
            verity_files=q("SELECT count(*) FROM objects WHERE verity")[0][0],
            size_cap=self.size_cap,
        )

    # -- insertion -------------------------------------------------------------------------

    def ensure(
        self,
        digest: bytes,
        fill: Fill,
        *,
        kind: Kind = "object",
        size_hint: int | None = None,
    ) -> bool:
        """Make ``digest`` present, running ``fill`` at most once at a time for it.

        Returns True if this call stored it, False if it was already there (or another
        caller stored it meanwhile). ``fill`` exceptions propagate to this caller, nothing
        is stored, and a waiting caller retries with its own ``fill``.
        """
        layout.check_digest(digest)
        if kind not in ("object", "image"):
            raise ValueError(f"kind must be 'object' or 'image', not {kind!r}")
        return self._ensure(digest, fill, kind, size_hint, None)

    def _present(self, digest: bytes, kind: Kind) -> bool:
        if not self.repo.has_object(digest):
            return False
        if kind == "image" and not self.db.is_image(digest):
            self._adopt_image(digest)
        m.DEDUP_HITS.inc()
        return True

    def _ensure(
        self,
        digest: bytes,
        fill: Fill,
        kind: Kind,
        size_hint: int | None,
        refs: set[bytes] | None,
    ) -> bool:
        if self._present(digest, kind):
            return False
        while True:
            with self._flights_mu:
                flight = self._flights.get(digest)
                leader = flight is None
                if flight is None:
                    flight = self._flights[digest] = _Flight()
            if not leader:
                flight.done.wait()
                if self._present(digest, kind):
                    return False
                continue  # the leader failed: compete to run our own fill
            try:
                with self.repo.tmp.key_locks.hold(digest):
                    if self._present(digest, kind):
                        return False
                    stored = self._write(digest, fill, kind, size_hint, refs)
            finally:
                with self._flights_mu:
                    del self._flights[digest]
                flight.done.set()
            if stored:
                self._after_insert()
            return stored

    def _write(
        self,
        digest: bytes,
        fill: Fill,
        kind: Kind,
        size_hint: int | None,
        refs: set[bytes] | None,
    ) -> bool:
        gc_done: GcReport | None = None
        while True:
            writer: ObjectWriter | None = None
            tmp: TempFile | None = None
            try:
                tmp = self.repo.tmp.create(kind[:3])
                writer = ObjectWriter(tmp, digest, direct=(size_hint or 0) >= DIRECT_MIN_SIZE)
                fill(writer)
                writer.finish()
                writer.close()
                actual = writer.digest()
                if actual != digest:
                    m.DIGEST_MISMATCHES.inc()
                    raise DigestMismatch(digest, actual, f"{kind} {digest.hex()}")
                size = writer.size
                if kind == "image" and refs is None:
                    refs = self._parse_tmp(tmp, size)
                os.fchmod(tmp.fd, 0o644)
                tmp.close_write()
                # before the flush, so the flush makes the Merkle tree durable too
                verity = self._try_verity(tmp.lock_fd)
                pending = _Pending(digest, tmp, kind, size, verity, refs, writer.direct)
                self._group.submit(pending)
                published = pending.published
                if published:
                    m.OBJECTS_ADDED.inc()
                    m.BYTES_ADDED.inc(size)
                    if verity:
                        m.VERITY_ENABLED.inc()
                return published
            except BaseException as e:
                if tmp is not None:
                    tmp.discard()
                if writer is not None:
                    writer.close()
                no_space = (writer is not None and writer.no_space) or is_no_space(e)
                if not no_space:
                    raise
                written = writer.size if writer is not None else 0
                need = max(size_hint or 0, written) + _ROOM_SLACK
                if gc_done is None:
                    try:
                        gc_done = self.gc(target_bytes=need)
                    except Exception as gc_err:  # GC itself may fail on a full disk
                        gc_done = GcReport(False, need, self.db.totals()[0])
                        gc_done.errors.append(str(gc_err))
                    if gc_done.freed_bytes > 0 and not gc_done.errors:
                        continue  # retry once with the room GC made
                m.STORE_FULL.inc()
                raise StoreFull(
                    f"no space left in the store at {self.root} for {kind} {digest.hex()} "
                    f"(needs about {human_bytes(need)}); garbage collection freed "
                    f"{human_bytes(gc_done.freed_bytes)}, {gc_done.protected_images} images "
                    "are leased or in use"
                    + (f"; GC errors: {'; '.join(gc_done.errors)}" if gc_done.errors else "")
                ) from e

    @property
    def key_locks_path(self) -> Path:
        """The file of the store's per-digest locks across processes
        (:class:`csi.repo.tmpfiles.KeyLocks`), for a writer in another process of ours."""
        return self.repo.tmp.key_locks.path

    @contextlib.contextmanager
    def claim_in_process(self, digests: Iterable[bytes]) -> Iterator[set[bytes]]:
        """Claim, among this process's threads, the writing of ``digests`` for someone who
        will write, name and then :meth:`record_named` them: our fetch worker processes
        (:mod:`csi.fetch.worker`), which take each object's lock across processes
        (:attr:`key_locks_path`) and look whether it is present before they write it, and
        hold the lock until it is named.

        Yields the claimed subset: those no other thread of this process is writing (single
        flight); the rest are left to :meth:`ensure`, which waits for whoever writes them. On
        exit the claims end: threads waiting for one of them look again (and write it
        themselves if it is still missing).

        (The locks across processes were taken here, in the parent, until 2026-12-07: a
        lock and a ``stat`` per object, each a system call through the parent's GIL, were a
        serial cost of a big fetch; docs/benchmarks.md.)
        """
        wanted = list(digests)
        for d in wanted:
            layout.check_digest(d)
        # One flight for all of them: the claims end together (and one object with its
        # locks and lists per digest was, over a 100k-object fetch, work for the cyclic GC).
        flight = _Flight()
        mine: list[bytes] = []
        with self._flights_mu:
            flights = self._flights
            for d in wanted:
                if d not in flights:
                    flights[d] = flight
                    mine.append(d)
        try:
            yield set(mine)
        finally:
            with self._flights_mu:
                for d in mine:
                    del self._flights[d]
            flight.done.set()

    def record_named(self, rows: Sequence[tuple[bytes, int, bool]]) -> None:
        """Record objects our worker processes named in ``objects/`` themselves, made durable
        first, under the caller's :meth:`claim_in_process`: (digest, size, fs-verity
        enabled). If the rows cannot be written, the error is raised and the files stay,
        as when a process is killed between naming and recording: whole and durable, they
        are recorded by the next recovery. (Their locks across processes ended once they
        were named: another process may have found them present since, so removing them
        could take an object from under its image.)"""
        if not rows:
            return
        for d, _, _ in rows:
            layout.check_digest(d)
        with self._lock(exclusive=False), self.db.tx() as cur:
            self.db.record_objects(cur, [(d, size, "object", v) for d, size, v in rows])
        m.OBJECTS_ADDED.inc(len(rows))
        m.BYTES_ADDED.inc(sum(size for _, size, _ in rows))
        with_verity = sum(1 for _, _, v in rows if v)
        if with_verity:
            m.VERITY_ENABLED.inc(with_verity)
        total, files = self.db.totals()
        self._used = total
        m.STORE_BYTES.set(total)
        m.STORE_OBJECTS.set(files)
        self._after_insert()

    def _commit_group(self, items: list[_Pending]) -> list[BaseException | None]:
        """Flush leader: make ``items`` durable, name them, record them in one transaction."""
        out: list[BaseException | None] = [None] * len(items)
        if self._fsync:
            durable = make_durable(
                self.root, [p.tmp for p in items], direct=[p.direct for p in items]
            )
            for i, err in enumerate(durable):
                out[i] = err
        ok = [i for i in range(len(items)) if out[i] is None]
        if not ok:
            return out
        try:
            with self._lock(exclusive=False):
                named: list[int] = []
                for i in ok:
                    p = items[i]
                    try:
                        p.published = p.tmp.publish(self.repo.object_file(p.digest))
                    except Exception as e:
                        out[i] = e
                    else:
                        named.append(i)
                try:
                    with self.db.tx() as cur:
                        self.db.record_objects(
                            cur,
                            [
                                (items[i].digest, items[i].size, items[i].kind, items[i].verity)
                                for i in named
                            ],
                        )
                        for i in named:
                            p = items[i]
                            if p.kind == "image":
                                assert p.refs is not None
                                self.db.record_image(cur, p.digest, p.refs)
                except BaseException:
                    for i in named:  # keep state and disk in step
                        if items[i].published:
                            items[i].published = False
                            with contextlib.suppress(OSError):
                                os.unlink(self.repo.object_path(items[i].digest))
                    raise
                for i in named:
                    if items[i].kind == "image":
                        try:
                            self.repo.link_image(items[i].digest)
                        except Exception as e:
                            out[i] = e
        except Exception as e:
            for i in ok:
                if out[i] is None:
                    out[i] = e
            return out
        total, files = self.db.totals()
        self._used = total
        m.STORE_BYTES.set(total)
        m.STORE_OBJECTS.set(files)
        if any(items[i].kind == "image" for i in named):
            m.STORE_IMAGES.set(self.db.query("SELECT count(*) FROM images")[0][0])
        return out

    def _parse_tmp(self, tmp: TempFile, size: int) -> set[bytes]:
        data = os.pread(tmp.lock_fd, size, 0)  # (``fd`` may be direct-I/O only)
        if len(data) != size:
            raise StoreError(f"short read of temp file {tmp.path}")
        return self._parse(data)

    def _try_verity(self, fd: int) -> bool:
        if self._verity_supported is False:
            return False
        err = enable_verity(fd)
        if err == 0:
            self._verity_supported = True
            return True
        if err in UNSUPPORTED_ERRNOS and self._verity_supported is None:
            self._verity_supported = False
        return False

    def _after_insert(self) -> None:
        cap = self.size_cap
        if cap is None:
            return
        used = self._used
        hysteresis = (self.high_watermark - self.low_watermark) * cap / 2
        if used > self.high_watermark * cap and used > self._gc_floor + hysteresis:
            report = self.gc()
            self._gc_floor = report.bytes_after

    def _adopt_image(self, digest: bytes) -> None:
        """An object already present is now wanted as an image: parse and record it."""
        refs = self._parse(self.repo.object_path(digest).read_bytes())
        with self._lock(exclusive=False):
            size = self.repo.object_path(digest).stat().st_size
            with self.db.tx() as cur:
                self.db.record_object(cur, digest, size, "image", False)
                self.db.record_image(cur, digest, refs)
            self.repo.link_image(digest)

    def add_image_bytes(
        self, data: bytes | memoryview, *, objects: set[bytes] | None = None
    ) -> bytes:
        """Validate, store and record an image (and the objects it references).

        ``objects``: the image's object digests, from a caller in this process that has just
        validated ``data`` with :mod:`csi.image.reader` (the fetcher must, to tell an image
        from a symlink answer); the image is then not walked a second time.
        """
        digest = digest_bytes(data)
        refs = set(objects) if objects is not None else self._parse(bytes(data))

        def fill(w: ObjectWriter) -> None:
            w.write(data)

        self._ensure(digest, fill, "image", len(data), refs)
        return digest

    def add_object_bytes(self, data: bytes) -> tuple[bytes, bool]:
        digest = digest_bytes(data)

        def fill(w: ObjectWriter) -> None:
            w.write(data)

        return digest, self.ensure(digest, fill, size_hint=len(data))

    # -- refs, leases, pins (csi.store.refs, csi.store.holds) ------------------------------

    def set_ref(
        self,
        repository: str,
        name: str,
        digest: bytes,
        *,
        etag: str | None = None,
        last_modified: str | None = None,
        source: str | None = None,
    ) -> None:
        """Record what ``name`` resolved to in ``repository`` (a local note, not a GC root),
        confirmed now, with the HTTP validators of the answer and the mirror that gave them."""
        self._refs.set(
            repository, name, digest, etag=etag, last_modified=last_modified, source=source
        )

    def confirm_ref(self, repository: str, name: str, digest: bytes) -> bool:
        """Note that the repository confirmed, now, that ``name`` still designates ``digest``
        (an HTTP 304). False if the store no longer records that."""
        return self._refs.confirm(repository, name, digest)

    def get_ref(self, repository: str, name: str) -> bytes | None:
        return self._refs.get(repository, name)

    def ref_record(self, repository: str, name: str) -> RefRecord | None:
        """What the store knows of ``name`` in ``repository``: its digest, when the
        repository last confirmed it, and the validators of that answer."""
        return self._refs.record(repository, name)

    def lease(self, holder: str, images: Iterable[bytes]) -> None:
        """Add ``images`` to ``holder``'s lease (idempotent; persisted)."""
        self._holds.lease(holder, images)

    def release(self, holder: str) -> None:
        """Drop every lease of ``holder`` (idempotent)."""
        self._holds.release(holder)

    def leases(self) -> dict[str, set[bytes]]:
        return self._holds.leases()

    def pin(self, images: Iterable[bytes]) -> AbstractContextManager[None]:
        """Protect ``images`` (and their objects) from GC while the block runs, also from
        GC in other processes (:meth:`csi.store.holds.Holds.pin`). Pin an image before
        checking whether it is present, so GC cannot remove it in between."""
        return self._holds.pin(images)

    def touch(self, image: bytes) -> None:
        """Mark ``image`` as used now (LRU order of GC)."""
        self._holds.touch(image)

    # -- garbage collection ----------------------------------------------------------------

    def gc(self, *, target_bytes: int | None = None, dry_run: bool = False) -> GcReport:
        """Collect unleased images (LRU first) and objects no remaining image references.

        ``target_bytes``: free at least that much (then stop). Without it: with a size cap,
        from above the high watermark down to the low one (only unreferenced objects when
        below it); without a cap, everything not leased or pinned.
        """
        with self._gc_mu, self._lock(exclusive=True):
            return self._gc_locked(target_bytes, dry_run)

    def _gc_locked(self, target_bytes: int | None, dry_run: bool) -> GcReport:
        def target_for(stored: int) -> int | None:
            if target_bytes is not None or self.size_cap is None:
                return target_bytes
            if stored <= self.high_watermark * self.size_cap:
                return 0
            return int(stored - self.low_watermark * self.size_cap)

        protected = self._holds.leased() | self._holds.live_pins()
        report = collect(self.repo, self.db, protected, target_for, dry_run)
        if not dry_run:
            m.GC_RUNS.inc()
            m.GC_FREED_BYTES.inc(report.freed_bytes)
            self._update_gauges()
        return report

    # -- fsck and recovery -----------------------------------------------------------------

    def fsck(self, *, repair: bool = True, progress: Progress | None = None) -> FsckReport:
        """Recompute every stored file's digest; quarantine bad ones (``repair``). Also
        report what dead processes left behind (pins, temp files) and, with ``repair``,
        remove it."""
        report = FsckReport(repair=repair)
        report.temp_removed_at_open = self.recovery.temp_removed
        report.stale_pins = len(self._holds.dead_pins())
        report.leaked_temp_files, report.leaked_temp_bytes = self.repo.tmp.leftovers()
        if repair and (report.stale_pins or report.leaked_temp_files):
            self._holds.live_pins()  # deletes the pins of dead processes on the way
            with self._lock(exclusive=True):
                self.repo.tmp.clean()
        bad = check.find_bad(self.repo, report, progress)
        m.FSCK_BAD.inc(len(bad))
        if not repair:
            return report
        with self._lock(exclusive=True):
            check.quarantine(self.repo, self.db, self.quarantine_dir(), bad, report)
            rec = check.reconcile(self.repo, self.db, self._parse)
            report.removed_records += rec.dropped_missing
            report.fixed_links += rec.links_fixed
        self._update_gauges()
        return report

    def _recover(self) -> RecoveryReport:
        with self._lock(exclusive=True):
            removed = self.repo.tmp.clean()
            rep = check.reconcile(self.repo, self.db, self._parse)
            rep.temp_removed = removed
        return rep

    def quarantine_dir(self) -> Path:
        return self.root / QUARANTINE_DIR

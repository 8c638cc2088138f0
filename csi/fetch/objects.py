"""Fetching a set of missing objects into a store: in threads, or in bulk worker processes.

:meth:`ObjectFetcher.fetch` registers one shared task per object (:mod:`csi.fetch.tasks`), starts
the new ones, and waits for all of them, counting each as it ends. Few new objects run in the
client's thread pool (``concurrency`` threads, each downloading one object at a time through
:meth:`~csi.fetch.download.Downloader.download`); an eager fetch of ``BULK_MIN_OBJECTS`` or
more goes to the worker processes of :mod:`csi.fetch.bulk`, a chunk at a time, from threads of
its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from csi.repo.packs import PackIndex
from csi.store import Store, is_no_space

from . import bulk
from .download import Downloader, object_relpath
from .errors import FetchError, NoSpace
from .naming import CLAIMED, Failed, Named
from .packs import RangeJob, plan
from .progress import FetchProgress
from .tasks import Cancelled, Outcome, Task, TaskTable, Waiter, chain

log = logging.getLogger(__name__)

#: Fetches needing at least this many new objects download them in worker processes
#: (:mod:`csi.fetch.bulk`) when the repository has any.
BULK_MIN_OBJECTS = 64
#: Objects (and at most bytes) handed to a worker process at a time: at most this many, and
#: few enough that every worker gets two chunks of a smaller fetch (at least _BULK_CHUNK_MIN).
_BULK_CHUNK = 64
_BULK_CHUNK_MIN = 8
_BULK_CHUNK_BYTES = 32 << 20
#: Pack ranges handed to a worker process at a time (it runs them together), and at most
#: this many objects (claimed in the store together). Fewer, larger chunks matter over a long
#: round trip: a worker waits one per chunk (100k objects at RTT 80 ms: 26 s with chunks of
#: 256 objects, 20 s with 2048).
_RANGES_PER_CHUNK = 8
_RANGE_CHUNK_OBJECTS = 2048


class ObjectFetcher:
    """The object downloads of one repository client: its thread pool, worker processes and
    table of downloads in flight."""

    def __init__(self, downloader: Downloader) -> None:
        config = downloader.config
        self.downloader = downloader
        self.name = config.name
        self.tasks = TaskTable()
        self.bulk_min_objects = BULK_MIN_OBJECTS
        self.closed = False
        self._pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix=f"fetch-{self.name}")
        processes = (
            config.processes
            if config.processes is not None
            else bulk.default_processes(config.concurrency)
        )
        self.bulk = bulk.BulkPool(config, processes) if processes > 0 else None
        # Chunk jobs have threads of their own, two per worker process (one waiting on its
        # worker, one storing what came back). On the fetch pool they would hold all of its
        # ``concurrency`` threads for the length of a big fetch, and on-demand (lazy) reads
        # would queue behind them.
        # A chunk is claimed only once a worker is free to take it, and frees the worker's
        # slot when it is done with it; the worker holds its objects' locks across processes
        # (one each, in kernel lists that every further lock walks) while it works on them.
        # Claimed while queued for a worker as well, twice as many locks were held, and the
        # process that held them spent a third more time in the kernel.
        self._slots = threading.Semaphore(max(1, processes))
        self._bulk_jobs = (
            ThreadPoolExecutor(2 * processes, thread_name_prefix=f"bulk-{self.name}")
            if processes > 0
            else None
        )

    def close(self) -> None:
        self.closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._bulk_jobs is not None:
            self._bulk_jobs.shutdown(wait=True, cancel_futures=True)
        if self.bulk is not None:
            self.bulk.close()

    def warm(self, objects: int) -> None:
        """Have the worker processes start now if ``objects`` new objects would go to them."""
        if self.bulk is not None and objects >= self.bulk_min_objects:
            self.bulk.warm()

    # -- one fetch -------------------------------------------------------------------------

    def uses_bulk(self, objects: int) -> bool:
        """Whether a fetch of ``objects`` new objects goes to the worker processes."""
        return self.bulk is not None and objects >= self.bulk_min_objects

    def fetch(
        self,
        store: Store,
        missing: set[bytes],
        sizes: dict[bytes, int],
        prog: FetchProgress,
        index: PackIndex | None = None,
    ) -> tuple[int, int, int]:
        """Download ``missing`` through shared tasks. (fetched by us, by others, bytes).
        ``index``: the image's pack index, for a fetch that goes to the worker processes."""
        if not missing:
            return 0, 0, 0
        if self.closed:
            raise FetchError("client is closed", repository=self.name)
        unsized = [d for d in missing if d not in sizes]
        if unsized:  # every download is bounded by the size an image records
            raise FetchError(
                f"{len(unsized)} object(s) to fetch have no known size "
                f"(first: {unsized[0].hex()}); the image that lists them could not be read",
                repository=self.name,
            )
        mine: dict[Task, tuple[bytes, bool]] = {}

        def register(d: bytes) -> Task | None:
            """Register the task of ``d`` in ``mine``; return it if this fetch created it (and
            is to start it), None if another fetch runs it already."""
            task, created = self.tasks.register(store, d, sizes.get(d), prog)
            mine[task] = (d, created)
            return task if created else None

        if self.uses_bulk(len(missing)):
            self._start_bulk(store, missing, sizes, register, index)
        else:
            for d in sorted(missing):
                task = register(d)
                if task is not None:
                    self._start(store, d, task)
        # Each task is counted (and reported to ``prog``) as it ends, by a callback in the
        # thread that ends it (once per batch of tasks ended together); this thread waits
        # for the last one, or for the first error.
        waiter = _FetchWaiter(mine, sizes, prog)
        for t in mine:
            t.add_done_callback(waiter)
        waiter.finished.wait()
        with waiter.mu:
            waiter.over = True
            failed = waiter.error
        if failed is not None:
            with self.tasks.mu:
                for t in mine:
                    if not t.done():
                        t.interest -= 1
            # Downloads already running go on to their end (those nobody wants any more are
            # skipped when they would start). Wait for them: the caller's pin must cover
            # them, or the room they make on a full disk (GC) could be this very image.
            waiter.all_ended.wait()
            raise failed
        return waiter.fetched, waiter.shared, waiter.received

    # -- in-process downloads --------------------------------------------------------------

    def _start(self, store: Store, digest: bytes, task: Task) -> None:
        fut = self._pool.submit(self._object_task, store, digest, task)
        fut.add_done_callback(lambda f: chain(f, task))

    def _object_task(self, store: Store, digest: bytes, task: Task) -> Outcome:
        h = digest.hex()
        with self.tasks.mu:
            if task.interest == 0:
                del self.tasks.inflight[(id(store), digest)]
                raise Cancelled(
                    "every fetch that wanted it failed", repository=self.name, subject=f"object {h}"
                )
        try:
            return self.downloader.download(
                store,
                digest,
                kind="object",
                subject=f"object {h}",
                relpath=object_relpath(digest),
                size=task.size,
                progress=task.progress,
            )
        finally:
            self.tasks.forget(store, digest)

    def _finish_in_process(self, store: Store, digest: bytes, task: Task) -> None:
        try:
            res = self._object_task(store, digest, task)
        except BaseException as e:
            self.tasks.settle(store, digest, task, error=e)
        else:
            self.tasks.settle(store, digest, task, result=res)

    # -- worker processes ------------------------------------------------------------------

    def _start_bulk(
        self,
        store: Store,
        missing: set[bytes],
        sizes: dict[bytes, int],
        register: Callable[[bytes], Task | None],
        index: PackIndex | None,
    ) -> None:
        """Register the tasks of ``missing`` and hand the new ones to the worker processes, a
        chunk per job of the thread pool: with a pack index, first those it places in packs,
        a few ranges per chunk. Each chunk goes as soon as its tasks are registered: the
        workers start on the first while the rest are (100k tasks take about 0.4 s)."""
        assert self.bulk is not None
        rest = sorted(missing)
        if index is not None:
            ranges, unpacked = plan(index, {d: sizes.get(d, 0) for d in rest})
            self._submit_ranges(store, register, ranges)
            rest = [d for d in rest if d in unpacked]
        per_chunk = max(
            _BULK_CHUNK_MIN, min(_BULK_CHUNK, -(-len(rest) // (2 * self.bulk.processes)))
        )
        chunk: list[tuple[bytes, Task]] = []
        size = 0
        for d in rest:
            task = register(d)
            if task is None:
                continue
            chunk.append((d, task))
            size += task.size or 0
            if len(chunk) >= per_chunk or size >= _BULK_CHUNK_BYTES:
                self._submit_bulk(store, chunk)
                chunk, size = [], 0
        if chunk:
            self._submit_bulk(store, chunk)

    def _submit_ranges(
        self,
        store: Store,
        register: Callable[[bytes], Task | None],
        ranges: list[RangeJob],
    ) -> None:
        """Chunks of up to ``_RANGES_PER_CHUNK`` ranges (``_BULK_CHUNK_BYTES`` at most), and
        at least two per worker. A chunk carries the objects whose tasks this fetch created
        (its ranges' other entries are read past)."""
        assert self.bulk is not None
        if not ranges:
            return
        per_chunk = max(1, min(_RANGES_PER_CHUNK, -(-len(ranges) // (2 * self.bulk.processes))))
        group: list[RangeJob] = []
        size = count = 0

        def submit() -> None:
            chunk = [
                (e.digest, task)
                for job in group
                for e in job.entries
                if (task := register(e.digest)) is not None
            ]
            if chunk:
                self._submit_bulk(store, chunk, group)

        for job in ranges:
            group.append(job)
            size += job.length
            count += len(job.entries)
            if (
                len(group) >= per_chunk
                or size >= _BULK_CHUNK_BYTES
                or count >= _RANGE_CHUNK_OBJECTS
            ):
                submit()
                group, size, count = [], 0, 0
        if group:
            submit()

    def _submit_bulk(
        self,
        store: Store,
        chunk: list[tuple[bytes, Task]],
        ranges: list[RangeJob] | None = None,
    ) -> None:
        def done(f: Future[None]) -> None:
            # A job cancelled (the client closed) or failed unexpectedly: no task may hang.
            if f.cancelled():
                error: BaseException | None = Cancelled("the client was closed")
            else:
                error = f.exception()
            if error is not None:
                for d, task in chunk:
                    self.tasks.settle(store, d, task, error=error)

        assert self._bulk_jobs is not None
        self._bulk_jobs.submit(self.bulk_job, store, chunk, ranges).add_done_callback(done)

    def bulk_job(
        self,
        store: Store,
        chunk: list[tuple[bytes, Task]],
        ranges: list[RangeJob] | None = None,
    ) -> None:
        """Thread-pool job: one chunk through a worker process, then into the store.

        Only objects no other thread of this process is writing go to the worker (which
        leaves out those another process is writing); those are waited for in-process
        (``store.ensure``).
        """
        assert self.bulk is not None
        with self.tasks.mu:  # every fetch that wanted these failed meanwhile: skip them
            dropped = [(d, t) for d, t in chunk if t.interest == 0]
        for d, task in dropped:
            error = Cancelled(
                "every fetch that wanted it failed",
                repository=self.name,
                subject=f"object {d.hex()}",
            )
            self.tasks.settle(store, d, task, error=error)
        chunk = [(d, t) for d, t in chunk if not t.done()]
        tasks = dict(chunk)
        slot = _Slot(self._slots)
        try:
            with store.claim_in_process(tasks) as mine:
                for d in tasks.keys() - mine:
                    if store.has_object(d):
                        self.tasks.settle(store, d, tasks[d], result=(False, 0))
                if mine:
                    claimed = [(d, tasks[d]) for d in tasks if d in mine]
                    self._bulk_claimed(store, claimed, ranges, slot)
        finally:
            slot.release()
        for d, task in chunk:  # claimed elsewhere: wait for it (or write it) here
            if not task.done():
                self._finish_in_process(store, d, task)

    def _bulk_claimed(
        self,
        store: Store,
        chunk: list[tuple[bytes, Task]],
        ranges: list[RangeJob] | None,
        slot: _Slot,
    ) -> None:
        assert self.bulk is not None
        tasks = dict(chunk)
        try:
            try:
                results, _ = self.bulk.fetch(
                    store.repo.tmp.path,
                    store.repo.tmp.owner(),
                    [(d, t.size) for d, t in chunk],
                    ranges,
                    repo_root=store.repo.root,
                    locks=store.key_locks_path,
                    fsync=store.syncs_writes,
                    verity=store.tries_verity,
                )
            finally:
                slot.release()  # the worker is done with it: the next chunk may be claimed
        except Exception as e:  # the worker died, or could not start: the caller retries
            log.warning(
                "repository %r: worker process failed (%s); fetching %d objects in-process",
                self.name,
                e,
                len(chunk),
            )
            return
        named = [r for r in results if isinstance(r, Named)]
        error: BaseException | None = None
        try:
            store.record_named([(n.digest, n.size, n.verity) for n in named if n.new])
        except Exception as e:  # the files stay, named: the store's next recovery records them
            error = _record_failed(self.name, e)
        received: dict[FetchProgress, int] = {}  # told once per fetch, not once per object
        for n in named:
            p = tasks[n.digest].progress
            received[p] = received.get(p, 0) + n.received
        for p, k in received.items():
            p.downloaded(k)
        ok: list[tuple[bytes, Task, Outcome]] = []
        for n in named:
            task = tasks[n.digest]
            if error is not None and n.new:
                self.tasks.settle(store, n.digest, task, error=error)
            else:
                ok.append((n.digest, task, (n.new, n.received)))
        self.tasks.settle_many(store, ok)
        for r in results:
            if not isinstance(r, Failed) or r.error == CLAIMED:
                continue  # claimed: left unsettled, waited for in-process (by bulk_job)
            if r.error == "no_space":
                # Left unsettled: fetched again in-process, where the store can make room.
                log.info("repository %r: %s; fetching it in-process", self.name, r.message)
            else:  # final: the worker already tried every mirror
                self.tasks.settle(store, r.digest, tasks[r.digest], error=r.to_exception())


def _record_failed(repository: str, e: Exception) -> FetchError:
    """The error of objects fetched and named whose rows could not be written."""
    kept = "they are in place and are recorded when the store is next opened"
    if is_no_space(e):
        return NoSpace(
            f"no space left in the store to record fetched objects ({e}); {kept}: free space "
            "on the store's disk (`composefs-csi gc`), then fetch again",
            repository=repository,
        )
    return FetchError(
        f"recording fetched objects in the store's state failed ({e}); {kept}: check the "
        "store (`composefs-csi fsck`)",
        repository=repository,
    )


class _Slot:
    """One of a fetcher's worker slots, taken (waiting for it) when made; released once."""

    __slots__ = ("_held", "_sem")

    def __init__(self, sem: threading.Semaphore) -> None:
        sem.acquire()
        self._sem = sem
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._sem.release()


class _FetchWaiter(Waiter):
    """What one :meth:`ObjectFetcher.fetch` call waits on: counts its tasks as they end and
    reports them to its progress, a batch at a time; ``finished`` is set once all ended
    well or one failed, ``all_ended`` once all ended."""

    def __init__(
        self, mine: dict[Task, tuple[bytes, bool]], sizes: dict[bytes, int], prog: FetchProgress
    ) -> None:
        self.mine = mine
        self.sizes = sizes
        self.prog = prog
        self.mu = threading.Lock()
        self.finished = threading.Event()
        self.all_ended = threading.Event()
        self.left = self.unended = len(mine)
        self.fetched = self.shared = self.received = 0
        self.error: BaseException | None = None
        self.over = False  # set once the fetch has taken the result: later calls only count

    def many(self, tasks: list[Task]) -> None:
        mine, sizes = self.mine, self.sizes
        done = [0, 0]  # objects (present, fetched by us)
        size = [0, 0]
        with self.mu:
            self.unended -= len(tasks)
            if not self.unended:
                self.all_ended.set()
            if self.over:
                return
            for t in tasks:
                exc = t.error
                if exc is not None:
                    self.error = self.error or exc
                    self.finished.set()
                    continue
                d, created = mine[t]
                stored, got = t.result
                ours = created and stored
                if ours:
                    self.fetched += 1
                else:
                    self.shared += 1
                if created:
                    self.received += got
                done[ours] += 1
                size[ours] += sizes.get(d, 0)
                self.left -= 1
            if not self.left:
                self.finished.set()
        for ours in (False, True):
            if done[ours]:
                self.prog.objects_done(done[ours], size[ours], fetched=ours)

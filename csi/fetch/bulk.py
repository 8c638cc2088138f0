"""Downloading many objects in worker processes: the pool, in the parent.

Fetching objects costs CPU as much as network: every 4 KiB block is hashed (fs-verity) in
Python. In one process the fetching threads queue on the GIL, and so does the store's flush
leader, after each of its system calls: on 2 CPUs a 1 GiB / 10k-object image took 11 s that
way. For an eager fetch of many objects the client therefore hands them, a few at a time, to
worker processes (:mod:`csi.fetch.worker`), which take their locks across processes, download
them into temp files of the store (:mod:`csi.fetch.workertemp`), make them durable and name
them in ``objects/`` (:mod:`csi.fetch.naming`); the parent only records their rows. Done in
the parent, those dozen system calls per object made it the serial part of a big fetch, its
threads passing the GIL at every call (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from csi.repo.tmpfiles import remove_worker_dirs

from . import worker
from .config import RepositoryConfig
from .packs import RangeJob
from .worker import CARRIED, ChunkResult, fetch_chunk, init

log = logging.getLogger(__name__)


def _log_setup() -> tuple[int, str | None]:
    root = logging.getLogger()
    for h in root.handlers:
        fmt = getattr(h.formatter, "_fmt", None)
        if isinstance(fmt, str):
            return root.level, fmt
    return root.level, None


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
                # Workers fork from a server that has imported the worker's module (and with
                # it pycurl, the store and the downloader) once, instead of each importing
                # them (if the server runs already, started by someone else, this is a no-op).
                ctx.set_forkserver_preload([worker.__name__])
                self._pool = ProcessPoolExecutor(
                    self.processes,
                    mp_context=ctx,
                    initializer=init,
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
        locks: Path,
        fsync: bool = True,
        verity: bool = True,
    ) -> ChunkResult:
        """Fetch ``items`` in a worker and name them in the store whose repository is
        ``repo_root`` and whose per-digest locks are ``locks`` (blocks until done; the caller
        holds their claim among its threads: :meth:`csi.store.Store.claim_in_process`);
        apply its counters here. The worker's temp files in ``tmpdir`` are marked with
        ``owner``, this process's owner id in that temp area
        (:meth:`csi.repo.tmpfiles.TempArea.owner`): in use while it lives.

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
                fetch_chunk,
                str(tmpdir),
                tag,
                items,
                ranges,
                str(repo_root),
                fsync,
                verity,
                str(locks),
            ).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
                    self._warming = False
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        for key, labels, v in delta:
            CARRIED[key].labels(**labels).inc(v)
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

"""Fetches that outlive an RPC: one background job per (repository, image, mode), joined by
every call that needs it.

Kubelet gives a CSI call about two minutes. :meth:`FetchJobs.ensure` starts (or joins) the jobs
for a volume's images and waits at most ``wait`` seconds; if they are still running it raises
ABORTED (the spec's "operation pending for volume", which kubelet retries) with the progress in
the message, and the job goes on. The retry joins the same job; a finished job's result is
kept until one caller has seen it, a failed job is forgotten so the next call starts afresh.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Protocol

from csi.fetch import metrics as fetch_metrics
from csi.fetch.client import RepositoryClient
from csi.fetch.config import RepositoryConfig
from csi.fetch.progress import FetchProgress
from csi.store import Store

from .errors import aborted

log = logging.getLogger(__name__)


class Fetcher(Protocol):
    """Blocking fetch primitives (:class:`RepositoryFetcher` over :mod:`csi.fetch`)."""

    def resolve(self, repository: str, ref: str) -> bytes: ...

    def fetch(
        self, repository: str, image: bytes, *, lazy: bool, progress: FetchProgress
    ) -> None: ...


JobKey = tuple[str, bytes, bool]


@dataclass
class _Job:
    key: JobKey
    future: Future[None]
    progress: FetchProgress
    started: float


class FetchJobs:
    def __init__(
        self,
        fetcher: Fetcher,
        *,
        is_complete: Callable[[bytes, bool], bool],
        max_jobs: int = 8,
    ) -> None:
        self.fetcher = fetcher
        self._is_complete = is_complete
        self._pool = ThreadPoolExecutor(max_jobs, thread_name_prefix="fetch-job")
        self._mu = threading.Lock()
        self._jobs: dict[JobKey, _Job] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, job: _Job) -> None:
        repo, image, lazy = job.key
        self.fetcher.fetch(repo, image, lazy=lazy, progress=job.progress)

    def _job(self, key: JobKey) -> _Job:
        with self._mu:
            job = self._jobs.get(key)
            if job is not None:
                return job
            job = _Job(key, Future(), FetchProgress(), time.monotonic())
            self._jobs[key] = job
        # Outside the lock: a job that fails at once runs its callback in this thread.
        fut = self._pool.submit(self._run, job)
        fut.add_done_callback(functools.partial(self._finish, job))
        return job

    def _finish(self, job: _Job, f: Future[None]) -> None:
        exc = f.exception()
        if exc is not None:
            with self._mu:  # forget failures: the next call starts a new attempt
                if self._jobs.get(job.key) is job:
                    del self._jobs[job.key]
            job.future.set_exception(exc)
        else:
            job.future.set_result(None)

    def running(self) -> list[JobKey]:
        with self._mu:
            return [k for k, j in self._jobs.items() if not j.future.done()]

    def ensure(self, repository: str, images: Sequence[bytes], *, lazy: bool, wait: float) -> bool:
        """Return once every image is complete in the store (``lazy``: the image itself is
        enough). Returns True if nothing had to be fetched (warm). Raises the fetch's error, or
        ABORTED after ``wait`` seconds with the job still running."""
        pending: list[_Job] = []
        for image in images:
            if self._is_complete(image, lazy):
                continue
            # An eager job in flight also satisfies a lazy need.
            with self._mu:
                eager = self._jobs.get((repository, image, False))
            pending.append(eager if lazy and eager else self._job((repository, image, lazy)))
        if not pending:
            return True
        done, not_done = wait_futures([j.future for j in pending], timeout=wait)
        for job in pending:
            if job.future in done:
                exc = job.future.exception()
                with self._mu:
                    if self._jobs.get(job.key) is job:
                        del self._jobs[job.key]
                if exc is not None:
                    raise exc
        if not_done:
            job = next(j for j in pending if j.future in not_done)
            raise aborted(_describe(job))
        return False


def _describe(job: _Job) -> str:
    repo, image, _lazy = job.key
    p = job.progress.snapshot()
    size = ""
    if p.bytes_total:
        size = f", {p.bytes_done >> 20} of {p.bytes_total >> 20} MiB"
    return (
        f"fetch of image sha256:{image.hex()} from repository {repo!r} is in progress "
        f"({p.phase}: {p.objects_done}/{p.objects_total} objects{size}, "
        f"{time.monotonic() - job.started:.0f}s); it continues in the background, retry later"
    )


class RepositoryFetcher:
    """:class:`Fetcher` over :class:`csi.fetch.RepositoryClient`: one client per configured
    repository, created on first use and kept (each owns a download pool)."""

    def __init__(self, repositories: Mapping[str, RepositoryConfig], store: Store) -> None:
        self._configs = dict(repositories)
        self._store = store
        self._clients: dict[str, RepositoryClient] = {}
        self._mu = threading.Lock()
        for name in self._configs:  # series at zero before the first fetch (dashboards)
            fetch_metrics.init_repository(name)

    def client(self, repository: str) -> RepositoryClient:
        with self._mu:
            c = self._clients.get(repository)
            if c is None:
                c = self._clients[repository] = RepositoryClient(self._configs[repository])
            return c

    def close(self) -> None:
        with self._mu:
            for c in self._clients.values():
                c.close()
            self._clients.clear()

    def resolve(self, repository: str, ref: str) -> bytes:
        # With the store: conditional requests, the last resolution when the repository is
        # unreachable (within its limits), and an image served as the ref's answer kept.
        return self.client(repository).resolve(ref, self._store)

    def fetch(self, repository: str, image: bytes, *, lazy: bool, progress: FetchProgress) -> None:
        # Lazy: the image only; the data plane fetches objects on first read.
        self.client(repository).fetch_image(
            "sha256:" + image.hex(), self._store, progress, objects=not lazy
        )

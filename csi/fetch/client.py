"""Repository client: resolve references and fill a store with an image and its objects.

One :class:`RepositoryClient` per configured repository, kept for the life of the process. It
puts together the parts of a fetch, each in its own module:

- :mod:`csi.fetch.mirrors`: the mirrors and the retry loop every request goes through;
- :mod:`csi.fetch.resolving`: a ref name to an image digest (and the image, when served so);
- :mod:`csi.fetch.download`: one object or image into the store;
- :mod:`csi.fetch.objects` (with :mod:`csi.fetch.tasks` and :mod:`csi.fetch.bulk`): the missing
  objects of an image, shared between concurrent fetches, in threads or worker processes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from csi.store import ImageRejected, Store, StoreFull

from . import metrics as m
from . import noderefs
from .config import RepositoryConfig
from .download import Downloader
from .errors import Corrupt, FetchError, NoSpace
from .images import object_sizes
from .mirrors import Mirrors
from .objects import BULK_MIN_OBJECTS, ObjectFetcher
from .packs import load_index
from .progress import FetchProgress
from .resolving import Resolved
from .source import Source
from .tasks import Cancelled

__all__ = ["BULK_MIN_OBJECTS", "Cancelled", "FetchResult", "RepositoryClient"]


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
        self.mirrors = Mirrors(config, sleep=sleep, rng=rng)
        self.downloader = Downloader(self.mirrors)
        self.objects = ObjectFetcher(self.downloader)
        self._closed = False

    @property
    def sources(self) -> list[Source]:
        return self.mirrors.sources

    @property
    def bulk_min_objects(self) -> int:
        """New objects from which an eager fetch goes to the worker processes."""
        return self.objects.bulk_min_objects

    @bulk_min_objects.setter
    def bulk_min_objects(self, n: int) -> None:
        self.objects.bulk_min_objects = n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.objects.close()
        self.mirrors.close()

    def __enter__(self) -> RepositoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RepositoryClient({self.config!r})"

    # -- public API --------------------------------------------------------------------------

    def resolve(self, ref: str, store: Store | None = None) -> bytes:
        """The image digest ``ref`` designates (a digest reference needs no request).

        With ``store`` (a node's): the request is conditional on what the store recorded of
        the ref, and that record answers when every mirror is unreachable
        (:mod:`csi.fetch.noderefs`); the resolution is recorded, and an image served as
        the ref's answer is stored (a fetch by its digest then needs no request for it).
        """
        res = noderefs.resolve(self.mirrors, ref, store, None)
        try:
            if store is not None and not res.offline:
                if res.body is not None and not store.has_image(res.digest):
                    self._store_body(store, res)
                noderefs.record(self.name, store, ref, res)
        finally:
            res.close()
        return res.digest

    def _store_body(self, store: Store, res: Resolved) -> None:
        """Store the image a ref was answered with (validated by the resolution, which
        listed its objects on the way)."""
        assert res.body is not None
        subject = f"image {res.digest.hex()}"
        try:
            known = set(res.sizes) if res.sizes is not None else None
            with memoryview(res.body) as view:
                store.add_image_bytes(view, objects=known)
        except ImageRejected as e:
            raise Corrupt(str(e), repository=self.name, subject=subject) from None
        except StoreFull as e:
            raise NoSpace(str(e), repository=self.name, subject=subject) from None

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
        res = noderefs.resolve(self.mirrors, ref, store, prog)
        try:
            return self._fetch_resolved(ref, store, prog, with_objects, t0, res)
        finally:
            res.close()

    def _fetch_resolved(
        self,
        ref: str,
        store: Store,
        prog: FetchProgress,
        with_objects: bool,
        t0: float,
        res: Resolved,
    ) -> FetchResult:
        digest, body, body_sizes = res.digest, res.body, res.sizes
        if res.received is not None:
            received = res.received
        else:
            received = len(body) if body is not None else 0
        h = digest.hex()
        with store.pin([digest]):
            image_fetched = False
            if not store.has_image(digest):
                if with_objects and body_sizes is not None:
                    # A new image of many objects: the worker processes start while the
                    # image is stored and its objects are looked up.
                    self.objects.warm(len(body_sizes))
                prog.set_phase("image")
                if body is not None:
                    self._store_body(store, res)
                    image_fetched = True
                else:
                    image_fetched, got = self.downloader.download(
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
            if image_fetched and body_sizes is not None:
                objects = set(body_sizes)  # what was just recorded for it
            else:
                objects = store.image_objects(digest)
            missing = store.missing_among(objects)
            present = len(objects) - len(missing)
            fetched = 0
            if with_objects:
                self.objects.warm(len(missing))
                sizes: dict[bytes, int] = {}
                if missing:
                    # The object file: has_image() checked it (the images/ link may lag).
                    sizes = body_sizes or object_sizes(store.object_path(digest))
                total_size = sum(sizes.get(d, 0) for d in objects) if sizes else None
                prog.set_totals(len(objects), total_size)
                prog.set_phase("objects")
                for d in objects - missing:
                    prog.object_done(sizes.get(d, 0), fetched=False)
                # Many new objects: from pack files, if the repository has them for this image.
                index = None
                if self.objects.uses_bulk(len(missing)):
                    index, got = load_index(self.mirrors, digest, len(objects))
                    received += got
                fetched, shared, got = self.objects.fetch(store, missing, sizes, prog, index)
                received += got
                present += shared
                if present:
                    m.DEDUP_HITS.labels(self.name).inc(present)
            else:  # lazy: the objects come later, on demand
                prog.set_totals(len(objects), None)
            noderefs.record(self.name, store, ref, res)
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
        wanted = store.missing_among(sizes.keys())
        return self.objects.fetch(store, wanted, dict(sizes), prog)[2]


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

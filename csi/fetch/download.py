"""One object or image downloaded into a store (or a worker's temp files) through the
retry loop of :class:`~csi.fetch.mirrors.Mirrors`, with its counters.

The same :meth:`Downloader.download` runs in the client's threads and in the bulk worker
processes (:mod:`csi.fetch.worker`), so mirrors, retries, size limits, digest checks and metrics
are the same wherever an object is fetched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from csi.store import DigestMismatch, ImageRejected, ObjectWriter, StoreFull

from . import metrics as m
from .errors import Corrupt, FetchError, NoSpace, SourceCorrupt, SourceError, SourceInvalid
from .mirrors import Mirrors
from .progress import FetchProgress
from .quoting import quote
from .source import Source


class ObjectSink(Protocol):
    """Where :meth:`Downloader.download` puts an object: the store, or a worker process's
    temp files (:mod:`csi.fetch.workertemp`)."""

    def ensure(
        self,
        digest: bytes,
        fill: Callable[[ObjectWriter], None],
        *,
        kind: Any = ...,
        size_hint: int | None = ...,
    ) -> bool: ...


def object_relpath(digest: bytes) -> str:
    h = digest.hex()
    return f"objects/{h[:2]}/{h[2:]}"


def result_label(e: FetchError) -> str:
    """The ``result`` label of an object that could not be fetched."""
    return {
        "NOT_FOUND": "not_found",
        "DATA_LOSS": "corrupt",
    }.get(e.code, "error")


class Downloader:
    """Downloads single objects and images from one repository's mirrors."""

    def __init__(self, mirrors: Mirrors) -> None:
        self.mirrors = mirrors
        self.config = mirrors.config
        self.name = mirrors.name
        m.init_repository(self.name)
        # The two counters every stored object moves (labels() looks up and locks each time).
        self._bytes_ok = m.BYTES.labels(self.name, "ok")
        self._objects_ok = m.OBJECTS.labels(self.name, "ok")

    def download(
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
        by these attempts). ``prior``: see :meth:`Mirrors.attempts` (its bytes are counted by
        whoever made it)."""
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
                    src.get(object_relpath(digest), on_data, max_size=max_size)

            try:
                stored = store.ensure(digest, fill, kind=kind, size_hint=size)
            except DigestMismatch as e:
                received += got
                raise self.attempt_failed(e, got) from None
            except SourceError as e:
                received += got
                raise self.attempt_failed(e, got) from None
            except ImageRejected as e:
                received += got
                m.BYTES.labels(self.name, "corrupt").inc(got)
                raise Corrupt(str(e), repository=self.name, subject=subject) from None
            except StoreFull as e:
                raise NoSpace(str(e), repository=self.name, subject=subject) from None
            received += got
            self.attempt_ok(got, stored=False)
            return stored

        try:
            stored = self.mirrors.attempts(subject, attempt, prior)
        except FetchError as e:
            m.OBJECTS.labels(self.name, result_label(e)).inc()
            raise
        if stored:
            self._objects_ok.inc()
        return stored, received

    def attempt_ok(self, got: int, *, stored: bool) -> None:
        """Count an attempt that received ``got`` bytes of a verified object (and, with
        ``stored``, the object as fetched: otherwise the caller counts it)."""
        self._bytes_ok.inc(got)
        if stored:
            self._objects_ok.inc()

    def attempt_failed(self, error: DigestMismatch | SourceError, got: int) -> SourceError:
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

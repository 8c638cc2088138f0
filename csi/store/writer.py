"""ObjectWriter: what a ``fill`` callback writes an object through."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Callable

from csi.image.fsverity import FsVerityHasher
from csi.repo.directio import BlockWriter, enable_direct
from csi.repo.tmpfiles import TempFile

from .errors import StoreError, StoreFull

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_no_space(e: BaseException) -> bool:
    """Whether ``e`` says the store's filesystem is full (a write, or SQLite's journal)."""
    if isinstance(e, StoreFull):
        return True
    if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
        return True
    return isinstance(e, sqlite3.OperationalError) and "full" in str(e)


class ObjectWriter:
    """Writes into a locked temp file, hashing as it goes.

    ``reset()`` truncates and restarts (a fetch retrying an object mid-body). After ``fill``
    returns, the store calls ``finish()`` (the last bytes are written), then commits (verifies,
    syncs, renames); the writer is then closed. With ``direct``, the bytes go to the disk with
    direct I/O (:mod:`csi.repo.directio`; the store asks for it for objects of 64 KiB and
    more). When the filesystem is full, ``write`` or ``finish`` raises :class:`StoreFull` and
    the store runs garbage collection before (once) calling ``fill`` again.
    """

    __slots__ = ("_closed", "_hasher", "_out", "_tmp", "digest_expected", "no_space")

    def __init__(self, tmp: TempFile, digest_expected: bytes, *, direct: bool = False) -> None:
        self._tmp = tmp
        self._hasher = FsVerityHasher()
        self._out = BlockWriter(tmp.fd, direct=direct and enable_direct(tmp.fd))
        self._closed = False
        self.no_space = False
        self.digest_expected = digest_expected

    @property
    def direct(self) -> bool:
        """True while the bytes go to the disk with direct I/O (no page cache to flush)."""
        return self._out.direct

    @property
    def size(self) -> int:
        """Bytes written since the start (or the last reset)."""
        return self._hasher.size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise StoreError("ObjectWriter used after its object was committed or discarded")
        if self.no_space:
            raise StoreFull("no space left in the store (write after a failed write)")
        mv = memoryview(data).cast("B")
        self._hasher.update(mv)
        self._guard(self._out.write, mv)

    def finish(self) -> None:
        """Write out what is still buffered: the temp file then holds every byte."""
        if self._closed:
            raise StoreError("ObjectWriter used after its object was committed or discarded")
        self._guard(self._out.finish)

    def _guard(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except OSError as e:
            if e.errno in NO_SPACE_ERRNOS:
                self.no_space = True
                raise StoreFull(f"no space left in the store: {e.strerror}") from e
            raise

    def reset(self) -> None:
        """Discard everything written so far and restart hashing."""
        if self._closed:
            raise StoreError("ObjectWriter used after its object was committed or discarded")
        self._out.reset()
        self._hasher = FsVerityHasher()
        self.no_space = False

    def digest(self) -> bytes:
        return self._hasher.digest()

    def close(self) -> None:
        self._closed = True
        self._out.close()

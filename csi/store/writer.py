"""ObjectWriter: what a ``fill`` callback writes an object through."""

from __future__ import annotations

import errno
import os

from csi.image.fsverity import FsVerityHasher
from csi.repo.tmpfiles import TempFile

from .errors import StoreError, StoreFull

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class ObjectWriter:
    """Writes into a locked temp file, hashing as it goes.

    ``reset()`` truncates and restarts (a fetch retrying an object mid-body). The store
    commits (verifies, fsyncs, renames) after ``fill`` returns; the writer is then closed.
    When the filesystem is full, ``write`` raises :class:`StoreFull` and the store runs
    garbage collection before (once) calling ``fill`` again.
    """

    __slots__ = ("_closed", "_hasher", "_tmp", "digest_expected", "no_space")

    def __init__(self, tmp: TempFile, digest_expected: bytes) -> None:
        self._tmp = tmp
        self._hasher = FsVerityHasher()
        self._closed = False
        self.no_space = False
        self.digest_expected = digest_expected

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
        fd = self._tmp.fd
        try:
            while mv:
                n = os.write(fd, mv)
                mv = mv[n:]
        except OSError as e:
            if e.errno in NO_SPACE_ERRNOS:
                self.no_space = True
                raise StoreFull(f"no space left in the store: {e.strerror}") from e
            raise

    def reset(self) -> None:
        """Discard everything written so far and restart hashing."""
        if self._closed:
            raise StoreError("ObjectWriter used after its object was committed or discarded")
        os.ftruncate(self._tmp.fd, 0)
        os.lseek(self._tmp.fd, 0, os.SEEK_SET)
        self._hasher = FsVerityHasher()
        self.no_space = False

    def digest(self) -> bytes:
        return self._hasher.digest()

    def close(self) -> None:
        self._closed = True

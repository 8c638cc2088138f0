"""File contents from a layer stream into repository objects, published only at the end.

Each file is read once, from the layer stream straight into an aligned buffer
(:class:`~csi.repo.directio.BlockWriter`), hashed there (fs-verity) and written from it:
a file that fits one buffer is hashed before any temp file exists, and none is made when the
repository (or this import) already has that object; a larger one goes to its temp file as it
arrives (direct I/O from 64 KiB up) and the copy is dropped if it turns out to be known.

Nothing is visible in ``objects/`` until :meth:`ObjectSink.commit`: the temp files wait in the
repository's temp area, named ``<pid>-<random>.worker.tmp`` (so a store's temp cleaner leaves
them alone while this process lives, and removes them after a crash), then one ``syncfs`` makes
them all durable and each is renamed to its digest. :meth:`ObjectSink.abort` removes them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
from collections.abc import Callable

from csi.image.fsverity import FsVerityHasher
from csi.repo import Repository
from csi.repo.directio import DIRECT_MIN_SIZE, BlockWriter, enable_direct
from csi.repo.tmpfiles import WORKER_TEMP_SUFFIX

_libc = ctypes.CDLL(None, use_errno=True)

#: ``read(buffer) -> bytes placed`` (0 only at a premature end).
ReadInto = Callable[[memoryview], int]


class ShortRead(Exception):
    """The source ended before the announced size."""


def _pump(read: ReadInto, w: BlockWriter, h: FsVerityHasher, left: int) -> int:
    """Read up to ``left`` bytes through ``read`` into ``w``'s free space, hashing them, for as
    long as it has room; the bytes still to read. A source that ends early: ShortRead."""
    while left and (room := w.space()):
        n = read(room[: min(left, len(room))])
        if n <= 0:
            raise ShortRead
        h.update(room[:n])
        w.advance(n)
        left -= n
    return left


class ObjectSink:
    """Objects of one import (see the module doc). Not thread-safe."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        repo.tmp.ensure_dirs()
        self._tmpdir = str(repo.tmp.path)
        self._objects = str(repo.root / "objects")
        self._tag = f"{os.getpid()}-"
        # Opened before anything is written: syncfs on it reports any writeback error since.
        self._root_fd = os.open(repo.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._pending: dict[bytes, tuple[str, int]] = {}  # digest -> (temp path, size)
        self._present: set[bytes] = set()
        #: Contents stored (each file once per name given to :meth:`store`), and their bytes.
        self.files = 0
        self.bytes = 0

    # -- counters -------------------------------------------------------------------------------

    @property
    def new_objects(self) -> int:
        return len(self._pending)

    @property
    def new_bytes(self) -> int:
        return sum(size for _, size in self._pending.values())

    @property
    def present_objects(self) -> int:
        return len(self._present)

    # -- writing -------------------------------------------------------------------------------

    def _known(self, digest: bytes) -> bool:
        if digest in self._pending or digest in self._present:
            return True
        if self.repo.has_object(digest):
            self._present.add(digest)
            return True
        return False

    def store(self, read: ReadInto, size: int) -> bytes:
        """Read exactly ``size`` bytes through ``read`` into an object; its fs-verity digest."""
        h = FsVerityHasher()
        with BlockWriter(None) as w:
            left = _pump(read, w, h, size)  # into memory, while it fits there
            if not left:
                digest = h.digest()
                if self._known(digest):
                    self._count(size)
                    return digest
            path = f"{self._tmpdir}/{self._tag}{secrets.token_hex(8)}{WORKER_TEMP_SUFFIX}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.fchmod(fd, 0o644)  # whatever the umask: objects are readable by all
                w.attach(fd, direct=size >= DIRECT_MIN_SIZE and enable_direct(fd))
                if _pump(read, w, h, left):  # attached, the writer always has room
                    raise ShortRead
                w.finish()
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
            os.close(fd)
        digest = h.digest()
        if self._known(digest):
            os.unlink(path)
        else:
            self._pending[digest] = (path, size)
        self._count(size)
        return digest

    def _count(self, size: int) -> None:
        self.files += 1
        self.bytes += size

    # -- publishing ------------------------------------------------------------------------------

    def commit(self) -> None:
        """Make every new object durable (one ``syncfs``), then name each by its digest."""
        if _libc.syncfs(self._root_fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}", str(self.repo.root))
        for digest, (tmp, _size) in self._pending.items():
            final = self.repo.object_file(digest)
            if os.path.lexists(final):
                os.unlink(tmp)  # stored meanwhile by someone else: the same bytes
                continue
            try:
                os.rename(tmp, final)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(final), mode=0o755, exist_ok=True)
                os.rename(tmp, final)
        self._close()

    def abort(self) -> None:
        """Remove every temp file of this import (idempotent)."""
        for tmp, _size in self._pending.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._pending.clear()
        self._close()

    def _close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

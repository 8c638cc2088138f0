"""A fetch worker's temp files: each object it downloads is written to a new file in the
worker's own directory of the store's temp area, verified, and kept (unnamed, its descriptor
open while the budget allows) for the naming step (:mod:`csi.fetch.naming`).

The directory is named after the parent process's owner id in that temp area and the pool
(:func:`csi.repo.tmpfiles.worker_dir`): the store's cleaner leaves it alone while the parent
lives and removes it once the parent is gone. One directory per worker, not one shared: the
kernel serialises creating files in one directory (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
from collections.abc import Callable

from csi.limits import raise_open_files_limit
from csi.repo.tmpfiles import WORKER_TEMP_SUFFIX, TempFile, worker_dir
from csi.store import DigestMismatch, ObjectWriter

from .naming import Written


class TempObject:
    """One object being written to a new temp file in the worker's directory of the store's
    temp area, kept (not named yet) once verified. (No lock descriptor: the name says whose
    file it is; see tmpfiles.TempArea.clean.)

    Buffered, not direct I/O: a direct write blocks the worker until the disk has the data,
    and the padded last block costs a read-modify-write at truncation; buffered, the writes
    return at once and the naming step's one ``syncfs`` per chunk (where the store syncs
    its writes) writes them back (docs/benchmarks.md).
    """

    __slots__ = ("digest", "fd", "got", "path", "writer")

    def __init__(self, tmpdir: str, tag: str, digest: bytes) -> None:
        self.digest = digest
        self.got = 0  # bytes received (passed to write)
        self.path = os.path.join(tmpdir, f"{tag}-{_temp_name()}{WORKER_TEMP_SUFFIX}")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            self.writer = ObjectWriter(TempFile(self.path, self.fd, -1), digest)
        except BaseException:
            self.discard()
            raise

    def write(self, chunk: bytes) -> None:
        self.writer.write(chunk)
        self.got += len(chunk)

    def keep(self, kind: str = "object") -> int:
        """Write out and verify: the file then holds exactly the object. Its size. The
        descriptor stays open (:attr:`fd`) while the chunk may keep it (:data:`fds`), for
        the naming step; otherwise it is closed (-1)."""
        try:
            self.writer.finish()
            actual = self.writer.digest()
        finally:
            self.writer.close()
        if actual != self.digest:
            raise DigestMismatch(self.digest, actual, f"{kind} {self.digest.hex()}")
        if not _mode_exact:
            os.fchmod(self.fd, 0o644)
        if not fds.take():
            fd, self.fd = self.fd, -1
            os.close(fd)
        return self.writer.size

    def kept(self, received: int | None = None) -> Written:
        """What :meth:`keep` leaves for the naming step (the open descriptor goes with it);
        ``received``: bytes to count for it (default: those written)."""
        fd, self.fd = self.fd, -1
        got = self.got if received is None else received
        return Written(self.digest, self.path, self.writer.size, got, fd)

    def discard(self) -> None:
        """Close and remove the temp file (idempotent)."""
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class TempSink:
    """What a worker's sequential downloads write into: ``ensure`` as the store has it, but
    each object goes to a :class:`TempObject`."""

    def __init__(self, tmpdir: str, tag: str) -> None:
        self.tmpdir = tmpdir
        self.tag = tag
        self.written: list[Written] = []

    def ensure(
        self,
        digest: bytes,
        fill: Callable[[ObjectWriter], None],
        *,
        kind: str = "object",
        size_hint: int | None = None,
    ) -> bool:
        obj = TempObject(self.tmpdir, self.tag, digest)
        try:
            fill(obj.writer)
            obj.keep(kind)
        except BaseException:
            obj.discard()
            raise
        self.written.append(obj.kept())
        return True


class FdBudget:
    """How many written files a chunk may keep open until they are named (set by
    :func:`limits_setup` from the open-files limit; none in a process that did not run it)."""

    __slots__ = ("left", "per_chunk")

    def __init__(self) -> None:
        self.per_chunk = 0
        self.left = 0

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


#: Keeping the descriptor that wrote a file until it is named saves closing and opening it
#: again (two of the ten-odd system calls per object); not where fs-verity is enabled, which
#: refuses a file open for writing.
fds = FdBudget()
#: At most this many per chunk (see :func:`limits_setup`).
KEPT_FDS_MAX = 640
#: Whether a file created with mode 0644 gets exactly 0644 (the umask takes nothing from it):
#: then no ``fchmod`` per object.
_mode_exact = False
#: Temp names: this process's random part and a counter (no random bytes per file).
_name_prefix: str | None = None
_name_count = itertools.count()


#: This worker's temp directory in each temp area, by (temp area, owner).
_dirs: dict[tuple[str, str], str] = {}


def own_dir(tmpdir: str, owner: str) -> str:
    """The directory this worker writes its temp files in for ``owner`` (one per worker:
    see :data:`csi.repo.tmpfiles.WORKER_DIR_SUFFIX`)."""
    key = (tmpdir, owner)
    path = _dirs.get(key)
    if path is None or not os.path.isdir(path):  # removed behind our back: made again
        path = _dirs[key] = worker_dir(tmpdir, owner, _name_prefix or secrets.token_hex(6))
    return path


def _temp_name() -> str:
    if _name_prefix is None:
        return secrets.token_hex(8)
    return f"{_name_prefix}{next(_name_count):x}"


def limits_setup() -> None:
    """At a worker's start: its open-files budget, whether the umask keeps 0644, and its
    temp-name prefix."""
    global _mode_exact, _name_prefix
    soft = raise_open_files_limit()
    # Room for the worker's own descriptors (pipes, connections), and all of them below
    # FD_SETSIZE: a connection opened while files are kept gets the lowest free number, and
    # the multi handle's wait (pycurl's select) does not see a descriptor of 1024 or more.
    fds.per_chunk = max(0, min(soft - 512, KEPT_FDS_MAX))
    mask = os.umask(0o022)
    os.umask(mask)
    _mode_exact = mask & 0o644 == 0
    _name_prefix = secrets.token_hex(6)

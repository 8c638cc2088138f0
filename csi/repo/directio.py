"""Writing object files with ``O_DIRECT``: from our buffer straight to the disk.

Objects are written once and read later, mostly by another process. Writing them through the
page cache costs a fresh page and a copy for every 4 KiB; on the virtual machines this project
runs on, that is about 3 s of system time per GB (``dd conv=fsync``: 3.3 s for 1 GiB, against
0.9 s and 0.13 s of system time with ``oflag=direct``). A direct write hands our buffer to the
device instead. The data is then on the device (its own volatile cache aside: the
filesystem sync that makes a group of objects durable also flushes that, and persists the
file sizes).

``O_DIRECT`` wants the buffer address, the file offset and the length aligned to the device's
logical block; :data:`ALIGN` (4096) is a multiple of every common one. :class:`BlockWriter`
gathers bytes in an aligned buffer and writes whole buffers; the last, partial block is
written padded with zeros and the file is then truncated to its exact size.

Where the filesystem refuses ``O_DIRECT`` (``EINVAL``: some FUSE and network filesystems, or
an alignment it does not accept), the descriptor falls back to ordinary buffered writes: the
result is the same file, only slower to write.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading

#: Alignment of buffer addresses, file offsets and lengths of direct writes.
ALIGN = 4096
#: Size of one buffer: bytes gathered before a write.
BUFFER_SIZE = 1 << 20
#: Files at least this large are worth writing directly. Below it, waiting for the device
#: costs more than the page cache's copy (bench.build: 64 KiB was best of 0 / 64 KiB /
#: 1 MiB / never).
DIRECT_MIN_SIZE = 64 << 10


def enable_direct(fd: int) -> bool:
    """Turn on ``O_DIRECT`` for writes through ``fd``; False where the filesystem refuses it."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return False
    return True


def _disable_direct(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)


class BufferPool:
    """Aligned (``mmap``) buffers, reused: a fresh mapping costs a page fault per 4 KiB."""

    def __init__(self, size: int = BUFFER_SIZE, keep: int = 32) -> None:
        if size <= 0 or size % ALIGN:
            raise ValueError(f"buffer size must be a positive multiple of {ALIGN}")
        self.size = size
        self._keep = keep
        self._free: list[mmap.mmap] = []
        self._mu = threading.Lock()

    def get(self) -> mmap.mmap:
        with self._mu:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, self.size)

    def put(self, buf: mmap.mmap) -> None:
        with self._mu:
            if len(self._free) < self._keep:
                self._free.append(buf)
        # else dropped: unmapped once nothing refers to it any more


#: The process-wide pool :class:`BlockWriter` takes its buffers from by default.
POOL = BufferPool()


class BlockWriter:
    """Sequential writer of one file, in whole aligned buffers (see the module doc).

    Either copy bytes in with :meth:`write`, or fill the buffer in place: :meth:`space` is the
    free part of the buffer, :meth:`advance` records how much of it was filled. :meth:`finish`
    writes the rest; only then does the file hold exactly :attr:`size` bytes. :meth:`close`
    returns the buffer to its pool (the descriptor stays the caller's).

    The descriptor may come later (``fd=None``, then :meth:`attach`): until then the writer
    only gathers bytes, and :meth:`space` is empty once the buffer is full. A caller can so
    look at a small file's whole content (its digest) before deciding to create the file.
    """

    __slots__ = ("_buf", "_fill", "_pool", "_view", "direct", "fd", "size")

    def __init__(
        self, fd: int | None, *, direct: bool = False, pool: BufferPool | None = None
    ) -> None:
        self.fd = fd
        self.direct = direct
        self._pool = pool or POOL
        self._buf: mmap.mmap | None = self._pool.get()
        self._view = memoryview(self._buf)
        self._fill = 0
        #: Bytes accepted so far (written or buffered).
        self.size = 0

    def space(self) -> memoryview:
        """The free part of the buffer (empty only when full and no descriptor is attached)."""
        return self._view[self._fill :]

    def attach(self, fd: int, *, direct: bool) -> None:
        """Give the writer its descriptor (``direct``: opened or switched to ``O_DIRECT``)."""
        if self.fd is not None:
            raise ValueError("BlockWriter already has a descriptor")
        self.fd = fd
        self.direct = direct
        if self._fill == len(self._view):
            self._write_out(self._fill)
            self._fill = 0

    def advance(self, n: int) -> None:
        """``n`` bytes were placed at the start of :meth:`space`."""
        if n < 0 or self._fill + n > len(self._view):
            raise ValueError("BlockWriter.advance past the end of the buffer")
        self._fill += n
        self.size += n
        if self._fill == len(self._view) and self.fd is not None:
            self._write_out(self._fill)
            self._fill = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        if not self.direct and not self._fill and self.fd is not None and src:
            # Buffered I/O needs no aligned copy: the bytes go straight to the page cache.
            self.size += len(src)
            _write_all(self.fd, src)
            return
        while src:
            room = self.space()
            if not room:
                raise ValueError("BlockWriter buffer full and no descriptor attached")
            n = min(len(room), len(src))
            room[:n] = src[:n]
            src = src[n:]
            self.advance(n)

    def finish(self) -> None:
        """Write what is buffered; the file is then exactly :attr:`size` bytes long."""
        n = self._fill
        if n == 0:
            return
        if self.fd is None:
            raise ValueError("BlockWriter.finish without a descriptor")
        padded = n
        if self.direct and n % ALIGN:
            padded = n + (ALIGN - n % ALIGN)
            self._view[n:padded] = bytes(padded - n)
        self._write_out(padded)
        self._fill = 0
        if padded != n:
            os.ftruncate(self.fd, self.size)

    def reset(self) -> None:
        """Drop everything: the file is emptied and writing starts again at offset 0."""
        self._fill = 0
        self.size = 0
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)

    def close(self) -> None:
        if self._buf is not None:
            self._view.release()
            self._pool.put(self._buf)
            self._buf = None

    def _write_out(self, n: int) -> None:
        if self.fd is None:
            raise ValueError("BlockWriter has no descriptor to write to")
        fd = self.fd
        out = self._view[:n]
        while out:
            try:
                w = os.write(fd, out)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                # The filesystem took the flag but not the write: go on buffered.
                _disable_direct(fd)
                self.direct = False
                continue
            out = out[w:]
            if out and self.direct and w % ALIGN:
                _disable_direct(fd)
                self.direct = False

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]

"""Blob streams: read once, hashed and counted on the way, decompressed in bounded pieces.

A layer goes through three stages, all pull-based and in constant memory:

1. :class:`CheckedBlob` reads the raw blob (an HTTP body, a file, a slice of an archive) in
   pieces of at most :data:`CHUNK` bytes, hashing them with the descriptor's algorithm and
   refusing to read past the descriptor's size; :meth:`CheckedBlob.finish` checks size and
   digest once the blob has been read to its end (a docker-archive layer has no digest of
   its own: its diff_id is checked).
2. :func:`decompressed_chunks` recognises gzip, zstd or an uncompressed tar by its first bytes
   (media types are often wrong in the wild; the digests catch anything else) and yields the
   uncompressed bytes in pieces of at most :data:`CHUNK`, hashing them for the diff_id.
   Gzip streams of several members are read like Go's reader does; bytes after the last
   member that do not start another one are ignored, as umoci ignores them.
3. :class:`ByteReader` serves exact reads (tar headers), reads into a caller's buffer (file
   contents straight into an object writer) and skips.

zstd truncated mid-frame is not reported by the zstd library; such a layer ends early, which
the tar reader reports as truncated data (and the diff_id check would catch in any case).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol, cast

from .digests import Digest
from .errors import DigestError, LayerError

#: Largest piece read from a blob or produced by a decompressor.
CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class RawReader(Protocol):
    """Where a blob's bytes come from: ``read(n)`` gives up to ``n`` bytes, ``b""`` at the end."""

    def read(self, n: int, /) -> bytes: ...

    def close(self) -> None: ...


class FileSlice:
    """``length`` bytes of an open file from ``offset`` (a blob inside an archive or layout)."""

    def __init__(self, f: BinaryIO, offset: int, length: int) -> None:
        self._fd = f.fileno()
        self._pos = offset
        self._left = length

    def read(self, n: int) -> bytes:
        n = min(n, self._left)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._pos)
        self._pos += len(data)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._left = 0


class CheckedBlob:
    """A raw blob read through its digest and size (see the module doc)."""

    def __init__(
        self,
        src: RawReader,
        digest: Digest | None,
        size: int | None,
        what: str,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._src = src
        self.digest = digest
        self.size = size
        self.what = what
        self._hash = digest.hasher() if digest is not None else None
        self._progress = progress
        self.count = 0
        self.eof = False

    def read(self, n: int = CHUNK) -> bytes:
        if self.eof:
            return b""
        data = self._src.read(n)
        if not data:
            self.eof = True
            return b""
        self.count += len(data)
        if self.size is not None and self.count > self.size:
            raise DigestError(f"{self.what}: longer than the {self.size} bytes its descriptor says")
        if self._hash is not None:
            self._hash.update(data)
        if self._progress is not None:
            self._progress(len(data))
        return data

    def finish(self) -> None:
        """Read whatever is left, then check the size and the digest."""
        while self.read(CHUNK):
            pass
        if self.size is not None and self.count != self.size:
            raise DigestError(
                f"{self.what}: {self.count} bytes, but its descriptor says {self.size}"
            )
        if self._hash is None or self.digest is None:
            return
        actual = self._hash.hexdigest()
        if actual != self.digest.hex:
            raise DigestError(
                f"{self.what}: content hashes to {self.digest.algorithm}:{actual}, "
                f"not {self.digest}"
            )

    def close(self) -> None:
        self._src.close()


class _Prefixed:
    """A file-like view of ``head`` followed by the rest of ``blob`` (for the zstd reader)."""

    def __init__(self, head: bytes, blob: CheckedBlob) -> None:
        self._head = head
        self._blob = blob

    def read(self, n: int = -1) -> bytes:
        if self._head:
            data, self._head = self._head, b""
            return data
        return self._blob.read(CHUNK if n is None or n < 0 else min(n, CHUNK) or CHUNK)


def _gunzip(first: bytes, blob: CheckedBlob, what: str) -> Iterator[bytes]:
    pending = first
    while True:
        d = zlib.decompressobj(wbits=31)
        while not d.eof:
            if not pending:
                # The decompressor may still hold output for input it has consumed.
                out = _inflate(d, b"", what)
                if out:
                    yield out
                    continue
                pending = blob.read(CHUNK)
                if not pending:
                    raise LayerError(f"{what}: the gzip stream ends before its end marker")
            out = _inflate(d, pending, what)
            pending = d.unconsumed_tail
            if out:
                yield out
        pending = d.unused_data
        while len(pending) < len(GZIP_MAGIC):
            more = blob.read(CHUNK)
            if not more:
                break
            pending += more
        if not pending.startswith(GZIP_MAGIC):
            return  # the end, or trailing bytes that start no member (ignored, as umoci does)


def _inflate(d: zlib._Decompress, data: bytes, what: str) -> bytes:
    try:
        return d.decompress(data, CHUNK)
    except zlib.error as e:
        raise LayerError(f"{what}: corrupt gzip data ({e})") from None


def _unzstd(first: bytes, blob: CheckedBlob, what: str) -> Iterator[bytes]:
    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(
        cast(BinaryIO, _Prefixed(first, blob)),
        read_size=CHUNK,
        read_across_frames=True,
        closefd=False,
    )
    while True:
        try:
            out = reader.read(CHUNK)
        except zstandard.ZstdError as e:
            raise LayerError(f"{what}: corrupt zstd data ({e})") from None
        if not out:
            return
        yield out


def _plain(first: bytes, blob: CheckedBlob) -> Iterator[bytes]:
    if first:
        yield first
    while data := blob.read(CHUNK):
        yield data


class Decompressed:
    """The uncompressed bytes of a blob, in pieces, hashed for the diff_id on the way."""

    def __init__(self, blob: CheckedBlob, what: str) -> None:
        first = b""
        while len(first) < len(ZSTD_MAGIC):
            more = blob.read(CHUNK)
            if not more:
                break
            first += more
        self.compression = (
            "gzip"
            if first.startswith(GZIP_MAGIC)
            else "zstd"
            if first.startswith(ZSTD_MAGIC)
            else "none"
        )
        pieces: Iterator[bytes]
        if self.compression == "gzip":
            pieces = _gunzip(first, blob, what)
        elif self.compression == "zstd":
            pieces = _unzstd(first, blob, what)
        else:
            pieces = _plain(first, blob)
        self._pieces = pieces
        self._hash = hashlib.sha256()
        self.size = 0

    def __call__(self) -> bytes:
        """The next piece, ``b""`` at the end."""
        data = next(self._pieces, b"")
        if data:
            self._hash.update(data)
            self.size += len(data)
        return data

    def check_diff_id(self, expected: Digest | None, what: str) -> None:
        if expected is None:
            return
        h = self._hash.hexdigest() if expected.algorithm == "sha256" else None
        if h != expected.hex:
            raise DigestError(
                f"{what}: uncompressed content hashes to sha256:{h}, but the image config "
                f"gives the diff_id {expected}"
            )


class ByteReader:
    """Exact reads, reads into a buffer and skips over a source of byte pieces."""

    __slots__ = ("_buf", "_next", "_off", "pos")

    def __init__(self, next_piece: Callable[[], bytes]) -> None:
        self._next = next_piece
        self._buf = b""
        self._off = 0
        #: Bytes consumed so far.
        self.pos = 0

    def _fill(self) -> bool:
        while self._off >= len(self._buf):
            data = self._next()
            if not data:
                return False
            self._buf = data
            self._off = 0
        return True

    def read_exact(self, n: int) -> bytes | None:
        """``n`` bytes; ``None`` at a clean end (nothing left); raises if it ends inside."""
        if not self._fill():
            return None
        if self._off + n <= len(self._buf):
            data = self._buf[self._off : self._off + n]
            self._off += n
            self.pos += n
            return data
        parts = []
        need = n
        while need:
            if not self._fill():
                raise EOFError(f"{n - need} of {n} bytes")
            take = min(need, len(self._buf) - self._off)
            parts.append(self._buf[self._off : self._off + take])
            self._off += take
            need -= take
        self.pos += n
        return b"".join(parts)

    def readinto(self, out: memoryview) -> int:
        """Copy up to ``len(out)`` bytes into ``out``; 0 only at the end."""
        if not self._fill():
            return 0
        take = min(len(out), len(self._buf) - self._off)
        out[:take] = memoryview(self._buf)[self._off : self._off + take]
        self._off += take
        self.pos += take
        return take

    def skip(self, n: int) -> None:
        while n:
            if not self._fill():
                raise EOFError(f"{n} bytes short")
            take = min(n, len(self._buf) - self._off)
            self._off += take
            self.pos += take
            n -= take

    def drain(self) -> int:
        """Consume everything left; return how many bytes that was."""
        total = len(self._buf) - self._off
        self._buf, self._off = b"", 0
        while data := self._next():
            total += len(data)
        self.pos += total
        return total

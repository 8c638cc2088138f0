"""fs-verity SHA-256 digests (4096-byte Merkle blocks, no salt), computed in userspace.

The digest equals what ``FS_IOC_MEASURE_VERITY`` reports for a file with fs-verity enabled,
so objects can be named and verified on filesystems without fs-verity support.

Streaming: :class:`FsVerityHasher` keeps one pending partial block per tree level, so memory
is constant (a few KiB) whatever the input size.

Threads: each 4 KiB block is hashed in pieces shorter than hashlib's GIL-release threshold
(``HASHLIB_GIL_MINSIZE``, 2048 bytes in CPython), so hashing keeps the GIL. Hashing a block
takes a couple of microseconds; releasing and re-taking the GIL around each one made threads
that hash (store writers, fetch workers) hand the GIL to each other about once per block, a
futex round trip each time (measured in docs/benchmarks.md, "Repository fetching"). The
interpreter still switches threads at its normal interval. In a process with a single thread
there is nobody to hand the GIL to, and whole blocks are hashed in one call each (quicker).
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from typing import BinaryIO

BLOCK_SIZE = 4096
DIGEST_SIZE = 32
_HASHES_PER_BLOCK = BLOCK_SIZE // DIGEST_SIZE
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_READ_SIZE = 1 << 20
#: Longest piece hashlib hashes without releasing the GIL (its threshold is 2048 bytes).
_PIECE = 2047
#: Threads that sleep for good in a system call (a watcher): not counted as threads that
#: could want the GIL (see the module doc and :func:`register_idle_thread`).
_idle_threads = 0


def register_idle_thread() -> None:
    """Declare that one thread of this process only ever waits in a system call."""
    global _idle_threads
    _idle_threads += 1


def _block_hash(block: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of one block of at most ``BLOCK_SIZE`` bytes, keeping the GIL (see module doc)."""
    h = hashlib.sha256(block[:_PIECE])
    h.update(block[_PIECE : 2 * _PIECE])
    h.update(block[2 * _PIECE :])
    return h.digest()


class FsVerityHasher:
    """Incremental fs-verity SHA-256 digest. ``update()`` any number of times, then ``digest()``."""

    __slots__ = ("_buf", "_levels", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._buf = bytearray()  # partial data block (< BLOCK_SIZE bytes)
        # _levels[i]: concatenated hashes at tree level i not yet folded into a parent block.
        self._levels: list[bytearray] = []

    def update(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        n = len(mv)
        if not n:
            return
        self._size += n
        pos = 0
        if self._buf:
            take = min(BLOCK_SIZE - len(self._buf), n)
            self._buf += mv[:take]
            pos = take
            if len(self._buf) == BLOCK_SIZE:
                self._add_hash(0, _block_hash(self._buf))
                self._buf.clear()
        if n - pos >= BLOCK_SIZE:
            end = pos + (n - pos) // BLOCK_SIZE * BLOCK_SIZE
            levels = self._levels
            if not levels:
                levels.append(bytearray())
            hashes = levels[0]
            sha = hashlib.sha256
            # _block_hash and _fold inlined: this loop is the hot path of every store insertion.
            if threading.active_count() - _idle_threads > 1:
                while pos < end:
                    h = sha(mv[pos : pos + _PIECE])
                    h.update(mv[pos + _PIECE : pos + 2 * _PIECE])
                    h.update(mv[pos + 2 * _PIECE : pos + BLOCK_SIZE])
                    hashes += h.digest()
                    if len(hashes) == BLOCK_SIZE:
                        parent = _block_hash(hashes)
                        hashes.clear()
                        _fold(levels, 1, parent)
                    pos += BLOCK_SIZE
            else:  # no other thread to hand the GIL to: one call per block is quicker
                while pos < end:
                    hashes += sha(mv[pos : pos + BLOCK_SIZE]).digest()
                    if len(hashes) == BLOCK_SIZE:
                        parent = sha(hashes).digest()
                        hashes.clear()
                        _fold(levels, 1, parent)
                    pos += BLOCK_SIZE
        if pos < n:
            self._buf += mv[pos:]

    def _add_hash(self, level: int, h: bytes) -> None:
        _fold(self._levels, level, h)

    @property
    def size(self) -> int:
        return self._size

    def root_hash(self) -> bytes:
        if self._size == 0:
            return bytes(DIGEST_SIZE)
        # Work on copies so digest() can be called more than once.
        levels = [bytearray(lv) for lv in self._levels]
        pending: bytes | None = None
        if self._buf:
            pending = _block_hash(bytes(self._buf) + _ZERO_BLOCK[len(self._buf) :])
        if not levels and pending is not None:
            return pending  # file of at most one block
        if pending is not None:
            _fold(levels, 0, pending)
        # Fold every level upwards until a single block remains at the top.
        level = 0
        while True:
            top = level == len(levels) - 1
            lv = levels[level]
            if top and len(lv) == DIGEST_SIZE and level > 0:
                return bytes(lv)
            if top and len(lv) == DIGEST_SIZE and level == 0:
                # Exactly one data block hashed: that hash is the root.
                return bytes(lv)
            if lv:
                h = _block_hash(bytes(lv) + _ZERO_BLOCK[len(lv) :])
                lv.clear()
                _fold(levels, level + 1, h)
            level += 1

    def digest(self) -> bytes:
        desc = struct.pack(
            "<BBBBIQ64s32s144s",
            1,  # version
            1,  # FS_VERITY_HASH_ALG_SHA256
            12,  # log2(block size)
            0,  # salt size
            0,
            self._size,
            self.root_hash(),
            b"",
            b"",
        )
        return hashlib.sha256(desc).digest()

    def hexdigest(self) -> str:
        return self.digest().hex()


def _fold(levels: list[bytearray], level: int, h: bytes) -> None:
    while True:
        if level == len(levels):
            levels.append(bytearray())
        lv = levels[level]
        lv += h
        if len(lv) < BLOCK_SIZE:
            return
        h = _block_hash(lv)
        lv.clear()
        level += 1


def digest_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """fs-verity SHA-256 digest of an in-memory byte string."""
    h = FsVerityHasher()
    h.update(data)
    return h.digest()


def digest_stream(f: BinaryIO, chunk_size: int = _READ_SIZE) -> bytes:
    """fs-verity SHA-256 digest of everything readable from ``f`` (constant memory)."""
    h = FsVerityHasher()
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    readinto = getattr(f, "readinto", None)
    while True:
        if readinto is not None:
            n = readinto(buf)
            if not n:
                break
            h.update(view[:n])
        else:
            data = f.read(chunk_size)
            if not data:
                break
            h.update(data)
    return h.digest()


def digest_file(path: str | os.PathLike[str]) -> bytes:
    """fs-verity SHA-256 digest of a file's content."""
    with open(path, "rb", buffering=0) as f:
        return digest_stream(f)

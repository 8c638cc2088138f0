"""A response body kept in memory once: an image served as a ref's body.

The image must be read whole (it is validated, hashed and stored), so it is held, but only
once: :class:`BodyBuffer` appends each piece into private anonymous memory that grows in
place (``mremap``: no copy), and the reader (:class:`csi.image.reader.Image`), the hash and
the store all read that mapping itself. A server that sends more than the image limit is cut
off by the transfer before the buffer holds more than that.
"""

from __future__ import annotations

import mmap

_INITIAL = 1 << 20


class BodyBuffer:
    def __init__(self) -> None:
        self._mm: mmap.mmap | None = None
        self.size = 0

    def write(self, chunk: bytes) -> None:
        n = len(chunk)
        if not n:
            return
        if self._mm is None:
            self._mm = mmap.mmap(-1, max(_INITIAL, n), flags=mmap.MAP_PRIVATE)
        elif self.size + n > len(self._mm):
            self._mm.resize(max(2 * len(self._mm), self.size + n))
        self._mm[self.size : self.size + n] = chunk
        self.size += n

    def finish(self) -> mmap.mmap | None:
        """The body as a mapping of exactly its size (None if it was empty); the caller
        closes it. The buffer is empty afterwards."""
        mm, self._mm = self._mm, None
        if mm is not None and len(mm) != self.size:
            mm.resize(self.size)
        self.size = 0
        return mm

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None

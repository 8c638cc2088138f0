"""Sizes of images as users see them: logical bytes (sum of regular-file sizes) and inodes.

Used for NodeGetVolumeStats and CreateVolume's capacity. Read with the bounds-checking reader;
cached per digest (images are immutable).
"""

from __future__ import annotations

import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from csi.image.reader import Image


@dataclass(frozen=True, slots=True)
class ImageSize:
    bytes: int
    inodes: int

    def __add__(self, other: ImageSize) -> ImageSize:
        return ImageSize(self.bytes + other.bytes, self.inodes + other.inodes)


def measure(path: str | Path) -> ImageSize:
    """Walk the image at ``path``: every reachable inode once, sizes of regular files."""
    total = 0
    count = 0
    with Image.open(path) as img:
        for nid in img.inodes():
            count += 1
            a = img.getattr(nid)
            if stat.S_ISREG(a.mode):
                total += a.size
    return ImageSize(total, count)


class SizeCache:
    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._sizes: dict[bytes, ImageSize] = {}

    def get(self, digest: bytes, path: Path) -> ImageSize:
        with self._mu:
            hit = self._sizes.get(digest)
        if hit is not None:
            return hit
        size = measure(path)
        with self._mu:
            self._sizes[digest] = size
        return size

    def total(self, images: Iterable[tuple[bytes, Path]]) -> ImageSize:
        """Sum over layers (an upper bound for a composition whose layers shadow files)."""
        out = ImageSize(0, 0)
        for d, p in images:
            out = out + self.get(d, p)
        return out

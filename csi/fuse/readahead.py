"""Reading ahead across files: the next files of a directory whose files are read in turn.

A reader that goes through a directory file by file (``cat *``, ``tar c``, a model loader, a
language runtime importing a package) sends the daemon one READ per small file, and each one
waits for the disk before the next is asked for. The kernel reads ahead within a file, never
across files. When a file is read from its start and it is the first file of its directory's
listing, or the one listed right after the file read from its start before it, the objects of
the next :attr:`SiblingReadahead.depth` small files of that listing are handed to the page
cache to read (``posix_fadvise(WILLNEED)``) and their descriptors kept: by the time the reader
asks, the data is cached and the descriptor open. A read of one file among many (a config file
in a big directory) starts nothing.

The listings come from the readdir replies the daemon sends (in cookie order, as readers see
them); at most :attr:`SiblingReadahead.max_dirs` directories are remembered (least recently
used first to go), each up to :data:`MAX_LISTED` entries. Only the trio thread uses this.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

#: Entries of one directory remembered (a larger listing is remembered up to here).
MAX_LISTED = 1 << 16

#: A directory: (view slot, directory inode).
DirKey = tuple[int, int]


@dataclass(slots=True)
class _Listing:
    #: Inode of each entry in listing order; 0 for entries that are not small regular files.
    inos: list[int] = field(default_factory=list)
    #: Index of the last file read from its start, and how far read-ahead has been started.
    last: int = -2
    ahead: int = 0


class SiblingReadahead:
    """Which files to read ahead; ``depth`` 0 turns it off."""

    def __init__(self, depth: int = 16, max_dirs: int = 256, max_size: int = 1 << 20) -> None:
        self.depth = max(0, depth)
        self.max_dirs = max(1, max_dirs)
        #: Largest file read ahead (larger ones keep a transfer busy on their own, and the
        #: kernel reads ahead within them).
        self.max_size = max_size
        self._dirs: OrderedDict[DirKey, _Listing] = OrderedDict()
        #: (view slot, file inode) -> (its directory, its index in the listing).
        self._where: dict[tuple[int, int], tuple[DirKey, int]] = {}

    def __len__(self) -> int:
        return len(self._dirs)

    def listed(self, slot: int, dir_ino: int, index: int, ino: int, mode: int, size: int) -> None:
        """Entry ``index`` of a readdir reply for directory ``dir_ino`` of view ``slot``
        (``mode`` and ``size`` from its attributes). Entries must come in order from 0; a
        reply that starts elsewhere is remembered only if it continues what was seen."""
        if not self.depth:
            return
        key = (slot, dir_ino)
        listing = self._dirs.get(key)
        if listing is None:
            if index != 0:
                return
            listing = self._dirs[key] = _Listing()
            while len(self._dirs) > self.max_dirs:
                self._forget(*self._dirs.popitem(last=False))
        else:
            self._dirs.move_to_end(key)
        if index != len(listing.inos) or index >= MAX_LISTED:
            return
        small_file = mode & 0o170000 == 0o100000 and 0 < size <= self.max_size
        listing.inos.append(ino if small_file else 0)
        if small_file:
            self._where[(slot, ino)] = (key, index)

    def _forget(self, key: DirKey, listing: _Listing) -> None:
        for ino in listing.inos:
            if ino and self._where.get((key[0], ino), (None,))[0] == key:
                del self._where[(key[0], ino)]

    def forget_view(self, slot: int) -> None:
        """Drop everything remembered of a view that went away."""
        for key in [k for k in self._dirs if k[0] == slot]:
            self._forget(key, self._dirs.pop(key))

    def on_read_start(self, slot: int, ino: int) -> list[int]:
        """A read from the start of file ``ino``: the inodes to read ahead now (maybe none)."""
        found = self._where.get((slot, ino))
        if found is None:
            return []
        key, index = found
        listing = self._dirs.get(key)
        if listing is None:
            return []
        in_turn = index == 0 or index == listing.last + 1
        listing.last = index
        if not in_turn:
            return []
        # Keep ``depth`` files ahead of the reader, topping up once half of them are read.
        start = max(index + 1, listing.ahead)
        if start - index > self.depth // 2 + 1:
            return []
        end = min(index + 1 + self.depth, len(listing.inos))
        listing.ahead = max(listing.ahead, end)
        return [i for i in listing.inos[start:end] if i]

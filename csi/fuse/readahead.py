"""Reading ahead across files: the next files of a directory whose files are read in turn.

A reader that goes through a directory file by file (``cat *``, ``tar c``, a model loader, a
language runtime importing a package) sends the daemon one READ per small file, and each one
waits for the disk and a round trip through the daemon before the next is asked for. The
kernel reads ahead within a file, never across files. When a file is read from its start and
it is the first file of its directory's listing, the one listed right after the last file
read from its start, or one of the files already read ahead, the next small files of that
listing are read ahead: stored into the page cache of their FUSE inodes
(:mod:`csi.fuse.pagepush`), so that the reader finds them there and sends no request at all,
or where the kernel cannot do that, their objects handed to the page cache
(``posix_fadvise(WILLNEED)``). The first read-ahead of a pass covers a quarter of
:attr:`SiblingReadahead.depth` files, and each next one twice the last, up to ``depth``: a
reader that stops early costs little. A read of one file among many (a config file in a big
directory) starts nothing.

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
    #: How many files the last read-ahead covered (grows while the reader keeps in turn).
    window: int = 0


class SiblingReadahead:
    """Which files to read ahead; ``depth`` 0 turns it off."""

    def __init__(self, depth: int = 64, max_dirs: int = 256, max_size: int = 1 << 20) -> None:
        self.depth = max(0, depth)
        #: The first read-ahead of a pass covers this many files; each next one twice the
        #: last, up to ``depth`` (a reader that stops early costs little).
        self.first_window = max(1, self.depth // 4)
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
        if index <= listing.last:
            # Read again from further back: a new pass (what was read ahead for the last one
            # may have left the cache since).
            listing.ahead = listing.window = 0
        # In turn: the first file, the one after the last read, or any up to the first file
        # not yet read ahead (files read ahead into the page cache send no READ at all).
        in_turn = index == 0 or listing.last < index <= max(listing.last + 1, listing.ahead)
        listing.last = index
        if not in_turn:
            return []
        # Keep a window of files ahead of the reader, topping up once half of it is read;
        # the window doubles each time, from a quarter of ``depth`` up to ``depth``.
        start = max(index + 1, listing.ahead)
        if start - index > listing.window // 2 + 1:
            return []
        listing.window = min(self.depth, max(self.first_window, listing.window * 2))
        end = min(index + 1 + listing.window, len(listing.inos))
        listing.ahead = max(listing.ahead, end)
        return [i for i in listing.inos[start:end] if i]

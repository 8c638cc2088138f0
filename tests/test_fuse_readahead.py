"""Reading ahead across files (csi/fuse/readahead.py): when a directory's files are read in
turn, the data plane has the next small files' objects read into the page cache before they
are asked for; a read of one file among many starts nothing.

The rules are checked on :class:`SiblingReadahead` alone; the effect through a real FUSE mount
of the data plane, by asking the page cache of each object file whether it holds the object
(mincore(2)).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import threading
import time
from pathlib import Path

import pytest

from csi.fuse.fs import kernel_opens_supported
from csi.fuse.readahead import SiblingReadahead
from csi.image.fsverity import digest_bytes
from csi.image.tree import S_IFDIR, S_IFREG, Node, Tree, object_path
from tests.fuse_helpers import (
    add_image,
    external,
    free_port,
    fuse_unavailable,
    metric_values,
    run_daemon,
)

REG = S_IFREG | 0o644
DIR = S_IFDIR | 0o755


def listing(ra: SiblingReadahead, entries: list[tuple[int, int, int]], slot: int = 1) -> None:
    for i, (ino, mode, size) in enumerate(entries):
        ra.listed(slot, 100, i, ino, mode, size)


def test_the_window_grows_while_the_reader_keeps_in_turn() -> None:
    ra = SiblingReadahead(depth=8)  # first window: a quarter of 8
    listing(ra, [(10 + i, REG, 1000) for i in range(12)])
    # Every read reaches the daemon (read ahead into the object files only).
    assert ra.on_read_start(1, 10) == [11, 12]  # the first file: the first window
    assert ra.on_read_start(1, 11) == [13, 14, 15]  # topped up once half is read; doubled
    assert ra.on_read_start(1, 12) == []  # still 3 ahead
    assert ra.on_read_start(1, 13) == [16, 17, 18, 19, 20, 21]  # doubled again (to the end)
    assert [ra.on_read_start(1, i) for i in range(14, 22)] == [[]] * 8


def test_files_stored_in_the_page_cache_send_no_read_and_do_not_stop_it() -> None:
    ra = SiblingReadahead(depth=8)
    listing(ra, [(10 + i, REG, 1000) for i in range(30)])
    assert ra.on_read_start(1, 10) == [11, 12]
    # 11 and 12 were read from the page cache: the next read the daemon sees is 13's.
    assert ra.on_read_start(1, 13) == [14, 15, 16, 17]
    assert ra.on_read_start(1, 18) == list(range(19, 27))  # up to depth, no further
    # The reader got ahead of the read-ahead (20 is read before it was stored): still in
    # turn; 8 files are already ahead of it, so nothing more yet.
    assert ra.on_read_start(1, 20) == []
    assert ra.on_read_start(1, 27) == list(range(28, 36))
    assert ra.on_read_start(1, 36) == [37, 38, 39]  # the listing ends at 39
    # A file after a gap that was not read ahead is out of turn.
    ra2 = SiblingReadahead(depth=8)
    listing(ra2, [(10 + i, REG, 1000) for i in range(30)])
    assert ra2.on_read_start(1, 10) == [11, 12]
    assert ra2.on_read_start(1, 14) == []  # 13 was neither read nor read ahead


def test_reading_the_directory_again_starts_a_new_pass() -> None:
    ra = SiblingReadahead(depth=8)
    listing(ra, [(10 + i, REG, 1000) for i in range(12)])
    assert ra.on_read_start(1, 10) == [11, 12]
    assert ra.on_read_start(1, 13) == [14, 15, 16, 17]
    # The same reader again, later (the cache may have been dropped in between).
    assert ra.on_read_start(1, 10) == [11, 12]
    assert ra.on_read_start(1, 13) == [14, 15, 16, 17]


def test_a_file_read_out_of_turn_starts_nothing() -> None:
    ra = SiblingReadahead(depth=16)
    listing(ra, [(10 + i, REG, 1000) for i in range(12)])
    assert ra.on_read_start(1, 15) == []  # one file in the middle (a config file)
    assert ra.on_read_start(1, 13) == []  # not the one before it
    assert ra.on_read_start(1, 14) == [15, 16, 17, 18]  # ... but the one after the last read is
    assert ra.on_read_start(1, 999) == []  # never listed
    assert ra.on_read_start(2, 10) == []  # another view's inode of the same number


def test_only_small_regular_files_are_read_ahead() -> None:
    ra = SiblingReadahead(depth=32, max_size=4096)
    entries = [(1, REG, 100), (2, DIR, 0), (3, REG, 1 << 20), (4, REG, 0), (5, REG, 4096)]
    listing(ra, entries)
    assert ra.on_read_start(1, 1) == [5]


def test_listings_out_of_order_or_past_the_limit_are_not_remembered() -> None:
    ra = SiblingReadahead(depth=8, max_dirs=2)
    ra.listed(1, 100, 3, 13, REG, 10)  # a reply that does not start at 0: nothing known
    assert ra.on_read_start(1, 13) == [] and len(ra) == 0
    for d in (100, 200, 300):  # three directories listed, two remembered
        for i in range(3):
            ra.listed(1, d, i, d + i, REG, 10)
    assert len(ra) == 2
    assert ra.on_read_start(1, 100) == []  # the least recently listed one was forgotten
    assert ra.on_read_start(1, 300) == [301, 302]
    ra.forget_view(1)
    assert len(ra) == 0 and ra.on_read_start(1, 200) == []
    off = SiblingReadahead(depth=0)
    off.listed(1, 100, 0, 1, REG, 10)
    off.listed(1, 100, 1, 2, REG, 10)
    assert off.on_read_start(1, 1) == [] and len(off) == 0


# -- through the data plane ---------------------------------------------------------------------


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def cached(path: Path) -> bool:
    """Whether the page cache holds every page of ``path`` (mincore(2) of a mapping, which
    reads nothing: a probing read would itself start the kernel's read-ahead)."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return all(v & 1 for v in vec)
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture()
def store_with_dir(tmp_path: Path) -> tuple[Path, bytes, list[Path], list[bytes]]:
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    if not kernel_opens_supported():
        pytest.skip("stock pyfuse3 (without the inode_as_fh patch): no read-ahead across files")
    rnd = random.Random(5)
    tree = Tree(Node(mode=DIR))
    sub = Node(mode=DIR)
    tree.root.add(b"d", sub)
    blobs = []
    for i in range(40):
        node, data = external(rnd.randbytes(20_000))
        sub.add(b"f%02d" % i, node)
        blobs.append(data)
    store = tmp_path / "store"
    digest = add_image(store, tree, blobs)
    objects = []
    for data in blobs:
        objects.append(store / "objects" / object_path(digest_bytes(data)).decode())
    return store, digest, objects, blobs


def wait_cached(paths: list[Path], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not all(cached(p) for p in paths):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def reads(port: int) -> float:
    return metric_values(port, "composefs_csi_fuse_operations_total").get('op="read"', 0.0)


@pytest.mark.parametrize("depth", [16, 0])
def test_the_next_files_are_in_the_page_cache_before_they_are_read(
    store_with_dir: tuple[Path, bytes, list[Path], list[bytes]], depth: int
) -> None:
    store, digest, objects, blobs = store_with_dir
    port = free_port()
    with run_daemon(store, readahead_files=depth, metrics_address=f"127.0.0.1:{port}") as d:
        view = d.view_path([digest])
        files = [view / "d" / f"f{i:02d}" for i in range(40)]
        assert sorted(os.listdir(view / "d"))[:2] == ["f00", "f01"]  # the listing, as read
        for p in objects:
            evict(p)
        assert not any(cached(p) for p in files + objects)
        # One file in the middle of the directory, as a pod reading one config file would:
        # nothing else is read.
        assert files[20].read_bytes() == blobs[20]
        time.sleep(0.2)
        assert [i for i, p in enumerate(files) if cached(p)] == [20]
        assert [i for i, p in enumerate(objects) if cached(p)] == [20]
        # The first file of the listing: the next 4 (a quarter of 16) are stored in the
        # page cache of their own inodes, and no more.
        assert files[0].read_bytes() == blobs[0]
        if not depth:
            time.sleep(0.2)
            assert [i for i, p in enumerate(files) if cached(p)] == [0, 20]
            before = reads(port)
            for i in range(1, 40):
                assert files[i].read_bytes() == blobs[i]
            assert reads(port) - before == 38  # one READ per file not yet cached (not 20)
            return
        assert wait_cached(files[1:5])
        assert not any(cached(p) for p in files[5:20] + files[21:])
        # Read from there, they cost the data plane no request, and hold the right bytes.
        before = reads(port)
        for i in range(1, 5):
            assert files[i].read_bytes() == blobs[i]
        assert reads(port) == before
        # Reading on in turn keeps the read-ahead going, in growing steps, to the end of the
        # directory; most files are never asked for.
        for i in range(5, 40):
            assert files[i].read_bytes() == blobs[i]
        assert reads(port) - before <= 8, reads(port) - before
        stored = metric_values(port, "composefs_csi_fuse_readahead_stored_bytes_total")
        assert stored[""] >= 30 * 20_000


def test_readers_racing_the_read_ahead_get_the_right_bytes(
    store_with_dir: tuple[Path, bytes, list[Path], list[bytes]],
) -> None:
    """Several readers go through the directory at once, forwards and backwards, while the
    read-ahead stores the same files into the page cache: every read returns the file's own
    bytes, nothing hangs, and the daemon stops cleanly afterwards."""
    store, digest, objects, blobs = store_with_dir
    with run_daemon(store, readahead_files=64) as d:
        view = d.view_path([digest])
        files = [view / "d" / f"f{i:02d}" for i in range(40)]
        os.listdir(view / "d")
        errors: list[str] = []

        def reader(order: list[int]) -> None:
            for i in order:
                data = files[i].read_bytes()
                if data != blobs[i]:
                    errors.append(f"f{i:02d}: {len(data)} bytes, not its own")

        for _ in range(5):
            for p in objects:
                evict(p)
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")  # the FUSE files' pages too
            forwards = list(range(40))
            threads = [
                threading.Thread(target=reader, args=(order,))
                for order in (forwards, forwards, forwards[::-1], forwards[1::2] + forwards[::2])
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
                assert not t.is_alive(), "a reader hung"
        assert errors == []
    assert d.proc.returncode == 0, d.log.read_text()[-2000:]

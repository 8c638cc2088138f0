"""The page-cache read-ahead's threads (csi/fuse/pagepush.py) on their own, with a recording
stand-in for pyfuse3.notify_store: what is stored, what is skipped, and how it stops.
Through a real FUSE mount it is tested in test_fuse_readahead.py and test_fuse_lazy.py."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

from csi.fuse.pagepush import MAX_QUEUED, PagePusher


class Recorder:
    """Stands in for ``pyfuse3.notify_store``: records stores, raises what it is told to."""

    def __init__(self, fail: dict[int, int] | None = None) -> None:
        self.stored: list[tuple[int, int, bytes]] = []
        self.fail = fail or {}
        self.calls = 0
        self.done = threading.Condition()

    def __call__(self, ino: int, offset: int, data: bytes) -> None:
        with self.done:
            self.calls += 1
            self.done.notify_all()
            if ino in self.fail:
                raise OSError(self.fail[ino], "notify_store")
            self.stored.append((ino, offset, data))

    def wait_calls(self, n: int) -> None:
        with self.done:
            assert self.done.wait_for(lambda: self.calls >= n, timeout=10), self.calls


def objects(tmp_path: Path, n: int) -> list[tuple[Path, bytes]]:
    out = []
    for i in range(n):
        p = tmp_path / f"obj{i}"
        data = bytes([i]) * (1000 + i)
        p.write_bytes(data)
        out.append((p, data))
    return out


def test_whole_files_are_stored_and_the_rest_skipped(tmp_path: Path) -> None:
    objs = objects(tmp_path, 4)
    rec = Recorder(fail={13: errno.ENOENT})  # the kernel no longer holds inode 13
    pusher = PagePusher(rec, threads=1)
    items = [(10 + i, p, len(d)) for i, (p, d) in enumerate(objs)]
    items[1] = (11, objs[1][0], len(objs[1][1]) + 5)  # not the size the image records
    items.append((14, tmp_path / "missing", 10))  # not in the store (a lazy view)
    assert pusher.push(items)
    rec.wait_calls(3)  # 10, 12, 13: the short one and the missing one are never stored
    pusher.stop()
    assert rec.stored == [(10, 0, objs[0][1]), (12, 0, objs[2][1])]
    assert pusher.enabled is False and not pusher.push(items[:1])  # stopped


def test_a_kernel_without_notify_store_turns_it_off(tmp_path: Path) -> None:
    objs = objects(tmp_path, 3)
    rec = Recorder(fail={10: errno.ENOSYS})
    pusher = PagePusher(rec, threads=1)
    assert pusher.push([(10 + i, p, len(d)) for i, (p, d) in enumerate(objs)])
    rec.wait_calls(1)
    deadline = time.monotonic() + 10
    while pusher.enabled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pusher.enabled
    # The caller is told, so it reads ahead into the object files instead.
    assert not pusher.push([(20, objs[0][0], len(objs[0][1]))])
    pusher.stop()
    assert rec.calls == 1 and rec.stored == []


def test_a_reader_that_outruns_the_threads_gets_no_more_queued(tmp_path: Path) -> None:
    ((p, data),) = objects(tmp_path, 1)
    gate = threading.Event()

    def blocked(ino: int, offset: int, data: bytes) -> None:
        gate.wait(10)

    pusher = PagePusher(blocked, threads=1)
    # The thread takes at most the read-ahead advice and one file before it blocks, so at
    # least MAX_QUEUED // 2 + 1 files stay queued: another batch as big does not fit.
    batch = [(i, p, len(data)) for i in range(MAX_QUEUED // 2 + 2)]
    assert pusher.push(batch)
    assert not pusher.push(batch)  # would pass the bound: refused, nothing queued
    gate.set()
    pusher.stop()
    assert pusher._jobs.qsize() == 0

"""Group commit in the store: concurrent writers share one sync, nothing is named before its
bytes are durable, a failed sync names nothing, and a kill -9 during a flush leaves nothing
partial. Also the per-digest cross-process locks (OFD range locks)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from csi.image.fsverity import digest_bytes
from csi.repo import batch as batch_mod
from csi.repo.batch import GroupCommit, make_durable, writeback_error
from csi.repo.tmpfiles import LOCKS_DIR, TempArea
from csi.store import Store, StoreFull

from ._storekit import blob, files_under, temp_files, writing

REPO_ROOT = Path(__file__).resolve().parent.parent


def wait_until(cond: Callable[[], bool]) -> None:
    """Poll ``cond`` (no time limit of its own: pytest's timeout bounds a hang)."""
    while not cond():
        time.sleep(0.001)


# -- GroupCommit ----------------------------------------------------------------------------


def test_group_commit_waiters_share_the_next_flush() -> None:
    release = threading.Event()
    groups: list[list[int]] = []

    def flush(items: list[int]) -> list[BaseException | None]:
        groups.append(list(items))
        if len(groups) == 1:
            release.wait()
        return [ValueError(i) if i == 5 else None for i in items]

    gc: GroupCommit[int] = GroupCommit(flush)
    errors: dict[int, BaseException] = {}

    def submit(i: int) -> None:
        try:
            gc.submit(i)
        except ValueError as e:
            errors[i] = e

    first = threading.Thread(target=submit, args=(0,))
    first.start()
    wait_until(lambda: len(groups) == 1)  # item 0's flush is running (and blocked)
    others = [threading.Thread(target=submit, args=(i,)) for i in range(1, 10)]
    for t in others:
        t.start()
    wait_until(lambda: gc.waiting == 9)
    release.set()
    for t in [first, *others]:
        t.join()
    assert groups[0] == [0]
    assert sorted(groups[1]) == list(range(1, 10))  # everyone waiting shared one flush
    assert len(groups) == 2 and gc.flushes == 2 and gc.items == 10
    assert list(errors) == [5]  # each item gets its own outcome


def test_submit_all_flushes_a_batch_together_among_single_submitters() -> None:
    """Batches (several items submitted at once) and single items share flushes; a batch is
    never split across flushes, every item is flushed once, outcomes come back per item."""
    mu = threading.Lock()
    groups: list[list[int]] = []

    def flush(items: list[int]) -> list[BaseException | None]:
        with mu:
            groups.append(list(items))
        time.sleep(0.002)
        return [ValueError(i) if i % 7 == 0 else None for i in items]

    gc: GroupCommit[int] = GroupCommit(flush)
    batch_out: dict[int, list[BaseException | None]] = {}

    def batch(k: int) -> None:
        batch_out[k] = gc.submit_all([1000 * k + j for j in range(1, 9)])

    def single(i: int) -> None:
        with contextlib.suppress(ValueError):
            gc.submit(i)

    threads = [threading.Thread(target=batch, args=(k,)) for k in range(1, 6)]
    threads += [threading.Thread(target=single, args=(i,)) for i in range(1, 30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flushed = [i for g in groups for i in g]
    assert sorted(flushed) == sorted(set(flushed))  # each item once
    assert set(flushed) == set(range(1, 30)) | {
        1000 * k + j for k in range(1, 6) for j in range(1, 9)
    }
    for k in range(1, 6):
        members = {1000 * k + j for j in range(1, 9)}
        assert sum(1 for g in groups if members & set(g)) == 1  # one flush for the batch
        outs = batch_out[k]
        assert [type(o) if o else None for o in outs] == [
            ValueError if (1000 * k + j) % 7 == 0 else None for j in range(1, 9)
        ]
    assert gc.submit_all([]) == []


def test_group_commit_flush_exception_fails_the_whole_group() -> None:
    def flush(items: list[int]) -> list[BaseException | None]:
        raise OSError(errno.EIO, "boom")

    gc: GroupCommit[int] = GroupCommit(flush)
    with pytest.raises(OSError, match="boom"):
        gc.submit(1)
    # the committer is usable afterwards
    gc2: GroupCommit[int] = GroupCommit(lambda items: [None] * len(items))
    gc2.submit(2)
    assert gc2.flushes == 1


def test_writeback_error_is_none_for_a_healthy_file(tmp_path: Path) -> None:
    area = TempArea(tmp_path / ".tmp")
    t = area.create()
    os.write(t.fd, b"x" * 10000)
    assert writeback_error(t.lock_fd) is None
    assert make_durable(tmp_path, [t]) == [None]
    t.discard()
    bad = writeback_error(1_000_000)  # not an open descriptor
    assert bad is not None and bad.errno == errno.EBADF


# -- the store ------------------------------------------------------------------------------


def test_concurrent_writers_share_syncs_and_names_appear_only_after_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "s")
    real_syncfs = batch_mod.syncfs
    release = threading.Event()
    seen_named: list[list[str]] = []

    def syncfs(path: Path) -> None:
        seen_named.append(files_under(store.root / "objects"))
        if len(seen_named) == 1:
            release.wait()
        real_syncfs(path)

    monkeypatch.setattr(batch_mod, "syncfs", syncfs)
    contents = [blob(f"g{i}", 5000 + i) for i in range(12)]
    results: list[bool] = []

    def put(i: int) -> None:
        results.append(store.ensure(digest_bytes(contents[i]), writing(contents[i])))

    first = threading.Thread(target=put, args=(0,))
    first.start()
    wait_until(lambda: len(seen_named) == 1)
    rest = [threading.Thread(target=put, args=(i,)) for i in range(1, 12)]
    for t in rest:
        t.start()
    wait_until(lambda: store._group.waiting == 11)
    release.set()
    for t in [first, *rest]:
        t.join()
    assert results == [True] * 12
    assert len(seen_named) == 2  # 12 objects, 2 syncs
    # nothing named before the first sync; only the first object before the second one
    assert seen_named[0] == [] and len(seen_named[1]) == 1
    assert store.usage().files == 12
    for c in contents:
        assert store.object_path(digest_bytes(c)).read_bytes() == c
    assert temp_files(store.root) == []
    store.close()


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_failed_sync_names_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    store = Store(tmp_path / "s")
    calls = []

    def syncfs(path: Path) -> None:
        calls.append(path)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(batch_mod, "syncfs", syncfs)
    data = blob("nosync", 20000)
    d = digest_bytes(data)
    expected = StoreFull if err == errno.ENOSPC else OSError
    with pytest.raises(expected) as ei:
        store.ensure(d, writing(data), size_hint=len(data))
    if err == errno.EIO:
        assert ei.value.errno == errno.EIO  # type: ignore[attr-defined]
    assert len(calls) == 1  # on ENOSPC, GC ran and freed nothing: no retry
    assert not store.has_object(d)
    assert files_under(store.root / "objects") == []
    assert temp_files(store.root) == []
    assert store.usage().files == 0
    monkeypatch.undo()
    assert store.ensure(d, writing(data)) is True  # the store still works
    assert store.fsck().ok
    store.close()


def test_writeback_error_of_one_file_fails_only_that_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "s")
    victim = blob("victim", 7000)
    real = batch_mod.writeback_error

    def writeback_error(fd: int, name: str = "") -> OSError | None:
        if os.pread(fd, len(victim), 0) == victim:
            return OSError(errno.EIO, "simulated lost write", name)
        return real(fd, name)

    monkeypatch.setattr(batch_mod, "writeback_error", writeback_error)
    contents = [blob(f"ok{i}", 3000 + i) for i in range(6)] + [victim]
    outcome: dict[bytes, object] = {}

    def put(c: bytes) -> None:
        try:
            outcome[c] = store.ensure(digest_bytes(c), writing(c))
        except OSError as e:
            outcome[c] = e

    threads = [threading.Thread(target=put, args=(c,)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(outcome[victim], OSError)
    assert not store.has_object(digest_bytes(victim))
    assert all(outcome[c] is True for c in contents[:-1])
    assert store.usage().files == 6 and temp_files(store.root) == []
    store.close()


def test_without_fsync_groups_still_record_everything(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", fsync=False)
    contents = [blob(f"nf{i}", 100 + i) for i in range(40)]
    threads = [
        threading.Thread(target=lambda c=c: store.ensure(digest_bytes(c), writing(c)))
        for c in contents
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    u = store.usage()
    assert u.files == 40 and u.bytes == sum(len(c) for c in contents)
    store.close()


# -- kill -9 during a flush -----------------------------------------------------------------

KILLED_DURING_FLUSH = textwrap.dedent(
    """
    import sys, threading, time
    from pathlib import Path
    from csi.repo import batch
    from csi.store import Store, db
    from csi.image.fsverity import digest_bytes
    from tests._storekit import blob, writing

    where = sys.argv[2]
    store = Store(Path(sys.argv[1]))
    real_syncfs = batch.syncfs
    real_record = db.StateDB.record_objects

    def block():
        print("blocked", flush=True)
        while True:
            time.sleep(3600)

    def syncfs(path):
        if where == "sync":
            block()
        real_syncfs(path)

    def record_objects(self, cur, rows):
        rows = list(rows)
        if where == "record":
            block()
        real_record(self, cur, rows)

    batch.syncfs = syncfs
    db.StateDB.record_objects = record_objects
    contents = [blob(f"k{i}", 50000 + i) for i in range(8)]
    for c in contents:
        threading.Thread(target=store.ensure, args=(digest_bytes(c), writing(c))).start()
    """
)


@pytest.mark.parametrize("where", ["sync", "record"])
def test_kill9_during_flush(tmp_path: Path, where: str) -> None:
    root = tmp_path / "store"
    Store(root).close()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_DURING_FLUSH, str(root), where],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "blocked"
        assert temp_files(root) != [] or where == "record"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    contents = [blob(f"k{i}", 50000 + i) for i in range(8)]
    named = files_under(root / "objects")
    if where == "sync":
        assert named == []  # nothing is named before its sync completes
    with Store(root) as s:
        assert temp_files(root) == []
        # whatever was renamed had been synced and verified: recovery records it
        assert s.recovery.recorded_unknown == len(named)
        assert s.usage().files == len(named)
        assert s.fsck().ok
        for c in contents:  # and the rest can be stored now (no stale per-digest lock)
            s.ensure(digest_bytes(c), writing(c))
        assert s.usage().files == 8


# -- per-digest locks -----------------------------------------------------------------------


def _probe(path: Path, off: int) -> bool:
    """True if the byte at ``off`` of ``path`` is free (non-blocking OFD lock attempt)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, off, 1, 0))
    except OSError as e:
        assert e.errno in (errno.EAGAIN, errno.EACCES)
        return False
    finally:
        os.close(fd)
    return True


def test_key_locks_exclude_threads_not_other_keys(tmp_path: Path) -> None:
    area = TempArea(tmp_path / ".tmp")
    locks = area.key_locks
    a, b = digest_bytes(b"a"), digest_bytes(b"b")
    order: list[str] = []
    entered = threading.Event()
    with locks.hold(a):
        assert not _probe(locks.path_for(a), locks.offset(a))
        with locks.hold(b):  # another key does not wait
            pass

        def other() -> None:
            entered.set()
            with locks.hold(a):
                order.append("other")

        t = threading.Thread(target=other)
        t.start()
        entered.wait()
        order.append("first")
    t.join()
    assert order == ["first", "other"]
    assert _probe(locks.path_for(a), locks.offset(a))
    # the lock file is permanent: the cleaner of dead writers' files leaves it alone
    assert area.clean() == 0
    assert locks.path_for(a).exists() and locks.path_for(a).parent.name == LOCKS_DIR
    locks.close()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from csi.repo.tmpfiles import TempArea

    area = TempArea(Path(sys.argv[1]))
    with area.key_locks.hold(bytes.fromhex(sys.argv[2])):
        print("held", flush=True)
        while True:
            time.sleep(3600)
    """
)


def test_key_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    key = digest_bytes(b"k")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / ".tmp"), key.hex()],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    area = TempArea(tmp_path / ".tmp")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        assert not _probe(area.key_locks.path_for(key), area.key_locks.offset(key))
        assert area.clean() == 0  # a live process's lock file is kept
    finally:
        proc.kill()
        proc.wait()
    assert _probe(area.key_locks.path_for(key), area.key_locks.offset(key))
    with area.key_locks.hold(key):
        pass


def test_key_locks_are_spread_over_files_the_cleaner_keeps(tmp_path: Path) -> None:
    area = TempArea(tmp_path / ".tmp")
    keys = [digest_bytes(bytes([i])) for i in range(64)]
    fds, got = area.key_locks.try_hold_many(keys)
    try:
        assert got == keys
        files = {area.key_locks.path_for(k) for k in keys}
        assert len(files) > 1 and all(p.exists() for p in files)
        for k in keys:  # held, each in its own file
            assert not _probe(area.key_locks.path_for(k), area.key_locks.offset(k))
        assert area.clean() == 0 and all(p.exists() for p in files)
    finally:
        area.key_locks.release_many(fds)
    assert all(_probe(area.key_locks.path_for(k), area.key_locks.offset(k)) for k in keys)
    area.key_locks.close()

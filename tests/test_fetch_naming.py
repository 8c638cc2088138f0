"""How a worker process names the objects it fetched (csi.fetch.naming.name_written), and how
the parent records them (Store.record_named): durable before named, nothing half-done left
behind when the sync, the rename or the rows fail. Run in this process on a real store; the
worker-process path itself is covered end to end by tests/test_fetch_bulk.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from csi.fetch import naming, workertemp
from csi.image.fsverity import digest_bytes
from csi.repo import batch
from csi.repo.tmpfiles import WORKER_TEMP_SUFFIX
from csi.store import Store


def _written(store: Store, data: bytes) -> naming.Written:
    """A temp file as a worker leaves it: written and verified, not named."""
    obj = workertemp.TempObject(
        str(store.repo.tmp.path), store.repo.tmp.owner(), digest_bytes(data)
    )
    obj.write(data)
    obj.keep()
    return obj.kept()


def _temps(store: Store) -> list[str]:
    return [n for n in os.listdir(store.repo.tmp.path) if n.endswith(WORKER_TEMP_SUFFIX)]


def test_objects_are_named_only_after_the_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "s")
    blobs = [os.urandom(5000 + i) for i in range(3)]
    written = [_written(store, b) for b in blobs]
    failed = naming.Failed(b"\x07" * 32, "NotFound", "gone", None, 0)
    synced: list[bool] = []
    real_syncfs = batch.syncfs

    def syncfs(root: Path) -> None:  # nothing may be named before the sync
        synced.append(not any(store.has_object(w.digest) for w in written))
        real_syncfs(root)

    monkeypatch.setattr(batch, "syncfs", syncfs)
    out = naming.name_written(
        [written[0], failed, written[1], written[2]],
        str(store.repo.tmp.path),
        str(store.repo.root),
        fsync=True,
        verity=True,
    )
    assert synced == [True]
    assert out[1] is failed  # failures pass through in place
    named = [out[0], out[2], out[3]]
    assert all(isinstance(n, naming.Named) and n.new for n in named)
    assert [n.digest for n in named] == [w.digest for w in written]  # type: ignore[union-attr]
    for w, data in zip(written, blobs, strict=True):
        assert store.object_path(w.digest).read_bytes() == data
    assert _temps(store) == []
    # Named, not yet recorded: the parent records the rows.
    assert store.usage().files == 0
    store.record_named([(n.digest, n.size, n.verity) for n in named])  # type: ignore[union-attr]
    assert store.usage().files == 3
    assert store.usage().bytes == sum(len(b) for b in blobs)

    again = _written(store, blobs[0])  # already there: not named twice, temp file removed
    (n,) = naming.name_written(
        [again], str(store.repo.tmp.path), str(store.repo.root), fsync=True, verity=True
    )
    assert isinstance(n, naming.Named) and not n.new
    assert _temps(store) == []
    store.close()


@pytest.mark.parametrize(("code", "kind"), [(errno.EIO, "FetchError"), (errno.ENOSPC, "no_space")])
def test_a_failed_sync_names_nothing_and_removes_the_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, kind: str
) -> None:
    store = Store(tmp_path / "s")
    written = [_written(store, os.urandom(3000 + i)) for i in range(2)]

    def syncfs(root: Path) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(batch, "syncfs", syncfs)
    out = naming.name_written(
        list(written), str(store.repo.tmp.path), str(store.repo.root), fsync=True, verity=False
    )
    assert [type(o) for o in out] == [naming.Failed, naming.Failed]
    assert all(o.error == kind and "storing object" in o.message for o in out)  # type: ignore[union-attr]
    if kind == "FetchError":  # a disk error says where to look
        assert all("fsck" in o.message for o in out)  # type: ignore[union-attr]
    assert not any(store.has_object(w.digest) for w in written)
    assert _temps(store) == []
    store.close()


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


@pytest.mark.parametrize("sync_fails", [False, True])
def test_a_worker_names_files_through_the_descriptors_that_wrote_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync_fails: bool
) -> None:
    # A worker that may keep descriptors (fs-verity off) hands each file to the naming step
    # still open: no second open; every descriptor is closed whatever happens; a budget of
    # one keeps one.
    store = Store(tmp_path / "s")
    monkeypatch.setattr(workertemp.fds, "left", 1)
    blobs = [os.urandom(4000 + i) for i in range(2)]
    objs = []
    for b in blobs:
        obj = workertemp.TempObject(
            str(store.repo.tmp.path), store.repo.tmp.owner(), digest_bytes(b)
        )
        obj.write(b)
        obj.keep()
        objs.append(obj.kept())
    assert objs[0].fd >= 0 and _fd_open(objs[0].fd) and objs[1].fd == -1
    if sync_fails:

        def syncfs(root: Path) -> None:
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr(batch, "syncfs", syncfs)
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: str, *a: object, **k: object) -> int:
        opened.append(str(path))
        return real_open(path, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(naming.os, "open", counting_open)
    out = naming.name_written(
        list(objs), str(store.repo.tmp.path), str(store.repo.root), fsync=True, verity=False
    )
    # Only the file closed after writing is opened again (the sync opens the directory).
    assert [p for p in opened if p.endswith(WORKER_TEMP_SUFFIX)] == [objs[1].path]
    assert not _fd_open(objs[0].fd)
    if sync_fails:
        assert [type(o) for o in out] == [naming.Failed, naming.Failed]
        assert not any(store.has_object(w.digest) for w in objs)
    else:
        assert all(isinstance(o, naming.Named) and o.new for o in out)
        for w, data in zip(objs, blobs, strict=True):
            assert store.object_path(w.digest).read_bytes() == data
            assert store.object_path(w.digest).stat().st_mode & 0o777 == 0o644
    assert _temps(store) == []
    store.close()


def test_rows_that_cannot_be_written_leave_their_files_for_recovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object's lock ended when it was named, so another process may already count on
    it: a failed record leaves it in place, and the next recovery records it."""
    root = tmp_path / "s"
    store = Store(root)
    written = [_written(store, os.urandom(4000))]
    (n,) = naming.name_written(
        written, str(store.repo.tmp.path), str(store.repo.root), fsync=False, verity=False
    )
    assert isinstance(n, naming.Named) and store.has_object(n.digest)

    def record_objects(*args: object, **kw: object) -> None:
        raise OSError(errno.ENOSPC, "database or disk is full")

    monkeypatch.setattr(store.db, "record_objects", record_objects)
    with pytest.raises(OSError, match="full"):
        store.record_named([(n.digest, n.size, n.verity)])
    assert store.has_object(n.digest)  # whole and durable: left in place
    assert store.usage().files == 0
    store.close()
    with Store(root) as again:
        assert again.recovery.recorded_unknown == 1
        assert again.usage().files == 1 and again.has_object(n.digest)


def test_an_object_named_but_not_recorded_is_recorded_at_recovery(tmp_path: Path) -> None:
    """The worker named it, then the parent died before writing its row."""
    root = tmp_path / "s"
    store = Store(root)
    data = os.urandom(6000)
    (n,) = naming.name_written(
        [_written(store, data)],
        str(store.repo.tmp.path),
        str(store.repo.root),
        fsync=True,
        verity=False,
    )
    assert isinstance(n, naming.Named)
    store.close()  # no record_named: as if the process had been killed here
    with Store(root) as again:
        assert again.recovery.recorded_unknown == 1
        assert again.usage().files == 1 and again.usage().bytes == len(data)

"""Disk full: a store on a small tmpfs. A write that runs out of space triggers GC once; when
GC cannot make room the caller gets StoreFull, and the store stays consistent."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.image.fsverity import digest_bytes
from csi.metrics import REGISTRY
from csi.store import Store, StoreFull

from ._storekit import blob, fake_image, fake_parser, files_under, put, temp_files, writing

MiB = 1024 * 1024


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def df_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.mark.root
def test_disk_full_gc_then_store_full(tmp_path: Path) -> None:
    with (
        small_tmpfs(tmp_path / "mnt", "11m") as mnt,
        Store(mnt / "store", image_parser=fake_parser) as s,
    ):
        # an unleased image holding ~5 MiB and a leased one holding ~3 MiB
        old = [blob(f"old{i}", MiB) for i in range(5)]
        kept = [blob(f"kept{i}", MiB) for i in range(3)]
        old_img = s.add_image_bytes(fake_image([put(s, b) for b in old], b"old"))
        kept_img = s.add_image_bytes(fake_image([put(s, b) for b in kept], b"kept"))
        s.lease("vol", [kept_img])
        runs = metric("composefs_csi_store_gc_runs_total")

        # 3 MiB more does not fit: GC removes the unleased image, the retry succeeds
        big = blob("big", 3 * MiB)
        calls = []

        def fill(w):  # type: ignore[no-untyped-def]
            calls.append(1)
            w.write(big)

        assert s.ensure(digest_bytes(big), fill, size_hint=len(big)) is True
        assert len(calls) == 2
        assert metric("composefs_csi_store_gc_runs_total") == runs + 1
        assert not s.has_image(old_img) and s.has_image(kept_img)
        assert s.missing_objects(kept_img) == set()

        # now everything left is leased: 6 MiB more cannot fit, even after GC
        s.lease("vol2", [s.add_image_bytes(fake_image([digest_bytes(big)], b"big"))])
        huge = blob("huge", 6 * MiB)
        full_before = metric("composefs_csi_store_full_total")
        with pytest.raises(StoreFull, match="no space left in the store") as ei:
            s.ensure(digest_bytes(huge), writing(huge), size_hint=len(huge))
        assert "leased" in str(ei.value)
        assert metric("composefs_csi_store_full_total") == full_before + 1
        assert not s.has_object(digest_bytes(huge))
        assert temp_files(s.root) == []

        # consistent: every recorded file is there and verifies, nothing unrecorded
        assert s.fsck().ok
        u = s.usage()
        on_disk = files_under(s.root / "objects")
        assert u.files == len(on_disk) == 3 + 1 + 1 + 1  # kept objects, images, big
        assert u.bytes == sum((s.root / "objects" / f).stat().st_size for f in on_disk)
        assert s.missing_objects(kept_img) == set()

        # after releasing, the space can be reclaimed and the write succeeds
        s.release("vol2")
        assert s.ensure(digest_bytes(huge), writing(huge), size_hint=len(huge)) is True
        assert s.has_image(kept_img) and s.missing_objects(kept_img) == set()
        assert df_used(mnt) <= 11 * MiB


def test_unpin_on_a_full_disk_keeps_the_error_of_the_block(tmp_path: Path) -> None:
    """SQLite needs room even to delete a pin: when that fails on a full disk, the error of
    the pinned block (itself most likely "no space") is what the caller sees, and the pin is
    removed by the next pin of the store."""
    import sqlite3

    from tests._storekit import real_image

    img, _ = real_image([b"pinned while the disk filled"])
    with Store(tmp_path / "s") as s:
        d = s.add_image_bytes(img)
        real_tx = s.db.tx

        @contextlib.contextmanager
        def full_tx() -> Iterator[sqlite3.Cursor]:
            raise sqlite3.OperationalError("database or disk is full")
            yield  # pragma: no cover

        with pytest.raises(StoreFull, match="the block's own"), s.pin([d]):
            s.db.tx = full_tx  # type: ignore[method-assign]
            raise StoreFull("the block's own error")
        s.db.tx = real_tx  # type: ignore[method-assign]
        assert s.usage().pinned_images == 1  # left behind, remembered
        with s.pin([d]):
            pass
        assert s.usage().pinned_images == 0

        # any other database error on unpinning is not hidden
        with pytest.raises(sqlite3.OperationalError, match="locked"), s.pin([d]):

            @contextlib.contextmanager
            def locked_tx() -> Iterator[sqlite3.Cursor]:
                raise sqlite3.OperationalError("database is locked")
                yield  # pragma: no cover

            s.db.tx = locked_tx  # type: ignore[method-assign]
        s.db.tx = real_tx  # type: ignore[method-assign]


@pytest.mark.root
@pytest.mark.parametrize("processes", [0, 2])
def test_a_pull_that_fills_the_disk_keeps_what_it_stored(tmp_path: Path, processes: int) -> None:
    """A pull larger than the disk fails with "no space", and whatever it stored before
    failing stays: the image is pinned until every download it started has ended, so the
    no-space GC of the downloads still running cannot collect it under the failing pull."""
    from csi.fetch import NoSpace, pull
    from csi.repo import Repository
    from tests.fetchkit import publish

    repo = Repository(tmp_path / "repo", create=True)
    files = {f"f{i:03d}": blob(f"big{i}", 512 * 1024) for i in range(96)}  # 48 MiB
    image = publish(repo, files, "big:v1")
    with small_tmpfs(tmp_path / "mnt", "16m") as mnt:
        with pytest.raises(NoSpace):
            pull("big:v1", str(repo.root), mnt / "store", concurrency=8, processes=processes)
        with Store(mnt / "store") as s:
            assert s.has_image(image), "the failed pull's image was collected"
            stored = len(s.image_objects(image)) - len(s.missing_objects(image))
            assert stored >= 8, stored  # most of the 16 MiB holds its objects
            assert temp_files(s.root) == []

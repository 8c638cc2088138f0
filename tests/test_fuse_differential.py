"""Our FUSE view of an image equals the kernel composefs mount (EROFS + overlayfs data-only
layer) of the same image: every stat field, xattr, symlink target, directory order, file
content and statfs field. ``st_ino`` is compared through the documented mapping
(``st_ino & NID_MASK`` = the kernel's nid); hard links must share inode numbers exactly where
the kernel's do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi.fuse.inodes import NID_MASK
from csi.image.tree import S_IFDIR, S_IFREG, Node, Tree, object_path
from tests.fuse_helpers import (
    add_image,
    diff,
    external,
    fuse_unavailable,
    random_tree,
    run_daemon,
    snapshot,
)
from tests.support.kernel import have_kernel_composefs, mount_composefs

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]


@pytest.fixture(autouse=True)
def _facilities() -> None:
    reason = fuse_unavailable() or have_kernel_composefs()
    if reason:
        pytest.skip(reason)


STATVFS_FIELDS = (
    "f_bsize",
    "f_frsize",
    "f_blocks",
    "f_bfree",
    "f_bavail",
    "f_files",
    "f_ffree",
    "f_favail",
    "f_namemax",
)


def compare(store: Path, digest: bytes, view: Path) -> None:
    ours = snapshot(view, ino_mask=NID_MASK)
    with mount_composefs(store / "images" / digest.hex(), store / "objects") as k:
        theirs = snapshot(k, ino_mask=NID_MASK)
        kfs = os.statvfs(k)
    problems = diff(ours, theirs)
    assert not problems, "\n".join(problems)
    fs = os.statvfs(view)
    for f in STATVFS_FIELDS:
        assert getattr(fs, f) == getattr(kfs, f), f
    assert fs.f_flag & os.ST_RDONLY


@pytest.mark.parametrize("seed", range(6))
def test_generated_trees_match_kernel(tmp_path: Path, seed: int) -> None:
    store = tmp_path / "store"
    tree, blobs = random_tree(seed, n=150)
    digest = add_image(store, tree, blobs)
    with run_daemon(store) as d:
        compare(store, digest, d.view_path([digest]))


@pytest.mark.parametrize("seed", range(3))
def test_generated_trees_match_kernel_with_file_handles(tmp_path: Path, seed: int) -> None:
    """The way stock pyfuse3 serves (every open and listing through the daemon) shows the
    same as the kernel-opens way."""
    store = tmp_path / "store"
    tree, blobs = random_tree(seed, n=150)
    digest = add_image(store, tree, blobs)
    with run_daemon(store, kernel_opens=False) as d:
        compare(store, digest, d.view_path([digest]))


@pytest.mark.parametrize("seed", range(3))
def test_lazy_views_match_kernel(tmp_path: Path, seed: int) -> None:
    """A lazy view (only the image local; objects fetched as files are read) shows what the
    kernel mount over the complete objects shows."""
    from csi.image.writer import write_image
    from csi.repo import Repository
    from csi.store import Store

    repo = Repository(tmp_path / "repo", create=True)
    tree, blobs = random_tree(seed, n=150)
    for data in blobs:
        repo.add_object_bytes(data)
    image = write_image(tree)
    digest = repo.add_image(image)
    store = tmp_path / "store"
    with Store(store) as s:
        s.add_image_bytes(image)
    with run_daemon(store, repositories={"main": str(repo.root)}, prefetch_threads=1) as d:
        view = Path(d.client.add_view([digest], "test", lazy=True)["path"])
        ours = snapshot(view, ino_mask=NID_MASK)
        with mount_composefs(repo.root / "images" / digest.hex(), repo.root / "objects") as k:
            theirs = snapshot(k, ino_mask=NID_MASK)
        problems = diff(ours, theirs)
        assert not problems, "\n".join(problems)


def test_ten_thousand_entry_directory(tmp_path: Path) -> None:
    store = tmp_path / "store"
    tree, blobs = random_tree(99, big_dir=10_000, n=30)
    digest = add_image(store, tree, blobs)
    with run_daemon(store) as d:
        view = d.view_path([digest])
        compare(store, digest, view)
        # Listing resumes correctly however the kernel splits it into requests.
        assert len(os.listdir(view / "big")) == 10_000


def test_missing_object_is_enoent_and_logged(tmp_path: Path) -> None:
    store = tmp_path / "store"
    gone = b"\x42" * 32
    tree = Tree(Node(mode=S_IFDIR | 0o755))
    assert tree.root.entries is not None
    tree.root.add(
        b"gone", Node(mode=S_IFREG | 0o644, size=5000, payload=object_path(gone), digest=gone)
    )
    here, data = external(b"present" * 100)
    tree.root.add(b"here", here)
    digest = add_image(store, tree, [data])
    with run_daemon(store) as d:
        view = d.view_path([digest])
        assert os.stat(view / "gone").st_size == 5000  # metadata needs no object
        with pytest.raises(FileNotFoundError):
            (view / "gone").read_bytes()
        assert (view / "here").read_bytes() == data
        with (
            mount_composefs(store / "images" / digest.hex(), store / "objects") as k,
            pytest.raises(FileNotFoundError),
        ):
            (k / "gone").read_bytes()
        assert gone.hex() in d.log.read_text()


def test_single_view_statfs_and_inode_mapping(tmp_path: Path) -> None:
    store = tmp_path / "store"
    tree, blobs = random_tree(7, n=40)
    digest = add_image(store, tree, blobs)
    with run_daemon(store) as d:
        view = d.view_path([digest])
        with mount_composefs(store / "images" / digest.hex(), store / "objects") as k:
            assert os.stat(view).st_ino & NID_MASK == os.stat(k).st_ino
            for name in os.listdir(k):
                assert os.lstat(view / name).st_ino & NID_MASK == os.lstat(k / name).st_ino

"""Acceptance: images built by our code, mounted by the kernel, equal their source trees.

For each generated tree (every entry kind and layout rule of composefs-format.md §1, and
random trees): create it on disk, build the image with our writer (from the expected Tree,
and from our directory scanner once it exists), store the objects, check the image with
``fsck.erofs``, mount it as ``mount.composefs`` does (EROFS + overlayfs with the objects as a
data-only layer) and compare a full snapshot of the mount with the source: names, types,
modes, uid/gid, nlink, sizes, mtimes (ns), rdev, symlink targets, content hashes, hardlink
groups and xattrs. Whiteouts (chr 0/0) are compared as the kernel presents them (§1.20):
empty regular files with the overlay whiteout xattrs, parents with the xwhiteouts markers.
"""

from __future__ import annotations

import errno
import importlib
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from csi.image.tree import Tree
from csi.image.writer import write_image
from tests.support.gentree import (
    EntrySpec,
    TreeSpec,
    full_coverage_spec,
    iter_segments,
    make_disk_tree,
    posix_acl,
    random_spec,
    spec_to_tree,
    store_objects,
    write_spec_objects,
)
from tests.support.kernel import have_kernel_composefs, mount_composefs, mounts_under
from tests.support.snapshot import diff_snapshots, kernel_presentation, snapshot

pytestmark = pytest.mark.root

GiB = 1 << 30


@pytest.fixture(autouse=True)
def _need_kernel_composefs() -> None:
    reason = have_kernel_composefs()
    if reason is not None:
        pytest.skip(reason)


def huge_spec() -> TreeSpec:
    """Sparse files above 4 GiB: extended inodes by size, 64-bit i_size in the mount."""
    E = EntrySpec
    return TreeSpec(
        [
            E(b"", "dir"),
            E(b"max-compact", "file", size=(1 << 32) - 1, fill="sparse", seed=1),
            E(b"4g", "file", size=4 * GiB, fill="sparse", seed=2),
            E(b"5g+1", "file", size=5 * GiB + 1, fill="sparse", seed=3),
            E(b"small", "file", data=b"small"),
        ]
    )


def _random(seed: int) -> Callable[[], TreeSpec]:
    return lambda: random_spec(seed, 300)


SPECS: dict[str, Callable[[], TreeSpec]] = {
    "full-coverage": lambda: full_coverage_spec(big_dir=True),
    "full-no-acl": lambda: full_coverage_spec(acl=False),
    **{f"random-{seed}": _random(seed) for seed in range(1, 6)},
}


def _fsck(image: Path) -> None:
    fsck = shutil.which("fsck.erofs")
    if fsck is None:
        return  # erofs-utils is installed by scripts/setup.sh; nothing to check without it
    proc = subprocess.run([fsck, str(image)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"fsck.erofs rejected {image}:\n{proc.stdout}{proc.stderr}"


def _expected_version(spec: TreeSpec) -> int:
    return 1 if spec.has_whiteouts() else 0


def _assert_mount_equals_source(
    spec: TreeSpec,
    src: Path,
    image_bytes: bytes,
    objects: Path,
    workdir: Path,
    *,
    content: bool = True,
) -> None:
    """Mount the image and compare with the source; ``content=False`` hashes no file content
    and compares only the written pieces of each file (for huge sparse files)."""
    image = workdir / "image.cfs"
    image.write_bytes(image_bytes)
    version = _expected_version(spec)
    assert struct.unpack_from("<I", image_bytes, 12)[0] == version
    _fsck(image)
    expected = kernel_presentation(snapshot(src, content=content), version=version, content=content)
    with mount_composefs(image, objects) as mnt:
        seen = snapshot(mnt, content=content)
        if not content:
            for e in spec.files():
                want = src / os.fsdecode(e.path)
                got = mnt / os.fsdecode(e.path)
                for off, data in iter_segments(e):
                    with open(want, "rb") as fw, open(got, "rb") as fg:
                        assert os.pread(fg.fileno(), len(data), off) == data
                        assert os.pread(fw.fileno(), len(data), off) == data
        assert mounts_under(mnt), "the overlay is mounted while in the context"
    assert not mounts_under(mnt.parent), "mount_composefs left mounts behind"
    assert not mnt.parent.exists(), "mount_composefs left its temporary directory"
    differences = diff_snapshots(expected, seen)
    assert differences == [], "kernel mount differs from the source:\n" + "\n".join(
        differences[:60]
    )


@pytest.mark.parametrize("name", sorted(SPECS))
def test_image_from_expected_tree_mounts_like_source(name: str, tmp_path: Path) -> None:
    spec = SPECS[name]()
    src = tmp_path / "src"
    make_disk_tree(src, spec)
    objects = tmp_path / "objects"
    objects.mkdir()
    write_spec_objects(spec, objects)
    image = write_image(spec_to_tree(spec))
    _assert_mount_equals_source(spec, src, image, objects, tmp_path)


def _scan(src: Path) -> tuple[Tree, list[tuple[bytes, Path]]]:
    try:
        fromdir = importlib.import_module("csi.image.fromdir")
    except ImportError as e:
        pytest.skip(f"the directory scanner csi.image.fromdir is not available yet: {e}")
    result = fromdir.scan_directory(src, fromdir.ScanOptions())
    return result.tree, [(digest, Path(path)) for digest, path, _size in result.objects]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_image_from_scanned_directory_mounts_like_source(name: str, tmp_path: Path) -> None:
    spec = SPECS[name]()
    src = tmp_path / "src"
    make_disk_tree(src, spec)
    tree, objs = _scan(src)
    objects = tmp_path / "objects"
    objects.mkdir()
    store_objects(objs, objects)
    _assert_mount_equals_source(spec, src, write_image(tree), objects, tmp_path)


@pytest.mark.slow
def test_huge_sparse_files_mount_with_their_sizes(tmp_path: Path) -> None:
    spec = huge_spec()
    src = tmp_path / "src"
    make_disk_tree(src, spec)
    objects = tmp_path / "objects"
    objects.mkdir()
    write_spec_objects(spec, objects)
    image = write_image(spec_to_tree(spec))
    _assert_mount_equals_source(spec, src, image, objects, tmp_path, content=False)


def test_mount_cleans_up_after_an_exception(tmp_path: Path) -> None:
    spec = TreeSpec([EntrySpec(b"", "dir"), EntrySpec(b"f", "file", size=100)])
    make_disk_tree(tmp_path / "src", spec)
    objects = tmp_path / "objects"
    write_spec_objects(spec, objects)
    image = tmp_path / "image.cfs"
    image.write_bytes(write_image(spec_to_tree(spec)))
    seen: list[Path] = []
    with pytest.raises(RuntimeError, match="boom"), mount_composefs(image, objects) as mnt:
        seen.append(mnt)
        assert (mnt / "f").stat().st_size == 100
        raise RuntimeError("boom")
    assert not mounts_under(seen[0].parent)
    assert not seen[0].parent.exists()


def test_objects_dir_with_colon_and_comma_in_its_path(tmp_path: Path) -> None:
    spec = TreeSpec([EntrySpec(b"", "dir"), EntrySpec(b"f", "file", size=5000, seed=9)])
    make_disk_tree(tmp_path / "src", spec)
    objects = tmp_path / "obj:ects,dir\\x"
    write_spec_objects(spec, objects)
    image = tmp_path / "image.cfs"
    image.write_bytes(write_image(spec_to_tree(spec)))
    with mount_composefs(image, objects) as mnt:
        assert (mnt / "f").read_bytes() == (tmp_path / "src" / "f").read_bytes()


def _erofs_options(mnt: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mnt.parent / "image"):
                sep = fields.index("-")
                return fields[5].split(",") + fields[sep + 3].split(",")
    raise AssertionError("the erofs mount of the image is not in mountinfo")


@pytest.mark.parametrize("acl", [False, True])
def test_noacl_unless_image_has_acls(acl: bool, tmp_path: Path) -> None:
    xattrs = {}
    if acl:
        xattrs[b"system.posix_acl_access"] = posix_acl(
            [(1, 6, None), (2, 4, 1000), (4, 4, None), (0x10, 4, None), (0x20, 4, None)]
        )
    spec = TreeSpec([EntrySpec(b"", "dir"), EntrySpec(b"f", "file", data=b"x", xattrs=xattrs)])
    make_disk_tree(tmp_path / "src", spec)
    image = tmp_path / "image.cfs"
    image.write_bytes(write_image(spec_to_tree(spec)))
    (tmp_path / "objects").mkdir()
    with mount_composefs(image, tmp_path / "objects") as mnt:
        opts = _erofs_options(mnt)
        names = os.listxattr(mnt / "f")
    assert ("noacl" in opts) is not acl
    assert ("system.posix_acl_access" in names) is acl


def test_missing_object_is_enoent(tmp_path: Path) -> None:
    spec = TreeSpec([EntrySpec(b"", "dir"), EntrySpec(b"f", "file", size=4097, seed=1)])
    make_disk_tree(tmp_path / "src", spec)
    image = tmp_path / "image.cfs"
    image.write_bytes(write_image(spec_to_tree(spec)))
    (tmp_path / "objects").mkdir()
    with mount_composefs(image, tmp_path / "objects") as mnt:
        assert (mnt / "f").stat().st_size == 4097
        with pytest.raises(FileNotFoundError):
            (mnt / "f").read_bytes()


def test_verity_require_refuses_objects_without_fsverity(tmp_path: Path) -> None:
    spec = TreeSpec([EntrySpec(b"", "dir"), EntrySpec(b"f", "file", size=4097, seed=1)])
    make_disk_tree(tmp_path / "src", spec)
    objects = tmp_path / "objects"
    write_spec_objects(spec, objects)  # plain copies: fs-verity is never enabled on them
    image = tmp_path / "image.cfs"
    image.write_bytes(write_image(spec_to_tree(spec)))
    try:
        ctx = mount_composefs(image, objects, verity=True)
        mnt = ctx.__enter__()
    except OSError as e:
        if e.errno == errno.EINVAL:
            pytest.skip(f"overlayfs has no verity= option here (Linux >= 6.6): {e}")
        raise
    try:
        with pytest.raises(OSError) as info:
            (mnt / "f").read_bytes()
        assert info.value.errno == errno.EIO
    finally:
        ctx.__exit__(None, None, None)

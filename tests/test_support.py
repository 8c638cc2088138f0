"""Tests of the shared test support (snapshots, tree generators, kernel mount helpers)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from csi.image.fsverity import digest_file
from csi.image.tree import HardLink, Node, Tree
from csi.image.writer import write_image
from tests.support.gentree import (
    EntrySpec,
    TreeSpec,
    content_bytes,
    full_coverage_spec,
    make_disk_tree,
    random_spec,
    spec_objects,
    spec_to_tree,
    store_objects,
    write_spec_objects,
)
from tests.support.kernel import escape_overlay_path, have_kernel_composefs, mount_overlay
from tests.support.snapshot import (
    Entry,
    diff_snapshots,
    kernel_presentation,
    snapshot,
)

ROOT = os.geteuid() == 0


def _spec() -> TreeSpec:
    return full_coverage_spec(privileged=ROOT, acl=ROOT)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("pair")
    a = make_disk_tree(base / "a", _spec())
    b = make_disk_tree(base / "b", _spec())
    return a, b


def test_same_spec_twice_gives_equal_snapshots(pair: tuple[Path, Path]) -> None:
    a, b = pair
    sa, sb = snapshot(a), snapshot(b)
    assert diff_snapshots(sa, sb) == []
    # Inode numbers differ between the trees: compared only when asked to.
    assert any("ino differs" in d for d in diff_snapshots(sa, sb, ignore=()))


def test_snapshot_records_every_field(pair: tuple[Path, Path]) -> None:
    s = snapshot(pair[0])
    assert s["/"].type == "dir" and s["/"].size is None
    assert snapshot(pair[0], dir_sizes=True)["/"].size is not None
    f = s["/files/size-65"]
    assert f.type == "reg" and f.size == 65 and stat.S_IMODE(f.mode) == 0o644
    assert f.sha256 is not None and len(f.sha256) == 64
    assert s["/links/long-4095"].target == (b"p/" * 4095)[:4094] + b"x"
    assert s["/special/fifo"].type == "fifo"
    assert s["/special/socket"].type == "sock"
    assert s["/times/nsec"].mtime_ns == 1_700_000_000_123_456_789
    assert s["/hl/ext"].hardlinks == ("/a-first", "/deep/d00/d01/ext-3", "/hl/ext-2")
    assert s["/hl/ext"].nlink == 4
    assert s["/xattrs/mixed"].xattr_dict()[b"user.binary".decode()] == b"\x00\x01\xff=\n"
    assert os.fsdecode(b"/names/\xff\xfehigh-bytes") in s
    assert "/names/new\nline" in s
    assert s["/perms/mode-4755"].mode == stat.S_IFREG | 0o4755
    if ROOT:
        assert s["/special/chr-big"].rdev == os.makedev(300, 70_000)
        assert s["/layer/removed"].type == "chr" and s["/layer/removed"].rdev == 0
        assert s["/owners/big-ids"].uid == 4_000_000_000
        assert s["/xattrs/mixed"].xattr_dict()["trusted.overlay.foo"] == b"escaped once"
    assert snapshot(pair[0], content=False)["/files/size-65"].sha256 is None
    assert snapshot(pair[0], xattrs=False)["/xattrs/mixed"].xattrs is None
    filtered = snapshot(pair[0], xattr_filter=lambda n: n != "user.simple")
    assert "user.simple" not in filtered["/xattrs/mixed"].xattr_dict()


def _mutations(root: Path) -> list[tuple[str, str]]:
    """(change applied, text expected in the diff) after applying each change to ``root``."""
    done = []
    (root / "files" / "size-100").write_bytes(b"x" * 100)
    done.append(("/files/size-100", "sha256 differs"))
    os.chmod(root / "files" / "size-65", 0o600)
    done.append(("/files/size-65", "mode differs: 100644 != 100600"))
    os.utime(root / "times" / "nsec", ns=(0, 1_700_000_000_123_456_788))
    done.append(("/times/nsec", "mtime_ns differs"))
    os.setxattr(root / "xattrs" / "mixed", "user.simple", b"changed")
    done.append(("/xattrs/mixed", "xattr user.simple differs"))
    os.setxattr(root / "xattrs" / "long-value", "user.added", b"new")
    done.append(("/xattrs/long-value", "xattr user.added only in second"))
    os.unlink(root / "links" / "short")
    os.symlink("elsewhere", root / "links" / "short")
    done.append(("/links/short", "target differs"))
    os.unlink(root / "files" / "size-2")
    done.append(("/files/size-2", "only in first"))
    (root / "files" / "new-file").write_bytes(b"")
    done.append(("/files/new-file", "only in second"))
    os.unlink(root / "hl" / "small-2")
    (root / "hl" / "small-2").write_bytes(b"small inline\n")
    done.append(("/hl/small-2", "hardlinks differs"))
    with open(root / "files" / "size-0", "wb") as f:
        f.truncate(10)
    done.append(("/files/size-0", "size differs"))
    if ROOT:
        os.chown(root / "files" / "size-1", 7, 0)
        done.append(("/files/size-1", "uid differs"))
    return done


def test_diff_reports_each_change(tmp_path: Path) -> None:
    a = make_disk_tree(tmp_path / "a", _spec())
    b = make_disk_tree(tmp_path / "b", _spec())
    before = snapshot(a)
    changes = _mutations(b)
    diffs = diff_snapshots(before, snapshot(b))
    for path, text in changes:
        assert any(d.startswith(path + ":") and text in d for d in diffs), (path, text, diffs)
    # Nothing else is reported: every line is about a mutated path or a dir mtime it changed.
    touched = {p for p, _ in changes} | {"/files", "/hl", "/links"}
    touched |= {"/hl/small", "/names/-small-3"}  # the rest of small-2's old hardlink group
    assert {d.split(":", 1)[0] for d in diffs} <= touched
    # Ignoring fields and paths.
    only_sha = [d for d in diffs if "sha256" in d]
    assert only_sha and not [
        d for d in diff_snapshots(before, snapshot(b), ignore={"ino", "sha256"}) if "sha256" in d
    ]
    assert diff_snapshots(before, snapshot(b), ignore_paths=lambda p: p in touched) == []
    with pytest.raises(ValueError, match="unknown fields"):
        diff_snapshots(before, before, ignore={"atime"})


def _entry(**kw: object) -> Entry:
    base = Entry(
        type="reg",
        mode=0o100644,
        uid=0,
        gid=0,
        nlink=1,
        size=0,
        mtime_ns=0,
        rdev=0,
        target=None,
        sha256=None,
        xattrs=(),
        hardlinks=(),
        ino=1,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [0, 1])
def test_kernel_presentation_of_whiteouts(version: int) -> None:
    snap = {
        "/": _entry(type="dir", mode=0o40755, size=None, xattrs=(("user.r", b"1"),)),
        "/d": _entry(type="dir", mode=0o40700, size=None),
        "/d/wh": _entry(type="chr", mode=0o20600, rdev=0, xattrs=(("trusted.x", b"y"),)),
        "/d/dev": _entry(type="chr", mode=0o20644, rdev=259),
        "/f": _entry(sha256="ab"),
    }
    out = kernel_presentation(snap, version=version)
    wh = out["/d/wh"]
    assert (wh.type, wh.mode, wh.size, wh.rdev) == ("reg", 0o100600, 0, 0)
    assert wh.xattr_dict() == {
        "trusted.x": b"y",
        "trusted.overlay.whiteout": b"",
        "user.overlay.whiteout": b"",
    }
    marks = {"trusted.overlay.whiteouts": b"", "user.overlay.whiteouts": b""}
    if version:
        marks |= {"trusted.overlay.opaque": b"x", "user.overlay.opaque": b"x"}
    assert out["/d"].xattr_dict() == marks
    assert out["/"] == snap["/"] and out["/d/dev"] == snap["/d/dev"] and out["/f"] == snap["/f"]
    assert kernel_presentation(snap, content=False)["/d/wh"].sha256 is None


def _tree_paths(tree: Tree) -> dict[str, Node]:
    return {os.fsdecode(p): (e.target if isinstance(e, HardLink) else e) for p, e in tree.walk()}


@pytest.mark.parametrize("which", ["full", "random-3", "random-8"])
def test_disk_tree_matches_expected_tree(which: str, tmp_path: Path) -> None:
    if which == "full":
        spec = _spec()
    else:
        spec = random_spec(int(which.split("-")[1]), 300, privileged=ROOT)
    root = make_disk_tree(tmp_path / "t", spec)
    snap = snapshot(root)
    tree = spec_to_tree(spec)
    nodes = _tree_paths(tree)
    assert set(nodes) == set(snap)
    for path, node in nodes.items():
        e = snap[path]
        assert e.mode == node.mode, path
        assert e.mtime_ns == node.mtime_sec * 10**9 + node.mtime_nsec, path
        assert e.nlink == node.nlink, path
        assert e.xattr_dict() == {os.fsdecode(k): v for k, v in node.xattrs.items()}, path
        if ROOT:
            assert (e.uid, e.gid) == (node.uid, node.gid), path
        if node.is_reg:
            assert e.size == node.size, path
            assert (node.content is not None) == (0 < node.size <= 64), path
            if node.content is not None:
                assert (root / path.lstrip("/")).read_bytes() == node.content
            elif node.size:
                assert digest_file(root / path.lstrip("/")) == node.digest, path
        if node.is_symlink:
            assert e.target == node.payload, path
        if node.file_type in (stat.S_IFCHR, stat.S_IFBLK):
            assert e.rdev == node.rdev, path
        same = sorted(p for p, n in nodes.items() if n is node and p != path)
        assert list(e.hardlinks) == ([] if node.is_dir else same), path


def test_hardlink_primary_is_first_in_breadth_first_order() -> None:
    tree = spec_to_tree(full_coverage_spec(privileged=False))
    primaries = {os.fsdecode(p) for p, n in tree.bfs() if n.nlink > 1 and not n.is_dir}
    assert "/a-first" in primaries and "/hl/ext" not in primaries
    tree.validate()


def test_random_spec_is_deterministic() -> None:
    assert random_spec(5, 100).entries == random_spec(5, 100).entries
    assert random_spec(5, 100).entries != random_spec(6, 100).entries
    kinds = {e.kind for seed in range(5) for e in random_spec(seed, 300).entries}
    assert kinds >= {"dir", "file", "symlink", "hardlink", "fifo", "chr", "blk", "whiteout"}


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="parent"):
        TreeSpec([EntrySpec(b"", "dir"), EntrySpec(b"a/b", "file")])
    with pytest.raises(ValueError, match="hardlink target"):
        TreeSpec([EntrySpec(b"", "dir"), EntrySpec(b"a", "hardlink", target=b"b")])
    with pytest.raises(ValueError, match="symlink needs"):
        EntrySpec(b"s", "symlink")
    with pytest.raises(ValueError, match="root"):
        TreeSpec([EntrySpec(b"a", "dir")])


def test_objects_are_named_by_their_digest(tmp_path: Path) -> None:
    spec = _spec()
    n = write_spec_objects(spec, tmp_path / "objects")
    found = sorted((tmp_path / "objects").glob("*/*"))
    assert n == len(found) == len(spec_objects(spec))
    for obj in found:
        assert digest_file(obj).hex() == obj.parent.name + obj.name
        assert stat.S_IMODE(obj.stat().st_mode) == 0o644
    # dup-a and dup-b share one object; every file above 64 bytes has one.
    assert len(found) == len({content_bytes(e) for e in spec.files() if e.size > 64})


def test_store_objects_keeps_holes(tmp_path: Path) -> None:
    spec = TreeSpec([EntrySpec(b"", "dir"), EntrySpec(b"s", "file", size=256 << 20, fill="sparse")])
    src = make_disk_tree(tmp_path / "src", spec)
    ((digest, _e),) = spec_objects(spec).items()
    assert store_objects([(digest, src / "s")], tmp_path / "obj") == 1
    assert store_objects([(digest, src / "s")], tmp_path / "obj") == 0  # already there
    obj = next((tmp_path / "obj").glob("*/*"))
    st = obj.stat()
    assert st.st_size == 256 << 20
    assert st.st_blocks * 512 < 1 << 20
    assert digest_file(obj) == digest


def test_escape_overlay_path() -> None:
    assert escape_overlay_path("/a:b,c\\d") == "/a\\:b\\,c\\\\d"
    assert escape_overlay_path(Path("/plain")) == "/plain"


@pytest.mark.root
def test_mount_overlay_stacks_layers(tmp_path: Path) -> None:
    reason = have_kernel_composefs()
    if reason is not None:
        pytest.skip(reason)
    upper, lower = tmp_path / "up:per", tmp_path / "low,er"
    (upper / "d").mkdir(parents=True)
    (lower / "d").mkdir(parents=True)
    (upper / "d" / "u").write_text("upper")
    (lower / "d" / "l").write_text("lower")
    (upper / "both").write_text("from upper")
    (lower / "both").write_text("from lower")
    with mount_overlay([upper, lower]) as mnt:
        assert sorted(os.listdir(mnt / "d")) == ["l", "u"]
        assert (mnt / "both").read_text() == "from upper"
        with pytest.raises(OSError):
            (mnt / "new").write_text("read-only")
    with mount_overlay([lower]) as mnt:
        assert sorted(os.listdir(mnt)) == ["both", "d"]
    assert not mnt.exists()


def _upstream_mkcomposefs() -> Path:
    base = os.environ.get("COMPOSEFS_UPSTREAM")
    if not base:
        pytest.skip("COMPOSEFS_UPSTREAM is not set (upstream composefs tools are not in CI)")
    tool = Path(base) / "build" / "tools" / "mkcomposefs"
    if not tool.exists():
        pytest.skip(f"{tool} is missing")
    return tool


@pytest.mark.root
@pytest.mark.parametrize("which", ["full", "random-1", "random-2", "random-3"])
def test_expected_tree_matches_mkcomposefs_of_the_disk_tree(which: str, tmp_path: Path) -> None:
    """mkcomposefs 1.0.8 of the created directory = our writer on the expected Tree.

    mkcomposefs 1.0.8 does not detect hardlinks from a directory, so they are left out.
    """
    mkcomposefs = _upstream_mkcomposefs()
    spec = full_coverage_spec() if which == "full" else random_spec(int(which[-1]), 300)
    spec = TreeSpec([e for e in spec.entries if e.kind != "hardlink"])
    src = make_disk_tree(tmp_path / "src", spec)
    image = tmp_path / "image"
    subprocess.run(
        [str(mkcomposefs), f"--digest-store={tmp_path / 'objects'}", str(src), str(image)],
        check=True,
    )
    assert image.read_bytes() == write_image(spec_to_tree(spec))
    shutil.rmtree(tmp_path / "objects")

"""Scanning a directory into a tree (csi.image.fromdir)."""

from __future__ import annotations

import importlib.util
import os
import random
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from csi.image.fromdir import ScanOptions, scan_directory
from csi.image.fsverity import digest_bytes
from csi.image.tree import HardLink, Node, Tree, object_path

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (mknod, chown, trusted.*)")
NS = 1_234_567_891_987_654_321  # an mtime with nanoseconds
SPACED = b"name with space\n\xff"


def _file(path: Path, data: bytes, mtime_ns: int = NS) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def _entry(tree: Tree, path: str) -> Node | HardLink:
    parent, _, name = path.rstrip("/").rpartition("/")
    d = tree.lookup(parent or "/")
    assert d.entries is not None
    return d.entries[os.fsencode(name)]


def make_tree(top: Path) -> dict[str, bytes]:
    """Every kind of entry that needs no privileges; returns the file contents."""
    files = {
        "d/inline": b"abc",
        "d/inline64": b"6" * 64,
        "d/ext65": b"e" * 65,
        "d/empty": b"",
        "d/big": random.Random(1).randbytes(3 * 1024 * 1024 + 5),
        "d/sub/copy-of-ext65": b"e" * 65,
        os.fsdecode(SPACED): b"x" * 100,
        "hl/one": b"hardlinked content, longer than sixty-four bytes ......................",
    }
    (top / "d" / "sub").mkdir(parents=True)
    (top / "hl" / "deeper").mkdir(parents=True)
    for rel, data in files.items():
        _file(top / rel, data)
    os.link(top / "hl/one", top / "hl/two")
    os.link(top / "hl/one", top / "hl/deeper/three")
    os.link(top / "hl/one", top / "a-first")
    os.symlink("d/inline", top / "link")
    os.symlink("t" * 3000, top / "longlink")
    os.mkfifo(top / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(top / "sock"))
    os.setxattr(top / "d/inline", "user.k", b"v\x00=")
    os.setxattr(top / "d", "user.dir", b"")
    if IS_ROOT:
        os.setxattr(top / "link", "trusted.on-link", b"1", follow_symlinks=False)
    os.chmod(top / "d/inline", 0o4750)
    os.utime(top / "link", ns=(NS, NS), follow_symlinks=False)
    for d in ("d/sub", "d", "hl/deeper", "hl"):
        os.utime(top / d, ns=(NS + 1, NS + 1))
    return files


def test_every_kind_field_by_field(tmp_path: Path) -> None:
    files = make_tree(tmp_path)
    calls: list[tuple[int, int]] = []
    res = scan_directory(tmp_path, ScanOptions(), lambda f, b: calls.append((f, b)))
    t = res.tree
    t.validate()

    sec, nsec = divmod(NS, 1_000_000_000)
    inline = t.lookup("/d/inline")
    assert inline.mode == stat.S_IFREG | 0o4750
    assert (inline.size, inline.content, inline.digest, inline.payload) == (3, b"abc", None, None)
    assert (inline.mtime_sec, inline.mtime_nsec) == (sec, nsec)
    assert inline.xattrs == {b"user.k": b"v\x00="}
    assert t.lookup("/d/inline64").content == b"6" * 64
    empty = t.lookup("/d/empty")
    assert (empty.size, empty.content, empty.digest, empty.payload) == (0, None, None, None)

    ext = t.lookup("/d/ext65")
    assert ext.is_external and ext.content is None
    assert ext.digest == digest_bytes(b"e" * 65)
    assert ext.payload == object_path(ext.digest)
    big = t.lookup("/d/big")
    assert big.digest == digest_bytes(files["d/big"]) and big.size == len(files["d/big"])

    d = t.lookup("/d")
    assert d.is_dir and d.nlink == 3 and d.size == 0 and d.xattrs == {b"user.dir": b""}
    assert (d.mtime_sec, d.mtime_nsec) == divmod(NS + 1, 1_000_000_000)
    assert t.root.nlink == 2 + 2  # d, hl

    link = t.lookup("/link")
    assert link.is_symlink and link.payload == b"d/inline" and link.size == 8
    assert (link.mtime_sec, link.mtime_nsec) == (sec, nsec)
    if IS_ROOT:
        assert link.xattrs == {b"trusted.on-link": b"1"}
    assert t.lookup("/longlink").payload == b"t" * 3000
    assert t.lookup("/fifo").file_type == stat.S_IFIFO
    assert t.lookup("/sock").file_type == stat.S_IFSOCK
    assert t.lookup(b"/" + SPACED).size == 100

    # Hard links: one node, primary = first in breadth-first sorted order (/a-first).
    primary = _entry(t, "/a-first")
    assert isinstance(primary, Node) and primary.nlink == 4
    for name in ("/hl/one", "/hl/two", "/hl/deeper/three"):
        other = _entry(t, name)
        assert isinstance(other, HardLink) and other.target is primary

    # Objects: one per distinct external content; copies and hard links hashed once.
    digests = [o[0] for o in res.objects]
    assert len(digests) == len(set(digests)) == 4  # ext65, big, spaced name, hl
    by_digest = {o[0]: o for o in res.objects}
    assert by_digest[ext.digest][2] == 65
    assert Path(by_digest[big.digest][1]).read_bytes() == files["d/big"]
    assert res.files == len(files) and res.bytes == sum(len(v) for v in files.values())
    # progress: monotonic, ending with every external inode hashed.
    assert calls == sorted(calls)
    ext_inodes = [n for n in (ext, big, t.lookup("/d/sub/copy-of-ext65"), primary)]
    ext_inodes.append(t.lookup(b"/" + SPACED))
    assert calls[-1] == (len(ext_inodes), sum(n.size for n in ext_inodes))


@needs_root
def test_devices_owner_whiteouts_trusted(tmp_path: Path) -> None:
    os.mknod(tmp_path / "chr", stat.S_IFCHR | 0o620, os.makedev(4, 64))
    os.mknod(tmp_path / "blk", stat.S_IFBLK | 0o600, os.makedev(259, 1 << 19))
    os.mknod(tmp_path / "wh", stat.S_IFCHR | 0o600, 0)
    _file(tmp_path / "owned", b"x")
    os.chown(tmp_path / "owned", 4_000_000_000, 70_000)
    os.setxattr(tmp_path / "owned", "trusted.overlay.opaque", b"y")
    os.setxattr(tmp_path / "owned", "security.test", b"s")
    t = scan_directory(tmp_path).tree
    chr_ = t.lookup("/chr")
    assert chr_.file_type == stat.S_IFCHR and chr_.rdev == os.makedev(4, 64)
    blk = t.lookup("/blk")
    assert blk.file_type == stat.S_IFBLK and blk.rdev == os.makedev(259, 1 << 19) & 0xFFFFFFFF
    assert t.lookup("/wh").is_whiteout
    owned = t.lookup("/owned")
    assert (owned.uid, owned.gid) == (4_000_000_000, 70_000)
    assert owned.xattrs == {b"trusted.overlay.opaque": b"y", b"security.test": b"s"}


def test_options(tmp_path: Path) -> None:
    make_tree(tmp_path)
    epoch = scan_directory(tmp_path, ScanOptions(use_epoch=True)).tree
    assert {(n.mtime_sec, n.mtime_nsec) for _, e in epoch.walk() for n in [_node(e)]} == {(0, 0)}

    none = scan_directory(tmp_path, ScanOptions(xattrs="none")).tree
    assert all(not _node(e).xattrs for _, e in none.walk())
    if IS_ROOT:
        os.setxattr(tmp_path / "d/ext65", "trusted.x", b"1")
    user = scan_directory(tmp_path, ScanOptions(xattrs="user")).tree
    assert all(k.startswith(b"user.") for _, e in user.walk() for k in _node(e).xattrs)
    assert user.lookup("/d/inline").xattrs == {b"user.k": b"v\x00="}

    flat = scan_directory(tmp_path, ScanOptions(hardlinks=False)).tree
    for name in ("/a-first", "/hl/one", "/hl/two", "/hl/deeper/three"):
        e = _entry(flat, name)
        assert isinstance(e, Node) and e.nlink == 1 and e.digest is not None

    wide = scan_directory(tmp_path, ScanOptions(inline_max=100)).tree
    assert wide.lookup("/d/ext65").content == b"e" * 65
    assert wide.lookup(b"/" + SPACED).content == b"x" * 100
    narrow = scan_directory(tmp_path, ScanOptions(inline_max=0))
    assert narrow.tree.lookup("/d/inline").digest == digest_bytes(b"abc")
    assert narrow.tree.lookup("/d/inline").content is None

    nodigest = scan_directory(tmp_path, ScanOptions(compute_digest=False))
    assert nodigest.objects == []
    big = nodigest.tree.lookup("/d/big")
    assert big.is_external and big.digest is None and big.payload is None

    with pytest.raises(ValueError):
        scan_directory(tmp_path, ScanOptions(inline_max=5001))
    with pytest.raises(NotADirectoryError):
        scan_directory(tmp_path / "d/inline")


def _node(e: Node | HardLink) -> Node:
    return e.target if isinstance(e, HardLink) else e


def test_threads_give_the_same_result(tmp_path: Path) -> None:
    rng = random.Random(7)
    for i in range(60):
        _file(tmp_path / f"f{i:02d}", rng.randbytes(rng.choice([65, 4096, 70000, 300000])))
    one = scan_directory(tmp_path, ScanOptions(threads=1))
    many = scan_directory(tmp_path, ScanOptions(threads=5))
    assert one.objects == many.objects
    for i in range(60):
        data = (tmp_path / f"f{i:02d}").read_bytes()
        assert many.tree.lookup(f"/f{i:02d}").digest == digest_bytes(data)


@needs_root
@pytest.mark.root
def test_one_file_system(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    _file(tmp_path / "here", b"h")
    try:
        subprocess.run(["mount", "-t", "tmpfs", "none", str(tmp_path / "mnt")], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("cannot mount tmpfs")
    try:
        _file(tmp_path / "mnt" / "there", b"t")
        everything = scan_directory(tmp_path).tree
        assert everything.lookup("/mnt/there").content == b"t"
        local = scan_directory(tmp_path, ScanOptions(one_file_system=True)).tree
        assert local.lookup("/mnt").entries == {}
        assert local.lookup("/here").content == b"h"
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], check=True)


# --------------------------------------------------------------------------- mkcomposefs (local)

UPSTREAM = os.environ.get("COMPOSEFS_UPSTREAM")


def _random_tree(top: Path, seed: int) -> None:
    rng = random.Random(seed)
    dirs = [top]
    for i in range(rng.randint(20, 80)):
        parent = rng.choice(dirs)
        name = parent / f"e{i}-{rng.randbytes(3).hex()}"
        kind = rng.random()
        if kind < 0.2:
            name.mkdir()
            dirs.append(name)
        elif kind < 0.8:
            _file(
                name,
                rng.randbytes(rng.choice([0, 1, 64, 65, 5000, 100_000])),
                rng.randrange(10**18),
            )
        elif kind < 0.9:
            os.symlink("x" * rng.randint(1, 4000), name)
        else:
            os.setxattr(parent, f"user.x{i}", rng.randbytes(rng.randint(0, 200)))
    for d in dirs:
        os.utime(d, ns=(NS, NS))


@pytest.mark.skipif(not UPSTREAM, reason="COMPOSEFS_UPSTREAM not set (upstream mkcomposefs)")
@pytest.mark.parametrize(
    ("case", "flags", "opts"),
    [
        ("every-kind", [], {}),
        ("every-kind", ["--use-epoch"], {"use_epoch": True}),
        ("every-kind", ["--user-xattrs"], {"xattrs": "user"}),
        ("every-kind", ["--skip-xattrs"], {"xattrs": "none"}),
        ("random-1", [], {}),
        ("random-2", [], {}),
        ("random-3", ["--use-epoch"], {"use_epoch": True}),
    ],
)
def test_image_equals_mkcomposefs(
    tmp_path: Path, case: str, flags: list[str], opts: dict[str, object]
) -> None:
    if importlib.util.find_spec("csi.image.writer") is None:
        pytest.skip("csi.image.writer not written yet")
    from csi.image.writer import write_image

    src = tmp_path / "src"
    src.mkdir()
    if case == "every-kind":
        make_tree(src)
        if IS_ROOT:
            os.mknod(src / "chr", stat.S_IFCHR | 0o620, os.makedev(4, 64))
            os.mknod(src / "wh", stat.S_IFCHR | 0o600, 0)
            os.chown(src / "d/big", 1000, 1000)
            os.setxattr(src / "d/big", "trusted.overlay.redirect", b"/x")
    else:
        _random_tree(src, int(case.rsplit("-", 1)[1]))
    os.utime(src, ns=(NS, NS))
    store = tmp_path / "store"
    img = tmp_path / "img"
    tool = str(Path(UPSTREAM or "") / "build" / "tools" / "mkcomposefs")
    subprocess.run([tool, f"--digest-store={store}", *flags, str(src), str(img)], check=True)
    res = scan_directory(src, ScanOptions(hardlinks=False, **opts))  # type: ignore[arg-type]
    assert write_image(res.tree) == img.read_bytes()
    stored = {p.parent.name + p.name for p in store.glob("*/*")}
    assert stored == {o[0].hex() for o in res.objects}

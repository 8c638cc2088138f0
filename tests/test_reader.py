"""Tests of the composefs image reader (csi/image/reader.py).

Images are made with our writer (csi.image.writer) from trees built here or in
tests/writer_trees.py; the tests that compare with the upstream C tools need
COMPOSEFS_UPSTREAM (the unpacked composefs 1.0.8 source with built tools).
"""

from __future__ import annotations

import gzip
import os
import stat
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from csi.image.errors import FormatError
from csi.image.reader import Image
from csi.image.tree import HardLink, Node, Tree, object_path, resolve
from tests import writer_trees as wt

ROOT_NID = 36


def write(tree: Tree, min_version: int = 0, max_version: int = 1) -> bytes:
    try:
        from csi.image.writer import write_image
    except ImportError:  # pragma: no cover - only while the writer is being written
        pytest.skip("csi.image.writer is not available yet")
    return write_image(tree, min_version=min_version, max_version=max_version)


# -- structural comparison ---------------------------------------------------------------------

_WHITEOUT_KEYS = (b"trusted.overlay.whiteout", b"user.overlay.whiteout")
_DIR_MARKERS = (
    b"trusted.overlay.whiteouts",
    b"user.overlay.whiteouts",
    b"trusted.overlay.opaque",
    b"user.overlay.opaque",
)


def _is_whiteout(n: Node) -> bool:
    return stat.S_ISCHR(n.mode) and n.rdev == 0


def canon(tree: Tree) -> dict[bytes, tuple[Any, ...]]:
    """What a tree means for an image: fields the writer keeps, hard links as name groups.

    Fields the writer recomputes or drops (directory size and nlink, symlink size, the size of
    devices, the overlay markers it overwrites) are normalised away.
    """
    names: dict[int, list[bytes]] = {}
    for path, entry in tree.walk():
        names.setdefault(id(resolve(entry)), []).append(path)
    marked: set[int] = set()
    for path, node in tree.bfs():
        if _is_whiteout(node):
            parent = path.rsplit(b"/", 1)[0] or b"/"
            marked.add(id(tree.lookup(parent)))
    out: dict[bytes, tuple[Any, ...]] = {}
    for path, entry in tree.walk():
        n = resolve(entry)
        x = dict(n.xattrs)
        if _is_whiteout(n):
            for k in _WHITEOUT_KEYS:
                x.pop(k, None)
        if id(n) in marked:
            for k in _DIR_MARKERS:
                x.pop(k, None)
        size: Any = n.size
        if not n.is_reg:
            # Recomputed (directories), taken from the target (symlinks), or never stored
            # (devices: only "above 2^32-1" can show, as an extended inode; the byte-exact
            # rewrite checks that).
            size = None
        out[path] = (
            n.mode,
            n.uid,
            n.gid,
            None if n.is_dir else n.nlink,
            n.mtime_sec,
            n.mtime_nsec,
            size,
            n.rdev if stat.S_ISCHR(n.mode) or stat.S_ISBLK(n.mode) else 0,
            n.payload or None,
            n.content or None,
            n.digest,
            sorted(x.items()),
            tuple(sorted(names[id(n)])),
        )
    return out


def assert_round_trip(tree: Tree, min_version: int = 0, max_version: int = 1) -> Image:
    data = write(tree, min_version, max_version)
    img = Image(data)
    img.validate()
    back = img.to_tree()
    back.validate()
    assert canon(back) == canon(tree)
    v = img.version
    assert write(back, v, v) == data
    assert write(img.to_tree(keep_opaque_markers=True), v, v) == data
    return img


@pytest.mark.parametrize("name", sorted(wt.TREES))
def test_round_trip_writer_trees(name: str) -> None:
    assert_round_trip(wt.TREES[name]())


@pytest.mark.parametrize("name", ["whiteouts", "names_order", "random_1"])
def test_round_trip_version_pinned(name: str) -> None:
    for v in (0, 1):
        img = assert_round_trip(wt.TREES[name](), v, v)
        assert img.version == v


# -- a tree exercising the presented view ------------------------------------------------------

SELINUX = b"system_u:object_r:root_t:s0\x00"
DIGEST = bytes(range(32))


def view_tree() -> Tree:
    root = wt.d()
    root.xattrs[b"security.selinux"] = SELINUX
    a = wt.reg(b"hello\n", nlink=2)
    root.add(b"a.txt", a)
    root.add(b"hl", HardLink(a))
    big = Node(mode=stat.S_IFREG | 0o644, size=10_000_000, mtime_sec=wt.T0[0])
    big.digest, big.payload = DIGEST, object_path(DIGEST)
    root.add(b"big", big)
    other = bytes(reversed(range(32)))
    root.add(b"nodigest", Node(mode=stat.S_IFREG | 0o600, size=100, payload=object_path(other)))
    root.add(b"nopayload", Node(mode=stat.S_IFREG | 0o600, size=100, digest=b"\x07" * 32))
    root.add(b"odd-payload", Node(mode=stat.S_IFREG | 0o600, size=100, payload=b"not/an/object"))
    sub = wt.d()
    root.add(b"dir", sub)
    sub.add(b"wh", wt.special(stat.S_IFCHR, rdev=0, perm=0o600))
    f = wt.reg(b"f")
    f.xattrs.update({b"trusted.overlay.foo": b"1", b"user.x": b"2", b"trusted.plain": b"3"})
    sub.add(b"f", f)
    sub.add(b"dev", wt.special(stat.S_IFCHR, rdev=(4 << 8) | 1))
    root.add(b"sym", wt.link(b"a.txt"))
    root.add(b"longsym", wt.link(b"x/" * 2045))
    for size in (3000, 4500, 5000):
        data = bytes((i * 7 + size) % 251 for i in range(size))
        root.add(b"inl%d" % size, wt.reg(data, inline_max=10_000))
    many = wt.d()
    root.add(b"many", many)
    for i in range(600):
        many.add(b"entry-%04d-%s" % (i, b"x" * (i % 40)), wt.reg(b""))
    return Tree(root)


@pytest.fixture(scope="module")
def view() -> tuple[Tree, Image]:
    tree = view_tree()
    return tree, Image(write(tree))


def test_superblock_fields(view: tuple[Tree, Image]) -> None:
    _, img = view
    assert img.version == 1  # the whiteout bumps the version
    assert img.root_nid == ROOT_NID
    assert img.build_time == (0, 0)
    assert img.blocks * 4096 == img.size
    # BFS nodes: every primary name + root + the 256 stubs minus names that exist ("00"..).
    assert img.inode_count == img.statfs()[1]
    root = img.getattr(ROOT_NID)
    assert (root.ino, root.nid, root.i_ino) == (ROOT_NID, ROOT_NID, 0)
    assert stat.S_ISDIR(root.mode) and root.size == 4096 * (root.size // 4096) + root.size % 4096


def test_readdir_hides_dots_and_whiteout_stubs(view: tuple[Tree, Image]) -> None:
    tree, img = view
    assert tree.root.entries is not None
    names = [name for name, _, _ in img.readdir(ROOT_NID)]
    assert names == sorted(tree.root.entries)
    raw = [name for name, _, _ in img.raw_dirents(ROOT_NID)]
    assert b"." in raw and b".." in raw
    assert sum(1 for n in raw if len(n) == 2 and n in {b"%02x" % i for i in range(256)}) == 256
    assert img.lookup(ROOT_NID, b"00") is None
    stub = img.raw_lookup(ROOT_NID, b"00")
    assert stub is not None
    a = img.getattr(stub)
    assert (a.mode, a.rdev) == (stat.S_IFCHR | 0o644, 0)
    assert img.getxattr(stub, b"security.selinux") == SELINUX
    assert img.lookup(ROOT_NID, b".") is None and img.raw_lookup(ROOT_NID, b".") == ROOT_NID
    assert img.raw_lookup(ROOT_NID, b"..") == ROOT_NID


def test_lookup_and_types(view: tuple[Tree, Image]) -> None:
    _, img = view
    entries = {name: (nid, ft) for name, nid, ft in img.readdir(ROOT_NID)}
    for name, (nid, ft) in entries.items():
        assert img.lookup(ROOT_NID, name) == nid
        a = img.getattr(nid)
        assert a.ino == nid
        assert {1: stat.S_IFREG, 2: stat.S_IFDIR, 7: stat.S_IFLNK}[ft] == stat.S_IFMT(a.mode)
    assert entries[b"hl"][0] == entries[b"a.txt"][0]
    assert img.getattr(entries[b"hl"][0]).nlink == 2
    assert img.lookup(ROOT_NID, b"missing") is None
    assert img.lookup(ROOT_NID, b"") is None
    assert img.lookup(ROOT_NID, b"\xff" * 300) is None


def test_big_directory_lookup_and_cookies(view: tuple[Tree, Image]) -> None:
    tree, img = view
    many = img.lookup(ROOT_NID, b"many")
    assert many is not None
    assert img.getattr(many).size > 3 * 4096  # several blocks
    full = list(img.readdir(many))
    expected = sorted(tree.lookup(b"/many").entries or {})
    assert [n for n, _, _ in full] == expected
    for name, nid, _ in full:
        assert img.lookup(many, name) == nid
    for probe in (b"entry-", b"entry-0300", b"zzz", b"a", b"entry-0599-" + b"x" * 40):
        assert img.lookup(many, probe) is None
    plus = list(img.readdir_plus(many))
    assert [p[3] for p in plus] == list(range(1, len(full) + 1))
    for off in [*range(0, 20), 150, 299, 300, 301, 598, 599, 600, 601, 10_000]:
        assert list(img.readdir(many, off)) == full[off:]
    # A fresh image (no cached index) resumes the same way.
    fresh = Image(write(tree))
    assert list(fresh.readdir(many, 333)) == full[333:]
    with pytest.raises(ValueError):
        list(img.readdir(many, -1))


def test_escaped_whiteout_presented(view: tuple[Tree, Image]) -> None:
    _, img = view
    d = img.lookup(ROOT_NID, b"dir")
    assert d is not None
    names = [n for n, _, _ in img.readdir(d)]
    assert names == [b"dev", b"f", b"wh"]  # an escaped whiteout is a regular file
    wh = img.lookup(d, b"wh")
    assert wh is not None
    a = img.getattr(wh)
    assert (a.mode, a.size) == (stat.S_IFREG | 0o600, 0)
    assert img.getxattr(wh, b"trusted.overlay.whiteout") == b""
    assert img.getxattr(wh, b"user.overlay.whiteout") == b""
    assert sorted(img.listxattr(d)) == [
        b"trusted.overlay.opaque",
        b"trusted.overlay.whiteouts",
        b"user.overlay.opaque",
        b"user.overlay.whiteouts",
    ]
    assert img.getxattr(d, b"trusted.overlay.opaque") == b"x"
    dev = img.lookup(d, b"dev")
    assert dev is not None and img.getattr(dev).rdev == (4 << 8) | 1


def test_xattr_views(view: tuple[Tree, Image]) -> None:
    _, img = view
    assert img.listxattr(ROOT_NID) == [b"security.selinux"]
    raw_root = dict(img.raw_xattrs(ROOT_NID))
    assert raw_root[b"trusted.overlay.opaque"] == b"y"
    assert img.getxattr(ROOT_NID, b"trusted.overlay.opaque") is None
    d = img.lookup(ROOT_NID, b"dir")
    assert d is not None
    f = img.lookup(d, b"f")
    assert f is not None
    raw = dict(img.raw_xattrs(f))
    assert raw[b"trusted.overlay.overlay.foo"] == b"1"
    assert sorted(img.listxattr(f)) == [b"trusted.overlay.foo", b"trusted.plain", b"user.x"]
    assert img.getxattr(f, b"trusted.overlay.foo") == b"1"
    assert img.getxattr(f, b"trusted.overlay.overlay.foo") is None
    assert img.getxattr(f, b"trusted.plain") == b"3"
    assert img.getxattr(f, b"user.missing") is None
    big = img.lookup(ROOT_NID, b"big")
    assert big is not None
    assert img.listxattr(big) == []
    assert img.getxattr(big, b"trusted.overlay.metacopy") is None
    assert {k for k, _ in img.raw_xattrs(big)} == {
        b"trusted.overlay.metacopy",
        b"trusted.overlay.redirect",
    }


def test_raw_xattrs_inline_first_then_shared() -> None:
    root = wt.d()
    for i in range(3):
        f = wt.reg(b"%d" % i)
        f.xattrs[b"user.a-shared"] = b"same"
        f.xattrs[b"user.z-own"] = b"own %d" % i
        root.add(b"f%d" % i, f)
    img = Image(write(Tree(root)))
    nid = img.lookup(ROOT_NID, b"f1")
    assert nid is not None
    assert img.raw_xattrs(nid) == [(b"user.z-own", b"own 1"), (b"user.a-shared", b"same")]
    back = img.to_tree()
    assert list(back.lookup(b"/f1").xattrs) == [b"user.z-own", b"user.a-shared"]


def test_file_data_and_links(view: tuple[Tree, Image]) -> None:
    tree, img = view
    for size in (3000, 4500, 5000):
        nid = img.lookup(ROOT_NID, b"inl%d" % size)
        assert nid is not None
        content = tree.lookup(b"/inl%d" % size).content
        assert content is not None
        assert img.read_inline(nid, 0, size + 100) == content
        for off, ln in ((0, 1), (4095, 2), (4096, 10), (size - 5, 100), (size, 10), (1, 0)):
            assert img.read_inline(nid, off, ln) == content[off : off + ln]
    a = img.lookup(ROOT_NID, b"a.txt")
    assert a is not None and img.read_inline(a, 0, 100) == b"hello\n"
    sym = img.lookup(ROOT_NID, b"sym")
    longsym = img.lookup(ROOT_NID, b"longsym")
    assert sym is not None and longsym is not None
    assert img.readlink(sym) == b"a.txt"
    assert img.readlink(longsym) == b"x/" * 2045
    assert img.getattr(longsym).layout == 0
    big = img.lookup(ROOT_NID, b"big")
    assert big is not None
    assert img.getattr(big).layout == 4 and img.getattr(big).size == 10_000_000
    with pytest.raises(FormatError):
        img.read_inline(big, 0, 10)
    with pytest.raises(FormatError):
        img.readlink(a)
    with pytest.raises(FormatError):
        list(img.readdir(a))


def test_backing_and_objects(view: tuple[Tree, Image]) -> None:
    _, img = view

    def nid(name: bytes) -> int:
        n = img.lookup(ROOT_NID, name)
        assert n is not None
        return n

    assert img.backing(nid(b"big")) == (object_path(DIGEST), DIGEST)
    other = bytes(reversed(range(32)))
    assert img.backing(nid(b"nodigest")) == (object_path(other), None)
    assert img.backing(nid(b"nopayload")) == (b"", b"\x07" * 32)
    assert img.backing(nid(b"odd-payload")) == (b"not/an/object", None)
    assert img.backing(nid(b"a.txt")) is None
    assert img.backing(ROOT_NID) is None
    refs = sorted(img.object_refs())
    assert len(refs) == 4
    assert img.object_digests() == {DIGEST, other, b"\x07" * 32}
    # one walk gives the same digests, each with the size its inode declares
    expected: dict[bytes, int] = {}
    for n, payload, d in refs:
        d = d or (
            bytes.fromhex((payload[:2] + payload[3:]).decode()) if payload[2:3] == b"/" else None
        )
        if d is not None:
            expected[d] = max(expected.get(d, -1), img.getattr(n).size)
    assert img.object_sizes() == expected
    assert img.object_sizes()[DIGEST] == 10_000_000


def test_to_tree_undoes_rewriting(view: tuple[Tree, Image]) -> None:
    tree, img = view
    back = img.to_tree()
    assert back.root.entries is not None
    assert not any(len(n) == 2 and n[0:1] in b"0123456789abcdef" for n in back.root.entries)
    assert back.root.xattrs == {b"security.selinux": SELINUX}
    wh = back.lookup(b"/dir/wh")
    assert (wh.mode, wh.rdev, wh.xattrs) == (stat.S_IFCHR | 0o600, 0, {})
    assert back.lookup(b"/dir").xattrs == {}
    f = back.lookup(b"/dir/f")
    assert f.xattrs == {b"trusted.overlay.foo": b"1", b"user.x": b"2", b"trusted.plain": b"3"}
    big = back.lookup(b"/big")
    assert (big.payload, big.digest, big.content, big.xattrs) == (
        object_path(DIGEST),
        DIGEST,
        None,
        {},
    )
    assert back.lookup(b"/many").size == img.getattr(img.lookup(ROOT_NID, b"many") or 0).size
    assert isinstance(back.root.entries[b"hl"], HardLink)
    assert back.root.entries[b"hl"].target is back.root.entries[b"a.txt"]
    assert canon(back) == canon(tree)


def test_stub_shape_is_checked() -> None:
    # A user directory "00" suppresses the stub; a chardev 0/0 named "0a" is a user whiteout
    # (escaped), so only real stubs disappear.
    root = wt.d(uid=5, gid=6)
    root.add(b"00", wt.d())
    root.add(b"0a", wt.special(stat.S_IFCHR, rdev=0, uid=5, gid=6))
    img = assert_round_trip(Tree(root))
    back = img.to_tree()
    assert back.root.entries is not None
    assert sorted(back.root.entries) == [b"00", b"0a"]
    assert back.root.xattrs == {}


def test_hardlink_primary_follows_i_ino() -> None:
    root = wt.d()
    a, z = wt.d(), wt.d()
    root.add(b"a", a)
    root.add(b"z", z)
    f = wt.reg(b"content", nlink=3)
    z.add(b"primary", f)  # primary deeper in BFS order than the links in /a
    a.add(b"link", HardLink(f))
    root.add(b"zz-link", HardLink(f))
    img = assert_round_trip(Tree(root))
    back = img.to_tree()
    target = back.lookup(b"/z/primary")
    assert back.root.entries is not None and back.root.entries[b"a"].entries is not None  # type: ignore[union-attr]
    # Both /a/link and /zz-link come before /z/primary breadth-first; the counter decides.
    primaries = {p for p, n in back.bfs() if n is target}
    assert len(primaries) == 1


def test_hardlink_primary_fallback_when_i_ino_does_not_fit() -> None:
    """Images not numbered breadth-first (e.g. composefs-rs v2): the first name met wins."""
    tree = wt.tree_hardlinks()
    data = bytearray(write(tree))
    img = Image(bytes(data))
    for nid in img.inodes():  # i_ino is at offset 20 in both inode formats
        struct.pack_into("<I", data, nid * 32 + 20, 7 if nid != ROOT_NID else 0)
    scrambled = Image(bytes(data))
    scrambled.validate()
    back = scrambled.to_tree()
    back.validate()
    assert canon(back) == canon(tree)
    # first met breadth-first: /link2 (root level) is the primary of the shared inline file
    assert back.root.entries is not None
    assert isinstance(back.root.entries[b"link2"], Node)


def test_version_field() -> None:
    data = bytearray(write(wt.tree_basic()))
    for v in (0, 1, 2):
        struct.pack_into("<I", data, 12, v)
        img = Image(bytes(data))
        assert img.version == v
        img.validate()
    struct.pack_into("<I", data, 12, 2)
    back = Image(bytes(data)).to_tree()  # v2 images have no stubs: chr 0/0 entries are kept
    assert back.root.entries is not None and b"00" in back.root.entries


def test_signed_mtime_and_wrapping_chunk_count() -> None:
    root = wt.d()
    root.add(b"old", wt.reg(b"1969", mtime_sec=-86400, mtime_nsec=5))
    root.add(b"max", wt.external((1 << 64) - 1))  # chunk count wraps in 64-bit arithmetic
    img = assert_round_trip(Tree(root))
    assert img.build_time == (-86400, 5)
    old = img.lookup(ROOT_NID, b"old")
    big = img.lookup(ROOT_NID, b"max")
    assert old is not None and big is not None
    assert (img.getattr(old).mtime_sec, img.getattr(big).size) == (-86400, (1 << 64) - 1)


def test_deep_tree_and_wide_names() -> None:
    root = wt.d()
    cur = root
    for i in range(200):
        nxt = wt.d()
        cur.add(b"d%d" % i, nxt)
        cur = nxt
    cur.add(b"n" * 255, wt.reg(b"leaf"))
    img = assert_round_trip(Tree(root))
    nid = ROOT_NID
    for i in range(200):
        found = img.lookup(nid, b"d%d" % i)
        assert found is not None
        nid = found
    assert img.lookup(nid, b"n" * 255) is not None


def test_open_mmap_and_close(tmp_path: Path, view: tuple[Tree, Image]) -> None:
    tree, _ = view
    p = tmp_path / "img"
    p.write_bytes(write(tree))
    with Image.open(p) as img:
        img.validate()
        assert [n for n, _, _ in img.readdir(ROOT_NID)] == sorted(tree.root.entries or {})
        assert canon(img.to_tree()) == canon(tree)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(FormatError):
        Image.open(empty)
    assert Image(memoryview(p.read_bytes())).root_nid == ROOT_NID
    assert Image(bytearray(p.read_bytes())).root_nid == ROOT_NID


# -- malformed images: every check names the problem -------------------------------------------


def _basic() -> tuple[bytearray, Image]:
    data = write(wt.tree_basic())
    return bytearray(data), Image(data)


def _dirent_loc(img: Image, dir_nid: int, name: bytes) -> tuple[int, int]:
    """``(block offset, dirent offset)`` of the dirent for ``name`` (reader's block map)."""
    for start, blen in img._dir_blocks(img._inode(dir_nid)):
        count = img._block_count(dir_nid, start, blen)
        for i in range(count):
            if img._block_name(dir_nid, start, blen, count, i) == name:
                return start, start + 12 * i
    raise KeyError(name)


def _dirent_off(img: Image, dir_nid: int, name: bytes) -> int:
    return _dirent_loc(img, dir_nid, name)[1]


def _inode_off(nid: int) -> int:
    return nid * 32


def _expect(
    data: bytes | bytearray, match: str, *, lazy: Callable[[Image], object] | None = None
) -> None:
    with pytest.raises(FormatError, match=match):
        img = Image(bytes(data))
        if lazy is not None:
            lazy(img)
        img.validate()


def test_bad_header_and_superblock() -> None:
    data, _ = _basic()
    for off, fmt, value, match in [
        (0, "<I", 0x12345678, "composefs magic"),
        (4, "<I", 2, "header version"),
        (12, "<I", 3, "format version 3"),
        (1024, "<I", 0, "superblock magic"),
        (1024 + 12, "<B", 13, "block size"),
        (1024 + 80, "<I", 0x2, "incompatible features"),
        (1024 + 36, "<I", 0xFFFFFF, "truncated"),
        (1024 + 40, "<I", 0xFFFFFF, "meta_blkaddr"),
        (1024 + 44, "<I", 0xFFFFFF, "xattr_blkaddr"),
        (1024 + 14, "<H", 0xFFFF, "past end"),
    ]:
        bad = bytearray(data)
        struct.pack_into(fmt, bad, off, value)
        _expect(bad, match)
    _expect(data[:1000], "too small")
    _expect(data[:8192], "truncated")


def test_root_must_be_directory() -> None:
    data, img = _basic()
    f = img.lookup(ROOT_NID, b"file.txt")
    assert f is not None
    struct.pack_into("<H", data, 1024 + 14, f)
    _expect(data, "not a directory")


def test_directory_cycle_and_dir_hardlink() -> None:
    data, img = _basic()
    sub = img.lookup(ROOT_NID, b"sub")
    assert sub is not None
    # /sub/link -> root: a directory reachable twice (and a file type mismatch first? no: fix ft)
    off = _dirent_off(img, sub, b"link")
    struct.pack_into("<QHBB", data, off, ROOT_NID, struct.unpack_from("<H", data, off + 8)[0], 2, 0)
    _expect(data, "reached twice")
    # A directory entry pointing to the directory itself, not under '.'.
    data, img = _basic()
    off = _dirent_off(img, sub, b"link")
    struct.pack_into("<Q", data, off, sub)
    data[off + 10] = 2
    _expect(data, "reached twice")


def test_dot_entries_checked() -> None:
    data, img = _basic()
    sub = img.lookup(ROOT_NID, b"sub")
    f = img.lookup(ROOT_NID, b"file.txt")
    assert sub is not None and f is not None
    off = _dirent_off(img, sub, b"..")
    struct.pack_into("<Q", data, off, sub)
    _expect(data, "'..' points")
    data, img = _basic()
    off = _dirent_off(img, sub, b".")
    struct.pack_into("<Q", data, off, ROOT_NID)
    _expect(data, "'.' points")


def test_dirent_checks() -> None:
    data, img = _basic()
    sub = img.lookup(ROOT_NID, b"sub")
    assert sub is not None
    off = _dirent_off(img, sub, b"fifo")
    bad = bytearray(data)
    bad[off + 10] = 1  # says regular file
    _expect(bad, "does not match")
    bad = bytearray(data)
    bad[off + 10] = 9
    _expect(bad, "bad file type", lazy=lambda i: list(i.readdir(sub)))
    bad = bytearray(data)
    struct.pack_into("<Q", bad, off, 1 << 40)
    _expect(bad, "past end")
    # nameoff going backwards, beyond the block, and a first nameoff not a multiple of 12
    first = _dirent_off(img, sub, b".")
    block = first - (first % 4096) if first >= 4096 else first
    n0 = struct.unpack_from("<H", data, first + 8)[0]
    bad = bytearray(data)
    struct.pack_into("<H", bad, first + 8, n0 + 1)
    _expect(bad, "nameoff", lazy=lambda i: list(i.raw_dirents(sub)))
    bad = bytearray(data)
    struct.pack_into("<H", bad, first + 12 + 8, n0 - 1)
    _expect(bad, "nameoff|name", lazy=lambda i: list(i.raw_dirents(sub)))
    bad = bytearray(data)
    struct.pack_into("<H", bad, first + 12 + 8, 60000)
    _expect(bad, "nameoff", lazy=lambda i: list(i.raw_dirents(sub)))
    del block
    # a name containing '/', and names out of order
    bad = bytearray(data)
    name_off = first + struct.unpack_from("<H", data, _dirent_off(img, sub, b"fifo") + 8)[0]
    name_off -= first - _dirent_off(img, sub, b".")  # nameoffs are block relative
    bad[name_off] = ord("/")
    _expect(bad, "invalid name|sorted", lazy=lambda i: list(i.raw_dirents(sub)))
    bad = bytearray(data)
    bad[name_off] = ord("z")
    _expect(bad, "sorted", lazy=lambda i: list(i.raw_dirents(sub)))


def test_inode_checks() -> None:
    data, img = _basic()
    f = img.lookup(ROOT_NID, b"file.txt")
    big = img.lookup(ROOT_NID, b"big")
    sub = img.lookup(ROOT_NID, b"sub")
    assert f is not None and big is not None and sub is not None
    link = img.lookup(sub, b"link")
    assert link is not None
    cases: list[tuple[int, int, str, int, str]] = [
        (f, 0, "<H", 0x20 | (img.getattr(f).layout << 1), "i_format"),
        (f, 0, "<H", 3 << 1, "data layout"),
        (f, 4, "<H", 0o170644, "file type"),
        (f, 2, "<H", 0xFFFF, "xattrs"),
        (link, 8, "<I", 0, "symlink size"),
        (link, 8, "<I", 5000, "symlink size"),
        (big, 16, "<I", 0x40, "chunk format"),
        (big, 8, "<I", 0xFFFFFFFF, "chunk"),  # size change: chunk count
    ]
    for nid, field, fmt, value, match in cases:
        bad = bytearray(data)
        struct.pack_into(fmt, bad, _inode_off(nid) + field, value)
        _expect(bad, match, lazy=lambda i, nid=nid: i.getattr(nid))
    # directory size beyond the image, flat data past the end
    bad = bytearray(data)
    struct.pack_into("<I", bad, _inode_off(sub) + 8, 1 << 30)
    _expect(bad, "past end", lazy=lambda i: i.getattr(sub))
    # blocks of a multi-block directory moved past the end
    data = bytearray(write(wt.tree_big_directories()))
    img = Image(bytes(data))
    many = img.lookup(ROOT_NID, b"many")
    assert many is not None
    struct.pack_into("<I", data, _inode_off(many) + 16, 1 << 20)
    _expect(data, "past end", lazy=lambda i: i.getattr(many))


def test_xattr_checks() -> None:
    root = wt.d()
    for i in range(2):
        f = wt.reg(b"x%d" % i)
        f.xattrs[b"user.shared"] = b"v"
        f.xattrs[b"user.own%d" % i] = b"w"
        root.add(b"f%d" % i, f)
    data = bytearray(write(Tree(root)))
    img = Image(bytes(data))
    f0 = img.lookup(ROOT_NID, b"f0")
    assert f0 is not None
    a = img.getattr(f0)
    xoff = _inode_off(f0) + (64 if a.mtime_sec != img.build_time[0] else 32)
    shared = data[xoff + 4]
    assert shared == 1
    entry = xoff + 12 + 4 * shared
    for off, fmt, value, match in [
        (xoff + 4, "<B", 200, "shared xattr ids"),
        (xoff + 12, "<I", 0xFFFFFF, "shared xattr id"),
        (entry + 1, "<B", 9, "prefix index"),
        (entry + 2, "<H", 5000, "out of bounds"),
        (entry, "<B", 200, "out of bounds"),
    ]:
        bad = bytearray(data)
        struct.pack_into(fmt, bad, off, value)
        _expect(bad, match, lazy=lambda i: i.raw_xattrs(f0))
    bad = bytearray(data)
    bad[entry + 4] = 0
    _expect(bad, "NUL", lazy=lambda i: i.listxattr(f0))
    bad = bytearray(data)
    struct.pack_into("<BB", bad, entry, 0, 0)
    _expect(bad, "empty xattr name|out of bounds|trailing", lazy=lambda i: i.raw_xattrs(f0))


def test_overlapping_directories_bounded() -> None:
    """Directories sharing one block range cannot make a whole-image walk quadratic."""
    data = bytearray(write(wt.tree_big_directories()))
    img = Image(bytes(data))
    many = img.lookup(ROOT_NID, b"many")
    long = img.lookup(ROOT_NID, b"long")
    assert many is not None and long is not None
    assert img.getattr(many).layout == 0  # all its dirents are in data blocks
    file0 = img.lookup(many, b"entry-0000")
    assert file0 is not None
    # Turn many's '.' and '..' into file entries ('+', '+-' keep the names sorted).
    for name, new in ((b".", b"+"), (b"..", b"+-")):
        block, off = _dirent_loc(img, many, name)
        nameoff = struct.unpack_from("<H", data, off + 8)[0]
        data[block + nameoff : block + nameoff + len(new)] = new
        struct.pack_into("<Q", data, off, file0)
        data[off + 10] = 1
    # Make every child of /long a copy of /many's inode: 40 directories, one block range.
    many_inode = bytes(data[_inode_off(many) : _inode_off(many) + 32])
    for name, child, _ in list(img.readdir(long)):
        data[_inode_off(child) : _inode_off(child) + 32] = many_inode
        _, off = _dirent_loc(img, long, name)
        data[off + 10] = 2
    bad = Image(bytes(data))
    assert len(list(bad.readdir(long))) == 40  # lazily, each directory reads fine
    with pytest.raises(FormatError, match="overlap"):
        bad.validate()
    with pytest.raises(FormatError, match="overlap"):
        bad.to_tree()


# -- against the upstream C tools --------------------------------------------------------------

UPSTREAM = os.environ.get("COMPOSEFS_UPSTREAM")
needs_upstream = pytest.mark.skipif(
    not UPSTREAM, reason="COMPOSEFS_UPSTREAM (composefs 1.0.8 source with built tools) not set"
)


def _assets() -> list[str]:
    if not UPSTREAM:
        return []
    d = Path(UPSTREAM) / "tests" / "assets"
    return sorted(
        p.name
        for p in d.iterdir()
        if (p.name.endswith(".dump") or p.name.endswith(".dump.gz"))
        and not p.name.startswith("should-fail")
    )


def _mkcomposefs(dump: bytes, out: Path, *args: str) -> bytes:
    assert UPSTREAM
    src = out.with_suffix(".dump")
    src.write_bytes(dump)
    tool = Path(UPSTREAM) / "build" / "tools" / "mkcomposefs"
    subprocess.run([str(tool), *args, "--from-file", str(src), str(out)], check=True)
    return out.read_bytes()


def _asset_image(name: str, tmp_path: Path) -> bytes:
    assert UPSTREAM
    raw = (Path(UPSTREAM) / "tests" / "assets" / name).read_bytes()
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
    return _mkcomposefs(raw, tmp_path / "img")


def _esc(b: bytes) -> str:
    return "".join(chr(c) if 0x21 <= c <= 0x7E and c not in b"\\=" else f"\\x{c:02x}" for c in b)


def tree_to_dump(tree: Tree) -> bytes:
    """A minimal composefs-dump writer (every odd byte as \\xHH), to feed mkcomposefs."""
    prim = tree.primary_paths()
    lines = []
    for path, e in tree.walk():
        n = resolve(e)
        if isinstance(e, HardLink):
            lines.append(f"{_esc(path)} 0 @{n.mode:o} 0 0 0 0 0.0 {_esc(prim[id(n)])} - -")
            continue
        size = len(n.payload or b"") if n.is_symlink else n.size
        fields = [
            _esc(path),
            str(size),
            f"{n.mode:o}",
            str(n.nlink),
            str(n.uid),
            str(n.gid),
            str(n.rdev),
            f"{n.mtime_sec}.{n.mtime_nsec}",
            _esc(n.payload) if n.payload else "-",
            _esc(n.content) if n.content else "-",
            n.digest.hex() if n.digest else "-",
            *(f"{_esc(k)}={_esc(v)}" for k, v in n.xattrs.items()),
        ]
        lines.append(" ".join(fields))
    return ("\n".join(lines) + "\n").encode()


@needs_upstream
@pytest.mark.parametrize("asset", _assets())
def test_upstream_assets_round_trip_through_mkcomposefs(asset: str, tmp_path: Path) -> None:
    data = _asset_image(asset, tmp_path)
    img = Image(data)
    img.validate()
    tree = img.to_tree()
    v = img.version
    again = _mkcomposefs(
        tree_to_dump(tree), tmp_path / "again", f"--min-version={v}", f"--max-version={v}"
    )
    assert again == data
    try:
        from csi.image.writer import write_image
    except ImportError:
        return
    assert write_image(tree, min_version=v, max_version=v) == data


def _unesc(s: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(s):
        c = s[i]
        if c == 0x5C:
            nx = s[i + 1 : i + 2]
            if nx == b"x":
                out.append(int(s[i + 2 : i + 4], 16))
                i += 4
                continue
            out += {b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t"}[nx]
            i += 2
            continue
        out.append(c)
        i += 1
    return bytes(out)


@needs_upstream
@pytest.mark.parametrize("asset", _assets())
def test_format_dump_of_tree_matches_composefs_info(asset: str, tmp_path: Path) -> None:
    """The tree (with the C reader's opaque markers) prints as composefs-info dump prints."""
    assert UPSTREAM
    try:
        from csi.image.dump import format_dump
    except ImportError:
        pytest.skip("csi.image.dump is not available yet")
    data = _asset_image(asset, tmp_path)
    tool = Path(UPSTREAM) / "build" / "tools" / "composefs-info"
    expected = subprocess.run(
        [str(tool), "dump", str(tmp_path / "img")], check=True, capture_output=True
    ).stdout
    assert format_dump(Image(data).to_tree(keep_opaque_markers=True)) == expected


@needs_upstream
@pytest.mark.parametrize(
    "asset", ["special.dump", "special_v1.dump", "config-with-hard-link.dump.gz", "longlink.dump"]
)
def test_matches_composefs_info_dump(asset: str, tmp_path: Path) -> None:
    """Our raw view agrees with what the C reader reconstructs, field by field."""
    assert UPSTREAM
    data = _asset_image(asset, tmp_path)
    tool = Path(UPSTREAM) / "build" / "tools" / "composefs-info"
    out = subprocess.run(
        [str(tool), "dump", str(tmp_path / "img")], check=True, capture_output=True
    ).stdout
    img = Image(data)
    tree = img.to_tree()
    nlinks = 0
    for line in out.splitlines():
        f = line.split(b" ")
        path = _unesc(f[0])
        node = tree.lookup(path)
        nid = _resolve_nid(img, path)
        a = img.getattr(nid)
        mode = f[2].lstrip(b"@")
        nlinks += f[2].startswith(b"@")
        assert int(mode, 8) == node.mode == (a.mode if not stat.S_ISCHR(node.mode) else node.mode)
        assert int(f[1]) == (node.size if not node.is_symlink else len(node.payload or b""))
        assert (int(f[3]), int(f[4]), int(f[5]), int(f[6])) == (
            node.nlink,
            node.uid,
            node.gid,
            node.rdev,
        )
        assert f[7] == b"%d.%d" % (node.mtime_sec, node.mtime_nsec)
        if not f[2].startswith(b"@"):
            assert (None if f[8] == b"-" else _unesc(f[8])) == node.payload
        assert (None if f[9] == b"-" else _unesc(f[9])) == node.content
        assert (None if f[10] == b"-" else bytes.fromhex(f[10].decode())) == node.digest
        c_xattrs = {
            _unesc(kv.split(b"=", 1)[0]): _unesc(kv.split(b"=", 1)[1]) for kv in f[11:] if kv
        }
        mine = dict(node.xattrs)
        # The C reader keeps the opaque=x markers of whiteout parents (unescaped); we drop them.
        for k in (b"trusted.overlay.opaque", b"user.overlay.opaque"):
            if c_xattrs.get(k) == b"x" and k not in mine:
                del c_xattrs[k]
        assert c_xattrs == mine, path
    if asset.startswith("config-with-hard-link"):
        assert nlinks > 0


def _resolve_nid(img: Image, path: bytes) -> int:
    nid = img.root_nid
    for part in path.split(b"/"):
        if part:
            found = img.raw_lookup(nid, part)
            assert found is not None, path
            nid = found
    return nid

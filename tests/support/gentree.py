"""Declarative test trees: created on disk, and converted to the expected ``csi.image`` Tree.

A :class:`TreeSpec` is a list of :class:`EntrySpec` (parents before children; the root is
the entry with path ``b""``). ``make_disk_tree(root, spec)`` creates it on disk (as root for
ownership, devices, whiteouts and ``trusted.*`` xattrs); ``spec_to_tree(spec)`` gives the
:class:`~csi.image.tree.Tree` a directory scanner should produce for it (regular files of
1..64 bytes inline, larger ones external with their fs-verity digest and ``XX/<62 hex>``
payload; hardlink groups as one node whose primary name is the first in breadth-first order);
``write_spec_objects`` / ``store_objects`` fill an objects directory in the ``XX/<62 hex>``
layout.

Presets: :func:`full_coverage_spec` exercises every entry kind and layout rule of
composefs-format.md §1; :func:`random_spec` makes deterministic random trees.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import stat
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from csi.image.fsverity import FsVerityHasher
from csi.image.tree import HardLink, Node, Tree, object_path

KINDS = frozenset(
    {"dir", "file", "symlink", "fifo", "socket", "chr", "blk", "whiteout", "hardlink"}
)
BASE_MTIME = (1_700_000_000, 0)
INLINE_MAX = 64
_CHUNK = 1 << 20

_DEFAULT_PERM = {"dir": 0o755, "symlink": 0o777}
_TYPE_BITS = {
    "dir": stat.S_IFDIR,
    "file": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
    "chr": stat.S_IFCHR,
    "blk": stat.S_IFBLK,
    "whiteout": stat.S_IFCHR,
}


@dataclass
class EntrySpec:
    """One path of a test tree.

    ``path``: root-relative bytes without a leading slash (``b""`` is the root).
    ``kind``: one of :data:`KINDS`. ``perm``: permission bits (incl. setuid/setgid/sticky);
    None = 0o755 for dirs, 0o777 for symlinks, 0o644 otherwise. ``mtime``: ``(sec, nsec)``;
    None = the spec's default. Regular files: ``size`` and either ``data`` (exact bytes) or
    generated content: ``fill="random"`` (deterministic from ``seed``) or ``fill="sparse"``
    (a hole with a few marker bytes at the start and end). ``target``: symlink target, or the
    path of the entry a hardlink names. ``rdev``: device number (``os.makedev``).
    """

    path: bytes
    kind: str
    perm: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: tuple[int, int] | None = None
    size: int = 0
    data: bytes | None = None
    fill: str = "random"
    seed: int = 0
    target: bytes | None = None
    rdev: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}")
        if self.data is not None:
            self.size = len(self.data)
        if self.kind == "symlink" and not self.target:
            raise ValueError(f"{self.path!r}: symlink needs a target")
        if self.kind == "hardlink" and self.target is None:
            raise ValueError(f"{self.path!r}: hardlink needs a target path")

    @property
    def mode(self) -> int:
        perm = self.perm if self.perm is not None else _DEFAULT_PERM.get(self.kind, 0o644)
        return _TYPE_BITS[self.kind] | perm


@dataclass
class TreeSpec:
    entries: list[EntrySpec]
    default_mtime: tuple[int, int] = BASE_MTIME

    def __post_init__(self) -> None:
        if not self.entries or self.entries[0].path != b"":
            raise ValueError("a spec starts with its root entry (path b'')")
        seen: dict[bytes, EntrySpec] = {}
        for e in self.entries:
            if e.path in seen:
                raise ValueError(f"duplicate path {e.path!r}")
            if e.path:
                parent = e.path.rpartition(b"/")[0]
                if parent not in seen or seen[parent].kind != "dir":
                    raise ValueError(f"{e.path!r}: parent directory must come first")
            elif e.kind != "dir":
                raise ValueError("the root must be a directory")
            if e.kind == "hardlink":
                assert e.target is not None
                t = seen.get(e.target)
                if t is None or t.kind in ("dir", "hardlink"):
                    raise ValueError(f"{e.path!r}: hardlink target must be an earlier non-dir")
            seen[e.path] = e

    def by_path(self) -> dict[bytes, EntrySpec]:
        return {e.path: e for e in self.entries}

    def mtime_of(self, e: EntrySpec) -> tuple[int, int]:
        return e.mtime if e.mtime is not None else self.default_mtime

    def files(self) -> Iterator[EntrySpec]:
        return (e for e in self.entries if e.kind == "file")

    def has_whiteouts(self) -> bool:
        return any(e.kind == "whiteout" for e in self.entries)


# -- file content ----------------------------------------------------------------------------


def iter_segments(e: EntrySpec) -> Iterator[tuple[int, bytes]]:
    """The data of a regular file as ``(offset, bytes)`` pieces; gaps between them are holes."""
    if e.data is not None:
        if e.data:
            yield 0, e.data
        return
    if e.size == 0:
        return
    if e.fill == "random":
        rng = random.Random(e.seed * 1_000_003 + e.size)
        off = 0
        while off < e.size:
            n = min(_CHUNK, e.size - off)
            yield off, rng.randbytes(n)
            off += n
    elif e.fill == "sparse":
        head = b"sparse:%d:" % e.seed
        if e.size <= 2 * len(head):
            yield 0, (head * 2)[: e.size]
            return
        yield 0, head
        yield e.size - len(head), head
    else:
        raise ValueError(f"unknown fill {e.fill!r}")


_ZEROS = memoryview(bytes(_CHUNK))


def iter_content(e: EntrySpec) -> Iterator[bytes | memoryview]:
    """The full content of a regular file, holes as zeros, in chunks of at most 1 MiB."""
    pos = 0
    zeros = _ZEROS
    for off, data in iter_segments(e):
        while pos < off:
            n = min(_CHUNK, off - pos)
            yield zeros[:n]
            pos += n
        yield data
        pos += len(data)
    while pos < e.size:
        n = min(_CHUNK, e.size - pos)
        yield zeros[:n]
        pos += n


def content_bytes(e: EntrySpec) -> bytes:
    """The whole content of a (small) regular file."""
    return b"".join(iter_content(e))


_digest_cache: dict[tuple[str, int, int], bytes] = {}


def content_digest(e: EntrySpec) -> bytes:
    """fs-verity SHA-256 digest of a regular file's content (generated content is cached)."""
    key = (e.fill, e.seed, e.size)
    if e.data is None and key in _digest_cache:
        return _digest_cache[key]
    h = FsVerityHasher()
    for chunk in iter_content(e):
        h.update(chunk)
    digest = h.digest()
    if e.data is None:
        _digest_cache[key] = digest
    return digest


# -- on disk ---------------------------------------------------------------------------------


def _write_file(path: bytes, e: EntrySpec) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for off, data in iter_segments(e):
            os.pwrite(fd, data, off)
        os.ftruncate(fd, e.size)
    finally:
        os.close(fd)


def make_disk_tree(root: str | os.PathLike[str], spec: TreeSpec) -> Path:
    """Create ``spec`` below ``root`` (created if missing; must be empty). Returns ``root``.

    Entries are created first, then ownership, permissions, xattrs and mtimes are applied
    children-first, so directory mtimes are those of the spec. Ownership is applied only
    when running as root (otherwise everything belongs to the caller).
    """
    base = os.fsencode(root)
    os.makedirs(base, exist_ok=True)
    if os.listdir(base):
        raise FileExistsError(errno.EEXIST, "make_disk_tree needs an empty directory", root)

    def p(rel: bytes) -> bytes:
        return base + b"/" + rel if rel else base

    for e in spec.entries:
        path = p(e.path)
        k = e.kind
        if k == "dir":
            if e.path:
                os.mkdir(path, 0o700)
        elif k == "file":
            _write_file(path, e)
        elif k == "symlink":
            assert e.target is not None
            os.symlink(e.target, path)
        elif k == "fifo":
            os.mkfifo(path, 0o600)
        elif k == "socket":
            os.mknod(path, stat.S_IFSOCK | 0o600)
        elif k in ("chr", "blk", "whiteout"):
            os.mknod(path, e.mode, e.rdev if k != "whiteout" else 0)
        elif k == "hardlink":
            assert e.target is not None
            os.link(p(e.target), path, follow_symlinks=False)
    privileged = os.geteuid() == 0
    for e in reversed(spec.entries):
        if e.kind == "hardlink":
            continue
        path = p(e.path)
        if privileged:
            os.chown(path, e.uid, e.gid, follow_symlinks=False)
        if e.kind != "symlink":
            os.chmod(path, stat.S_IMODE(e.mode))
        for key, value in e.xattrs.items():
            os.setxattr(path, key, value, follow_symlinks=False)
        sec, nsec = spec.mtime_of(e)
        ns = sec * 1_000_000_000 + nsec
        os.utime(path, ns=(ns, ns), follow_symlinks=False)
    return Path(os.fsdecode(base))


# -- expected Tree ---------------------------------------------------------------------------


def _bfs_paths(spec: TreeSpec) -> list[bytes]:
    children: dict[bytes, list[bytes]] = {}
    for e in spec.entries:
        if e.path:
            parent, _, name = e.path.rpartition(b"/")
            children.setdefault(parent, []).append(name)
    order: list[bytes] = []
    q: deque[bytes] = deque([b""])
    while q:
        cur = q.popleft()
        order.append(cur)
        for name in sorted(children.get(cur, [])):
            q.append(cur + b"/" + name if cur else name)
    return order


def spec_to_tree(spec: TreeSpec, *, inline_max: int = INLINE_MAX, digests: bool = True) -> Tree:
    """The Tree a directory scanner (hardlinks detected, all xattrs kept) yields for ``spec``.

    External files carry their digest and payload unless ``digests`` is False (faster for
    huge sparse files; then ``digest`` and ``payload`` are None).
    """
    by_path = spec.by_path()
    # Hardlink groups: the inode's entry (the non-hardlink spec) and all names for it.
    group_of: dict[bytes, bytes] = {}
    for e in spec.entries:
        if e.kind == "hardlink":
            assert e.target is not None
            group_of[e.path] = e.target
    names: dict[bytes, list[bytes]] = {}
    for e in spec.entries:
        if e.kind != "dir":
            inode = group_of.get(e.path, e.path)
            names.setdefault(inode, []).append(e.path)
    nodes: dict[bytes, Node] = {}
    for e in spec.entries:
        if e.kind == "hardlink":
            continue
        sec, nsec = spec.mtime_of(e)
        n = Node(mode=e.mode, uid=e.uid, gid=e.gid, mtime_sec=sec, mtime_nsec=nsec)
        n.xattrs = dict(e.xattrs)
        if e.kind == "dir":
            n.nlink = 2 + sum(
                1
                for c in spec.entries
                if c.kind == "dir" and c.path and c.path.rpartition(b"/")[0] == e.path
            )
        else:
            n.nlink = len(names[e.path])
        if e.kind == "file":
            n.size = e.size
            if 0 < e.size <= inline_max:
                n.content = content_bytes(e)
            elif e.size > 0 and digests:
                n.digest = content_digest(e)
                n.payload = object_path(n.digest)
        elif e.kind == "symlink":
            assert e.target is not None
            n.payload = e.target
            n.size = len(e.target)
        elif e.kind in ("chr", "blk"):
            n.rdev = e.rdev
        nodes[e.path] = n
    tree = Tree(nodes[b""])
    placed: set[bytes] = set()
    for path in _bfs_paths(spec):
        if not path:
            continue
        e = by_path[path]
        parent, _, name = path.rpartition(b"/")
        inode = group_of.get(path, path)
        node = nodes[inode]
        if inode in placed:
            nodes[parent].add(name, HardLink(node))
        else:
            nodes[parent].add(name, node)
            placed.add(inode)
        del e
    return tree


# -- objects ---------------------------------------------------------------------------------


def spec_objects(spec: TreeSpec, *, inline_max: int = INLINE_MAX) -> dict[bytes, EntrySpec]:
    """``digest -> one entry with that content`` for every external regular file."""
    out: dict[bytes, EntrySpec] = {}
    for e in spec.files():
        if e.size > inline_max:
            out.setdefault(content_digest(e), e)
    return out


def write_spec_objects(
    spec: TreeSpec, objects_dir: str | os.PathLike[str], *, inline_max: int = INLINE_MAX
) -> int:
    """Write every external file's content to ``objects_dir/XX/<62 hex>``; returns the count."""
    objs = spec_objects(spec, inline_max=inline_max)
    for digest, e in objs.items():
        dest = Path(objects_dir) / os.fsdecode(object_path(digest))
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        _write_file(os.fsencode(tmp), dataclasses.replace(e, path=b"x"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    return len(objs)


def _copy_sparse(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a file keeping its holes (SEEK_DATA/SEEK_HOLE), so huge sparse files stay cheap."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole remains
                    break
                raise
            end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            off = start
            while off < end:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), end - off, off, off)
                if n == 0:
                    raise OSError(errno.EIO, f"short copy from {src}")
                off += n
            pos = end
        fo.truncate(size)


def store_objects(
    objects: Iterable[tuple[bytes, str | os.PathLike[str]]], objects_dir: str | os.PathLike[str]
) -> int:
    """Copy ``(digest, source_path)`` files into ``objects_dir/XX/<62 hex>`` (holes kept).

    The digest is trusted (tests get it from the code under test or from the spec). Returns
    the number of objects written (existing ones are skipped).
    """
    written = 0
    for digest, src in objects:
        dest = Path(objects_dir) / os.fsdecode(object_path(digest))
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        _copy_sparse(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        written += 1
    return written


# -- presets ---------------------------------------------------------------------------------

GiB = 1 << 30
MiB = 1 << 20


def full_coverage_spec(
    *, huge: bool = False, big_dir: bool = False, acl: bool = True, privileged: bool = True
) -> TreeSpec:
    """Every entry kind and every layout rule of composefs-format.md §1.

    ``huge``: add sparse files of 4 GiB, 4 GiB + 1 and 5 GiB (extended inodes by size; slow to
    digest). ``big_dir``: add a directory of 10,000 entries. ``acl``: add a POSIX access ACL
    (sets the image's HAS_ACL flag). ``privileged=False`` leaves out what needs root
    (devices, whiteouts, foreign ownership, ``trusted.*``/``security.*`` xattrs).
    """
    E = EntrySpec
    out: list[EntrySpec] = [
        E(b"", "dir", xattrs={b"user.root": b"top"}),
    ]
    add = out.append

    # Directories: empty, deep, many entries spanning dirent blocks, odd names.
    add(E(b"empty-dir", "dir"))
    deep = b"deep"
    add(E(deep, "dir"))
    for i in range(24):
        deep += b"/d%02d" % i
        add(E(deep, "dir"))
    add(E(deep + b"/leaf", "file", data=b"at the bottom\n"))
    add(E(b"blocks", "dir"))
    for i in range(120):  # 120 * (12 + 110) bytes: several 4 KiB dirent blocks
        add(E(b"blocks/" + (b"%03d-" % i) + b"n" * 106, "file", data=b"%d" % i))
    # Directories whose last dirent chunk is just under / just over 2048 bytes (inline tail
    # vs. a full block): "." and ".." cost 27 bytes, each entry 12 + 99.
    for dname, count in ((b"tail-inline", 18), (b"tail-block", 19)):
        add(E(dname, "dir"))
        for i in range(count):
            add(E(dname + b"/" + (b"%02d-" % i) + b"t" * 96, "file", data=b"%d" % i))
    add(E(b"names", "dir"))
    odd_names = [
        b"n" * 255,
        b"with space",
        b"new\nline",
        b"tab\tname",
        b"\xff\xfehigh-bytes",
        "caf\u00e9-\u65e5\u672c".encode(),
        b"-dash-sorts-before-dot",
        b"+plus",
        b"!bang",
        b".hidden",
        b"..dotdot",
        b"=equals=",
        b"back\\slash",
        b"a",
        b"A",
        b"\x01control",
    ]
    for i, name in enumerate(odd_names):
        add(E(b"names/" + name, "file", data=b"name %d\n" % i))
    add(E(b"names/-subdir", "dir"))  # sorts before "." in the dirent block
    add(E(b"names/-subdir/x", "file", data=b"x"))
    if big_dir:
        add(E(b"bigdir", "dir"))
        for i in range(10_000):
            add(E(b"bigdir/entry-%05d" % i, "file", data=b"" if i % 3 else b"%d" % i))

    # Regular files around every size boundary.
    add(E(b"files", "dir"))
    sizes = [0, 1, 2, 63, 64, 65, 100, 2047, 2048, 2049, 4095, 4096, 4097, 8191, 8192, 8193]
    sizes += [65536, MiB + 3, 3 * MiB]
    for n in sizes:
        add(E(b"files/size-%d" % n, "file", size=n, seed=n))
    add(E(b"files/sparse-64m", "file", size=64 * MiB + 5, fill="sparse", seed=64))
    add(E(b"files/dup-a", "file", size=10_000, seed=7))  # same content: one object
    add(E(b"files/dup-b", "file", size=10_000, seed=7))
    add(E(b"files/zeros-4096", "file", data=bytes(4096)))
    if huge:
        add(E(b"files/huge-4g", "file", size=4 * GiB, fill="sparse", seed=1))
        add(E(b"files/huge-4g+1", "file", size=4 * GiB + 1, fill="sparse", seed=2))
        add(E(b"files/huge-5g", "file", size=5 * GiB, fill="sparse", seed=3))

    # Permissions, ownership, mtimes.
    add(E(b"perms", "dir", perm=0o1777))
    for perm in (0o000, 0o400, 0o600, 0o640, 0o755, 0o4755, 0o2755, 0o6711, 0o1644):
        add(E(b"perms/mode-%04o" % perm, "file", perm=perm, data=b"p"))
    add(E(b"perms/closed-dir", "dir", perm=0o700))
    add(E(b"perms/setgid-dir", "dir", perm=0o2775))
    if privileged:
        add(E(b"owners", "dir", uid=1000, gid=1000))
        add(E(b"owners/u1000", "file", uid=1000, gid=100, data=b"u"))
        add(E(b"owners/u65535", "file", uid=65535, gid=65535, data=b"u"))
        add(E(b"owners/u65536", "file", uid=65536, gid=70000, data=b"u"))
        add(E(b"owners/big-ids", "file", uid=4_000_000_000, gid=3_000_000_000, size=5000))
        add(E(b"owners/link", "symlink", target=b"u1000", uid=1234, gid=5678))
    add(E(b"times", "dir", mtime=(BASE_MTIME[0] + 10, 0)))
    add(E(b"times/same-as-base", "file", data=b"t"))
    add(E(b"times/nsec", "file", data=b"t", mtime=(BASE_MTIME[0], 123_456_789)))
    add(E(b"times/max-nsec", "file", data=b"t", mtime=(BASE_MTIME[0] + 1, 999_999_999)))
    add(E(b"times/later", "file", data=b"t", mtime=(BASE_MTIME[0] + 86_400, 0)))
    add(E(b"times/future", "file", data=b"t", mtime=(8_589_934_597, 1)))
    add(E(b"times/nsec-dir", "dir", mtime=(BASE_MTIME[0] + 5, 5)))
    add(E(b"times/nsec-link", "symlink", target=b"nsec", mtime=(BASE_MTIME[0] + 7, 77)))

    # Symlinks: short, dangling, absolute, directory, long (inline vs block), maximal.
    add(E(b"links", "dir"))
    add(E(b"links/short", "symlink", target=b"../files/size-1"))
    add(E(b"links/dangling", "symlink", target=b"does/not/exist"))
    add(E(b"links/absolute", "symlink", target=b"/etc/hostname"))
    add(E(b"links/to-dir", "symlink", target=b"../files"))
    add(E(b"links/odd-target", "symlink", target=b"sp ace\nnl\xff"))
    for n in (100, 1000, 2000, 2100, 3000, 4000, 4050, 4095):
        tgt = (b"p/" * n)[: n - 1] + b"x"
        add(E(b"links/long-%d" % n, "symlink", target=tgt))

    # Special files.
    add(E(b"special", "dir"))
    add(E(b"special/fifo", "fifo"))
    add(E(b"special/socket", "socket"))
    if privileged:
        add(E(b"special/chr-null", "chr", rdev=os.makedev(1, 3)))
        add(E(b"special/blk-sda", "blk", perm=0o660, gid=6, rdev=os.makedev(8, 0)))
        add(E(b"special/chr-big", "chr", rdev=os.makedev(300, 70_000)))
        add(E(b"special/blk-minor", "blk", rdev=os.makedev(259, 1_048_575)))

    # Whiteouts (chr 0/0): in a subdirectory, nested, and at the root; names that collide
    # with the 00..ff stubs at the root.
    if privileged:
        add(E(b"layer", "dir"))
        add(E(b"layer/removed", "whiteout"))
        add(E(b"layer/removed-too", "whiteout", perm=0o600, uid=5, gid=6))
        add(E(b"layer/sub", "dir"))
        add(E(b"layer/sub/gone", "whiteout"))
        add(E(b"root-whiteout", "whiteout"))
    add(E(b"00", "dir"))
    add(E(b"00/inside", "file", data=b"stub names can be real\n"))
    add(E(b"ab", "file", size=200, seed=0xAB))
    add(E(b"ff", "symlink", target=b"ab"))
    add(E(b"0g", "file", data=b"not hex"))

    # Hardlinks: several groups, across directories, of every non-directory kind.
    add(E(b"hl", "dir"))
    add(E(b"hl/ext", "file", size=3000, seed=30))
    add(E(b"hl/ext-2", "hardlink", target=b"hl/ext"))
    add(E(b"hl/small", "file", data=b"small inline\n"))
    add(E(b"hl/small-2", "hardlink", target=b"hl/small"))
    add(E(b"hl/empty", "file"))
    add(E(b"hl/empty-2", "hardlink", target=b"hl/empty"))
    add(E(b"hl/sym", "symlink", target=b"ext"))
    add(E(b"hl/sym-2", "hardlink", target=b"hl/sym"))
    add(E(b"hl/fifo", "fifo"))
    add(E(b"hl/fifo-2", "hardlink", target=b"hl/fifo"))
    add(E(b"a-first", "hardlink", target=b"hl/ext"))  # BFS-earlier name than the original
    add(E(b"deep/d00/d01/ext-3", "hardlink", target=b"hl/ext"))
    add(E(b"names/-small-3", "hardlink", target=b"hl/small"))

    # Xattrs: user/trusted/security, escaping, shared pairs, long values, many per inode.
    add(E(b"xattrs", "dir", xattrs={b"user.dir": b"on a dir"}))
    xa: dict[bytes, bytes] = {
        b"user.simple": b"value",
        b"user.empty": b"",
        b"user.binary": b"\x00\x01\xff=\n",
        b"user.overlay.not-escaped": b"u",
        b"user." + b"k" * 250: b"longest name",
    }
    if privileged:
        xa |= {
            b"trusted.overlay.foo": b"escaped once",
            b"trusted.overlay.overlay.bar": b"escaped twice",
            b"trusted.other": b"t",
            b"security.test": b"s",
        }
    add(E(b"xattrs/mixed", "file", size=300, seed=3, xattrs=xa))
    add(E(b"xattrs/long-value", "file", data=b"l", xattrs={b"user.long": b"v" * 2000}))
    add(
        E(
            b"xattrs/many",
            "file",
            data=b"m",
            xattrs={b"user.x%02d" % i: b"%d" % i for i in range(40)},
        )
    )
    for i in range(6):
        shared = {b"user.shared": b"same value", b"user.shared-2": b"also same"}
        if i % 2:
            shared[b"user.unique"] = b"%d" % i
        add(E(b"xattrs/shared-%d" % i, "file", data=b"s%d" % i, xattrs=shared))
    if privileged:
        add(E(b"xattrs/on-symlink", "symlink", target=b"mixed", xattrs={b"trusted.sym": b"1"}))
        add(E(b"xattrs/on-fifo", "fifo", xattrs={b"trusted.fifo": b"2"}))
        add(E(b"xattrs/on-empty", "file", xattrs={b"trusted.overlay.x": b"", b"user.e": b"3"}))
    if acl:
        add(E(b"acl", "dir"))
        add(
            E(
                b"acl/file",
                "file",
                perm=0o750,
                data=b"acl\n",
                xattrs={
                    b"system.posix_acl_access": posix_acl(
                        [(1, 7, None), (2, 4, 1000), (4, 5, None), (0x10, 5, None), (0x20, 0, None)]
                    ),
                },
            )
        )
    return TreeSpec(out)


def posix_acl(entries: list[tuple[int, int, int | None]]) -> bytes:
    """The ``system.posix_acl_*`` xattr value for ``(tag, perm, id)`` entries.

    Tags: 1 USER_OBJ, 2 USER, 4 GROUP_OBJ, 8 GROUP, 0x10 MASK, 0x20 OTHER.
    """
    out = bytearray((2).to_bytes(4, "little"))
    for tag, perm, ident in entries:
        out += tag.to_bytes(2, "little") + perm.to_bytes(2, "little")
        out += (0xFFFFFFFF if ident is None else ident).to_bytes(4, "little")
    return bytes(out)


_NAME_BYTES = b"abcdefghijklmnopqrstuvwxyz0123456789-_.+= ~@#%\xc3\xa9\xff\n"


def _random_name(rng: random.Random) -> bytes:
    r = rng.random()
    n = rng.choice([1, 2, 3, 5, 8, 12, 20]) if r < 0.9 else rng.randint(100, 255)
    while True:
        name = bytes(rng.choice(_NAME_BYTES) for _ in range(n))
        if name not in (b".", b".."):
            return name


def random_spec(seed: int, n: int = 200, *, privileged: bool = True) -> TreeSpec:
    """A deterministic random tree of about ``n`` entries of every kind."""
    rng = random.Random(seed)
    out: list[EntrySpec] = [EntrySpec(b"", "dir")]
    dirs: list[bytes] = [b""]
    linkable: list[bytes] = []
    used: set[bytes] = {b""}
    mtimes = [None, None, None, (BASE_MTIME[0], 1), (BASE_MTIME[0] + 3600, 500_000_000)]
    xattr_pool = [
        {b"user.a": b"1"},
        {b"user.shared": b"same"},
        {b"user.a": b"2", b"user.b": b"x" * rng.randint(0, 300)},
    ]
    if privileged:
        xattr_pool += [{b"trusted.overlay.t": b"e"}, {b"security.s": b"v"}]
    ids = [0, 0, 0, 1000, 65534, 100_000] if privileged else [os.geteuid()]
    sizes = [0, 1, 30, 64, 65, 500, 2048, 2049, 4095, 4096, 4097, 10_000, 70_000]
    kinds = ["file"] * 10 + ["dir"] * 3 + ["symlink"] * 2 + ["hardlink", "fifo"]
    if privileged:
        kinds += ["chr", "blk", "whiteout", "socket"]
    else:
        kinds += ["socket"]
    for _ in range(n):
        parent = rng.choice(dirs)
        name = _random_name(rng)
        path = parent + b"/" + name if parent else name
        if path in used:
            continue
        used.add(path)
        kind = rng.choice(kinds)
        if kind == "hardlink" and not linkable:
            kind = "file"
        uid = rng.choice(ids)
        target = None
        if kind == "symlink":
            target = (_random_name(rng) * rng.choice([1, 1, 3, 10]))[:4095]
        e = EntrySpec(
            path,
            kind if kind != "hardlink" else "file",
            target=target,
            uid=uid,
            gid=rng.choice(ids),
            mtime=rng.choice(mtimes),
            xattrs=dict(rng.choice(xattr_pool)) if rng.random() < 0.3 else {},
        )
        if kind == "hardlink":
            e = EntrySpec(path, "hardlink", target=rng.choice(linkable))
        elif kind == "file":
            e.size = rng.choice(sizes)
            e.seed = rng.randint(0, 5)  # few seeds: some contents repeat (one object)
            e.perm = rng.choice([0o644, 0o600, 0o755, 0o4755])
        elif kind == "dir":
            e.perm = rng.choice([0o755, 0o700, 0o1777])
            dirs.append(path)
        elif kind in ("chr", "blk"):
            e.rdev = os.makedev(rng.randint(1, 300), rng.randint(0, 70_000))
        if kind in ("symlink", "fifo", "chr", "blk", "socket", "whiteout") and e.xattrs:
            # user.* xattrs are only allowed on regular files and directories.
            e.xattrs = {k: v for k, v in e.xattrs.items() if not k.startswith(b"user.")}
        if kind not in ("dir", "hardlink", "whiteout"):
            linkable.append(path)
        out.append(e)
    return TreeSpec(out)

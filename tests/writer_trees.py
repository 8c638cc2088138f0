"""Named trees that exercise every layout rule of the composefs writer (format reference §1).

Each builder returns a fresh :class:`Tree`. Their expected image digests, produced by
mkcomposefs 1.0.8 from the dump of the same tree, are in ``tests/data/writer_golden.json``
(regenerate with ``python -m tests.tools.gen_writer_golden`` where mkcomposefs is available).
"""

from __future__ import annotations

import hashlib
import random
import stat
from collections.abc import Callable

from csi.image.tree import (
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFREG,
    S_IFSOCK,
    HardLink,
    Node,
    Tree,
    object_path,
)

T0 = (1_700_000_000, 0)


def d(mode: int = 0o755, **kw: int) -> Node:
    kw.setdefault("mtime_sec", T0[0])
    return Node(mode=S_IFDIR | mode, **kw)


def reg(content: bytes, *, inline_max: int = 64, mode: int = 0o644, **kw: object) -> Node:
    """A regular file: inline when small, otherwise external with digest and payload."""
    kw.setdefault("mtime_sec", T0[0])
    n = Node(mode=S_IFREG | mode, size=len(content), **kw)  # type: ignore[arg-type]
    if 0 < len(content) <= inline_max:
        n.content = content
    elif content:
        digest = hashlib.sha256(b"fake-verity" + content).digest()
        n.digest = digest
        n.payload = object_path(digest)
    return n


def external(size: int, *, seed: int = 0, digest: bool = True, payload: bool = True) -> Node:
    """An external file of any (possibly huge, sparse) size, without materialising it."""
    dg = hashlib.sha256(b"%d-%d" % (size, seed)).digest()
    return Node(
        mode=S_IFREG | 0o644,
        size=size,
        mtime_sec=T0[0],
        digest=dg if digest else None,
        payload=object_path(dg) if payload else None,
    )


def link(target: bytes, **kw: int) -> Node:
    kw.setdefault("mtime_sec", T0[0])
    return Node(mode=S_IFLNK | 0o777, payload=target, size=len(target), **kw)


def special(kind: int, rdev: int = 0, perm: int = 0o644, **kw: int) -> Node:
    kw.setdefault("mtime_sec", T0[0])
    return Node(mode=kind | perm, rdev=rdev, **kw)


def tree_minimal() -> Tree:
    return Tree(d())


def tree_basic() -> Tree:
    root = d()
    root.add(b"file.txt", reg(b"hello\n"))
    root.add(b"empty", reg(b""))
    root.add(b"big", reg(bytes(range(256)) * 40))
    sub = d(0o700, uid=1000, gid=1000)
    root.add(b"sub", sub)
    sub.add(b"link", link(b"../file.txt"))
    sub.add(b"fifo", special(S_IFIFO))
    sub.add(b"sock", special(S_IFSOCK))
    sub.add(b"chr", special(S_IFCHR, rdev=(1 << 8) | 3))
    sub.add(b"blk", special(S_IFBLK, rdev=(8 << 8) | 1))
    return Tree(root)


def tree_inline_sizes() -> Tree:
    """Inline content around the 2048-byte tail limit and the block size (dump limit 5000)."""
    root = d()
    for size in (1, 63, 64, 65, 2047, 2048, 2049, 4095, 4096, 4097, 5000):
        content = bytes((i * 13 + size) % 256 for i in range(size))
        root.add(b"f%05d" % size, reg(content, inline_max=5000))
    return Tree(root)


def tree_tail_padding() -> Tree:
    """Many inodes with inline tails so that some tails would cross a block boundary."""
    root = d()
    for i in range(300):
        size = 100 + (i * 37) % 1900
        root.add(b"t%03d" % i, reg(bytes([i % 256]) * size, inline_max=5000))
    return Tree(root)


def tree_big_directories() -> Tree:
    """Directories spanning several blocks, tails above/below half a block, long names."""
    root = d()
    many = d()
    root.add(b"many", many)
    for i in range(700):
        many.add(b"entry-%04d" % i, reg(b""))
    long = d()
    root.add(b"long", long)
    for i in range(40):
        long.add((b"%03d" % i) + b"n" * 252, reg(b"x"))
    exact = d()
    root.add(b"half", exact)
    # Sizes chosen so the last dirent chunk lands just above and below 2048 bytes.
    for i in range(85):
        exact.add(b"name-%019d" % i, reg(b""))
    return Tree(root)


def tree_names_order() -> Tree:
    """Names that sort around '.' and '..' (strcmp), high bytes, spaces, escapes."""
    root = d()
    for name in (b"-dash", b"+plus", b",comma", b".hidden", b"..dots", b"a b", b"\xff\xfe", b"\n"):
        root.add(name, reg(name))
    root.add(b"00", d())  # collides with a whiteout stub name: the stub is not added
    root.add(b"ff", reg(b"not a stub"))
    return Tree(root)


def tree_xattrs() -> Tree:
    root = d()
    root.xattrs[b"security.selinux"] = b"system_u:object_r:root_t:s0\x00"
    for i in range(20):
        f = reg(b"file %d" % i)
        f.xattrs[b"user.shared"] = b"same value"
        f.xattrs[b"user.unique"] = b"value %d" % i
        f.xattrs[b"security.selinux"] = b"system_u:object_r:etc_t:s0\x00"
        if i % 3 == 0:
            f.xattrs[b"trusted.overlay.custom"] = b"escaped"  # becomes trusted.overlay.overlay.*
        if i % 4 == 0:
            f.xattrs[b"user.overlay.something"] = b"kept"
        if i % 5 == 0:
            f.xattrs[b"other.namespace"] = b"full key stored"
        root.add(b"x%02d" % i, f)
    big = reg(b"big xattrs")
    big.xattrs[b"user.long"] = b"v" * 3000
    big.xattrs[b"trusted.t"] = b""
    root.add(b"bigx", big)
    many = reg(b"many")
    for i in range(150):  # more shared xattrs than an inode may reference (128)
        many.xattrs[b"user.k%03d" % i] = b"shared"
    twin = reg(b"twin")
    twin.xattrs.update(many.xattrs)
    root.add(b"many", many)
    root.add(b"twin", twin)
    return Tree(root)


def tree_acl() -> Tree:
    root = d()
    f = reg(b"acl")
    f.xattrs[b"system.posix_acl_access"] = bytes.fromhex("02000000010006000000000004000400")
    root.add(b"acl", f)
    return Tree(root)


def tree_whiteouts() -> Tree:
    root = d()
    sub = d()
    root.add(b"sub", sub)
    sub.add(b"gone", special(S_IFCHR, rdev=0))
    sub.add(b"kept", reg(b"kept"))
    root.add(b"rootgone", special(S_IFCHR, rdev=0, perm=0o600))
    wo = special(S_IFCHR, rdev=0)
    wo.xattrs[b"user.overlay.whiteout"] = b"pre-existing"
    sub.add(b"gone2", wo)
    return Tree(root)


def tree_extended_inodes() -> Tree:
    """Extended inodes: differing mtimes and nanoseconds, ids and nlink above 65535, >4 GiB."""
    root = d()
    root.add(b"ns", reg(b"ns", mtime_nsec=123456789))
    root.add(b"later", reg(b"later", mtime_sec=T0[0] + 86400))
    root.add(b"uid", reg(b"uid", uid=70000))
    root.add(b"gid", reg(b"gid", gid=1 << 20))
    root.add(b"huge", external(5 << 30))
    root.add(b"exact4g", external((1 << 32) - 1))
    root.add(b"over4g", external(1 << 32))
    root.add(b"sparse-tb", external(3 << 40))
    root.add(b"nodigest", external(10000, digest=False))
    root.add(b"nopayload", external(20000, payload=False))
    root.add(b"chr-size", special(S_IFCHR, rdev=5, size=1 << 33))
    root.add(b"many-links", reg(b"nlink", nlink=70000))
    old = reg(b"old", mtime_sec=1)  # the minimum mtime becomes the build time
    root.add(b"old", old)
    return Tree(root)


def tree_pre_epoch() -> Tree:
    """Negative (pre-1970) seconds and a nanosecond field past 10^9, as dumps may carry."""
    root = d()
    root.add(b"old", reg(b"1969", mtime_sec=-86400, mtime_nsec=5))
    root.add(b"odd", reg(b"ns", mtime_nsec=4_000_000_000))
    return Tree(root)


def tree_symlinks() -> Tree:
    root = d()
    for n in (1, 100, 2000, 4000, 4050, 4095):
        root.add(b"l%04d" % n, link(b"t" * n))
    x = link(b"y" * 4000)
    x.xattrs[b"user.pad"] = b"z" * 80  # inode + xattrs + target crosses a block
    root.add(b"lx", x)
    return Tree(root)


def tree_hardlinks() -> Tree:
    root = d()
    a = d()
    b = d()
    root.add(b"a", a)
    root.add(b"b", b)
    f = reg(b"shared content that is inline", nlink=3)
    a.add(b"file", f)
    b.add(b"link1", HardLink(f))
    root.add(b"link2", HardLink(f))  # a link shallower than its primary
    g = external(100000, seed=7)
    g.nlink = 2
    b.add(b"big", g)
    a.add(b"big-link", HardLink(g))
    return Tree(root)


def tree_random(seed: int, n: int = 400) -> Tree:
    """A deterministic random tree mixing every kind of entry."""
    rng = random.Random(seed)
    root = d(mtime_sec=T0[0])
    dirs = [root]
    files: list[Node] = []
    kinds = ["dir", "reg", "reg", "reg", "ext", "lnk", "dev", "wo", "hl", "fifo"]
    for i in range(n):
        parent = rng.choice(dirs)
        name = bytes(rng.choice(b"abcdefghij.-_ \xe9") for _ in range(rng.randint(1, 12)))
        name = name.replace(b"/", b"_") + b"%d" % i
        if name in (b".", b"..") or (parent.entries and name in parent.entries):
            continue
        kind = rng.choice(kinds)
        mt = {
            "mtime_sec": T0[0] + rng.choice([0, 0, 0, 1, 999]),
            "mtime_nsec": rng.choice([0, 0, 5]),
        }
        node: Node | HardLink
        if kind == "dir":
            node = d(rng.choice([0o755, 0o700]), **mt)
            dirs.append(node)
        elif kind == "reg":
            node = reg(rng.randbytes(rng.randint(0, 64)), **mt)
            files.append(node)
        elif kind == "ext":
            node = external(rng.randint(65, 1 << 34), seed=i)
            files.append(node)
        elif kind == "lnk":
            node = link(b"target/" * rng.randint(1, 300), **mt)
        elif kind == "dev":
            node = special(rng.choice([S_IFCHR, S_IFBLK]), rdev=rng.randint(1, 1 << 20), **mt)
        elif kind == "wo":
            node = special(S_IFCHR, rdev=0, **mt)
        elif kind == "hl" and files:
            node = HardLink(rng.choice(files))
        else:
            node = special(S_IFIFO, **mt)
        if isinstance(node, Node):
            for _ in range(rng.choice([0, 0, 1, 3])):
                key = rng.choice([b"user.a", b"user.b", b"security.selinux", b"trusted.overlay.x"])
                node.xattrs[key] = rng.choice([b"", b"v1", b"value-two", b"x" * 200])
            node.uid = rng.choice([0, 0, 1000, 70000])
        parent.add(name, node)
    # hard link targets' nlink: count of names, as a real filesystem would report
    counts: dict[int, int] = {}
    t = Tree(root)
    for _, entry in t.walk():
        target = entry.target if isinstance(entry, HardLink) else entry
        if not target.is_dir:
            counts[id(target)] = counts.get(id(target), 0) + 1
    for _, entry in t.walk():
        if isinstance(entry, Node) and not entry.is_dir:
            entry.nlink = counts[id(entry)]
    return t


TREES: dict[str, Callable[[], Tree]] = {
    "minimal": tree_minimal,
    "basic": tree_basic,
    "inline_sizes": tree_inline_sizes,
    "tail_padding": tree_tail_padding,
    "big_directories": tree_big_directories,
    "names_order": tree_names_order,
    "xattrs": tree_xattrs,
    "acl": tree_acl,
    "whiteouts": tree_whiteouts,
    "extended_inodes": tree_extended_inodes,
    "symlinks": tree_symlinks,
    "pre_epoch": tree_pre_epoch,
    "hardlinks": tree_hardlinks,
    **{f"random_{s}": (lambda s=s: tree_random(s)) for s in range(8)},  # type: ignore[misc]
}

assert stat.S_IFMT(S_IFREG) == S_IFREG

"""Capture everything a user can observe of a file tree, and compare two captures.

``snapshot(root)`` walks a tree (on disk, a kernel mount or our FUSE mount) without following
symlinks and records, per path, an :class:`Entry`: type, full mode, uid, gid, nlink, size,
mtime in ns, rdev, symlink target, SHA-256 of regular-file content, every xattr (as root this
includes ``trusted.*`` and ``security.*``), the inode number and the hardlink group (the other
paths in the tree with the same inode). Paths are tree-relative and absolute-style: ``/`` is
the root, ``/a/b`` below it; names are decoded with ``os.fsdecode`` (surrogateescape), so any
byte string survives.

``diff_snapshots(a, b)`` lists the differences in readable sentences; ``[]`` means equal.

``kernel_presentation(snap)`` turns a snapshot of a *source* directory into what a kernel
composefs mount of its image presents (composefs-format.md §1.14 and §1.20): a character
device 0/0 (an overlay whiteout in the source) shows as an empty regular file with the
whiteout marker xattrs, and its parent directory carries the xwhiteouts markers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

#: Fields of :class:`Entry` that :func:`diff_snapshots` compares unless told to ignore them.
FIELDS = (
    "type",
    "mode",
    "uid",
    "gid",
    "nlink",
    "size",
    "mtime_ns",
    "rdev",
    "target",
    "sha256",
    "xattrs",
    "hardlinks",
    "ino",
)
#: Ignored by default: inode numbers always differ between two trees (groups are compared).
DEFAULT_IGNORE = frozenset({"ino"})

_TYPE_NAMES = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "reg",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "sock",
}

Xattrs = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class Entry:
    """What a user sees of one path. ``size`` is None for directories unless opted in."""

    type: str
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int | None
    mtime_ns: int
    rdev: int
    target: bytes | None
    sha256: str | None
    xattrs: Xattrs | None
    #: The other paths in the tree sharing this inode (sorted), empty if none.
    hardlinks: tuple[str, ...]
    ino: int

    def xattr_dict(self) -> dict[str, bytes]:
        return dict(self.xattrs or ())


Snapshot = dict[str, Entry]


def _join(parent: str, name: str) -> str:
    return ("" if parent == "/" else parent) + "/" + name


def snapshot(
    root: str | os.PathLike[str],
    *,
    content: bool = True,
    xattrs: bool = True,
    dir_sizes: bool = False,
    xattr_filter: Callable[[str], bool] | None = None,
) -> Snapshot:
    """Capture ``root`` recursively (symlinks are recorded, never followed).

    ``content``: hash regular files (SHA-256). ``xattrs``: record all xattrs (``None`` when
    off). ``dir_sizes``: record directory ``st_size`` (kernel EROFS directory sizes differ from
    the source filesystem's, so this is off by default). ``xattr_filter``: keep only the xattr
    names for which it returns True (e.g. drop a host's ``security.selinux``).
    """
    base = Path(root)
    raw: dict[str, tuple[os.stat_result, bytes | None, str | None, Xattrs | None]] = {}
    stack = ["/"]
    while stack:
        rel = stack.pop()
        path = base if rel == "/" else base / rel.lstrip("/")
        st = os.lstat(path)
        target: bytes | None = None
        digest: str | None = None
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(os.fsencode(path))
        elif stat.S_ISREG(st.st_mode) and content:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        xa: Xattrs | None = None
        if xattrs:
            names = sorted(os.listxattr(path, follow_symlinks=False))
            if xattr_filter is not None:
                names = [n for n in names if xattr_filter(n)]
            xa = tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
        raw[rel] = (st, target, digest, xa)
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(os.fsencode(path)), reverse=True):
                stack.append(_join(rel, os.fsdecode(name)))
    by_ino: dict[int, list[str]] = {}
    for rel, (st, *_rest) in raw.items():
        if not stat.S_ISDIR(st.st_mode):
            by_ino.setdefault(st.st_ino, []).append(rel)
    snap: Snapshot = {}
    for rel in sorted(raw):
        st, target, digest, xa = raw[rel]
        ftype = stat.S_IFMT(st.st_mode)
        is_dir = ftype == stat.S_IFDIR
        group = () if is_dir else tuple(sorted(p for p in by_ino[st.st_ino] if p != rel))
        snap[rel] = Entry(
            type=_TYPE_NAMES.get(ftype, f"unknown({ftype:o})"),
            mode=st.st_mode,
            uid=st.st_uid,
            gid=st.st_gid,
            nlink=st.st_nlink,
            size=None if is_dir and not dir_sizes else st.st_size,
            mtime_ns=st.st_mtime_ns,
            rdev=st.st_rdev if ftype in (stat.S_IFCHR, stat.S_IFBLK) else 0,
            target=target,
            sha256=digest,
            xattrs=xa,
            hardlinks=group,
            ino=st.st_ino,
        )
    return snap


def _show(v: object, limit: int = 80) -> str:
    s = oct(v) if isinstance(v, int) and v > 0o7777 and v < 0o1000000 else repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _diff_xattrs(path: str, a: Xattrs | None, b: Xattrs | None) -> list[str]:
    if a is None or b is None:
        return [] if a is b else [f"{path}: xattrs captured on one side only"]
    da, db = dict(a), dict(b)
    out = []
    for k in sorted(da.keys() | db.keys()):
        if k not in db:
            out.append(f"{path}: xattr {k} only in first ({_show(da[k])})")
        elif k not in da:
            out.append(f"{path}: xattr {k} only in second ({_show(db[k])})")
        elif da[k] != db[k]:
            out.append(f"{path}: xattr {k} differs: {_show(da[k])} != {_show(db[k])}")
    return out


def diff_snapshots(
    a: Mapping[str, Entry],
    b: Mapping[str, Entry],
    *,
    ignore: Iterable[str] = DEFAULT_IGNORE,
    ignore_paths: Callable[[str], bool] | None = None,
) -> list[str]:
    """Human-readable differences between two snapshots; ``[]`` when they are equal.

    ``ignore``: field names of :class:`Entry` not to compare (default: ``ino``).
    ``ignore_paths``: paths for which it returns True are left out on both sides.
    """
    skip = frozenset(ignore)
    unknown = skip - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown fields to ignore: {sorted(unknown)}")
    out: list[str] = []
    pa = {p for p in a if not (ignore_paths and ignore_paths(p))}
    pb = {p for p in b if not (ignore_paths and ignore_paths(p))}
    for p in sorted(pa - pb):
        out.append(f"{p}: only in first ({a[p].type})")
    for p in sorted(pb - pa):
        out.append(f"{p}: only in second ({b[p].type})")
    for p in sorted(pa & pb):
        ea, eb = a[p], b[p]
        for name in FIELDS:
            if name in skip:
                continue
            va, vb = getattr(ea, name), getattr(eb, name)
            if va == vb:
                continue
            if name == "xattrs":
                out.extend(_diff_xattrs(p, va, vb))
            elif name == "mode":
                out.append(f"{p}: mode differs: {va:o} != {vb:o}")
            else:
                out.append(f"{p}: {name} differs: {_show(va)} != {_show(vb)}")
    return out


# -- what a kernel composefs mount presents -------------------------------------------------

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _with_xattrs(e: Entry, extra: Mapping[str, bytes]) -> Entry:
    if e.xattrs is None:
        return e
    merged = dict(e.xattrs)
    merged.update(extra)
    return dataclasses.replace(e, xattrs=tuple(sorted(merged.items())))


def is_whiteout(e: Entry) -> bool:
    return e.type == "chr" and e.rdev == 0


def kernel_presentation(
    snap: Mapping[str, Entry], *, version: int = 1, content: bool = True
) -> Snapshot:
    """The snapshot a kernel composefs mount of an image built from ``snap`` shows.

    ``version`` is the composefs format version of the image (1 whenever the tree has a
    whiteout and max_version allows it; version 0 lacks the ``opaque=x`` parent marker).
    ``content``: whether the snapshot to compare with hashes file content.
    Only whiteouts change; everything else is presented as in the source.
    """
    out: Snapshot = dict(snap)
    parents: set[str] = set()
    for p, e in snap.items():
        if not is_whiteout(e):
            continue
        out[p] = _with_xattrs(
            dataclasses.replace(
                e,
                type="reg",
                mode=stat.S_IFREG | stat.S_IMODE(e.mode),
                size=0,
                rdev=0,
                sha256=_EMPTY_SHA256 if content else None,
            ),
            {"trusted.overlay.whiteout": b"", "user.overlay.whiteout": b""},
        )
        parents.add(p.rsplit("/", 1)[0] or "/")
    marks = {"trusted.overlay.whiteouts": b"", "user.overlay.whiteouts": b""}
    if version >= 1:
        marks |= {"trusted.overlay.opaque": b"x", "user.overlay.opaque": b"x"}
    for parent in parents:
        out[parent] = _with_xattrs(out[parent], marks)
    return out

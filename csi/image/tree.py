"""The logical file tree that a composefs image describes.

A :class:`Tree` is a root :class:`Node` (a directory). Directory entries map a raw name
(``bytes``) to either a :class:`Node` or a :class:`HardLink`. A hard link is a further name
for a node that is reachable, under its *primary* name, elsewhere in the tree; the primary
name decides where the inode is placed in an image (composefs places inodes in
breadth-first order of primary names), so the distinction is kept for byte-exact output.

Everything here is plain data: names, xattr keys and values, payloads and contents are
``bytes`` so that any name a filesystem can hold is representable.
"""

from __future__ import annotations

import stat
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import TreeError

S_IFMT = stat.S_IFMT(0o170000)
S_IFDIR = stat.S_IFDIR
S_IFREG = stat.S_IFREG
S_IFLNK = stat.S_IFLNK
S_IFCHR = stat.S_IFCHR
S_IFBLK = stat.S_IFBLK
S_IFIFO = stat.S_IFIFO
S_IFSOCK = stat.S_IFSOCK
FILE_TYPES = frozenset({S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR, S_IFBLK, S_IFIFO, S_IFSOCK})

#: Limits shared by the writer, the dump parser and the directory scanner.
NAME_MAX = 255
PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 65535
#: Files up to this size are stored inline by default (mkcomposefs and composefs-rs agree).
INLINE_CONTENT_DEFAULT_MAX = 64
#: Hard limit of inline content accepted from a dump (libcomposefs LCFS_INLINE_CONTENT_MAX).
INLINE_CONTENT_MAX = 5000
DIGEST_SIZE = 32


def object_path(digest: bytes) -> bytes:
    """The store-relative path ``XX/<62 hex>`` of an object with this fs-verity digest."""
    if len(digest) != DIGEST_SIZE:
        raise TreeError(f"digest must be {DIGEST_SIZE} bytes, got {len(digest)}")
    h = digest.hex()
    return f"{h[:2]}/{h[2:]}".encode()


@dataclass(eq=False, slots=True)
class Node:
    """One inode. ``mode`` carries the file type bits and the permissions."""

    mode: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    mtime_sec: int = 0
    mtime_nsec: int = 0
    #: Regular files: the content size. Symlinks: ignored (the target length is used).
    #: Devices, fifos and sockets may carry a size from a dump; it is never written
    #: but it does affect the compact/extended inode choice, as in libcomposefs.
    size: int = 0
    rdev: int = 0
    #: Regular file: store-relative backing path (``XX/YYYY``) or None. Symlink: target.
    payload: bytes | None = None
    #: Regular file stored inline in the image: its bytes (``len == size``).
    content: bytes | None = None
    #: fs-verity SHA-256 digest of the content of an external regular file.
    digest: bytes | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    #: Directories only: entries by name, excluding ``.`` and ``..``.
    entries: dict[bytes, Node | HardLink] | None = None

    def __post_init__(self) -> None:
        if self.is_dir and self.entries is None:
            self.entries = {}

    @property
    def file_type(self) -> int:
        return self.mode & S_IFMT

    @property
    def is_dir(self) -> bool:
        return self.file_type == S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.file_type == S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.file_type == S_IFLNK

    @property
    def is_whiteout(self) -> bool:
        """An overlay-style whiteout: a character device with device number 0."""
        return self.file_type == S_IFCHR and self.rdev == 0

    @property
    def is_external(self) -> bool:
        """A regular file whose bytes live in the object store, not in the image."""
        return self.is_reg and self.size > 0 and self.content is None

    def add(self, name: bytes, child: Node | HardLink) -> None:
        """Add an entry, validating the name. Replacing an existing name is an error."""
        if self.entries is None:
            raise TreeError("cannot add an entry to a non-directory")
        check_name(name)
        if name in self.entries:
            raise TreeError(f"duplicate entry {name!r}")
        self.entries[name] = child

    def sorted_entries(self) -> list[tuple[bytes, Node | HardLink]]:
        """Entries in the order composefs uses: strcmp on the raw name bytes."""
        assert self.entries is not None
        return sorted(self.entries.items())


@dataclass(eq=False, slots=True)
class HardLink:
    """A further name for ``target``, whose primary name is elsewhere in the tree."""

    target: Node


def check_name(name: bytes) -> None:
    if not name or len(name) > NAME_MAX:
        raise TreeError(f"invalid name length {len(name)} for {name!r}")
    if name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise TreeError(f"invalid name {name!r}")


def resolve(entry: Node | HardLink) -> Node:
    return entry.target if isinstance(entry, HardLink) else entry


@dataclass(eq=False)
class Tree:
    """A whole file tree: ``root`` is a directory node."""

    root: Node

    def __post_init__(self) -> None:
        if not self.root.is_dir:
            raise TreeError("the root of a tree must be a directory")

    @classmethod
    def empty(cls, mode: int = 0o755) -> Tree:
        return cls(Node(mode=S_IFDIR | mode))

    def lookup(self, path: bytes | str) -> Node:
        """The node at an absolute or root-relative path (hard links resolved)."""
        if isinstance(path, str):
            path = path.encode()
        node = self.root
        for part in path.split(b"/"):
            if not part:
                continue
            if node.entries is None or part not in node.entries:
                raise KeyError(path)
            node = resolve(node.entries[part])
        return node

    def walk(self) -> Iterator[tuple[bytes, Node | HardLink]]:
        """Depth-first pre-order walk in sorted name order: ``(abs_path, entry)``.

        The root comes first as ``(b"/", root)``. This is the order of a dump file.
        """
        yield b"/", self.root
        yield from _walk_sub(b"", self.root)

    def bfs(self) -> Iterator[tuple[bytes, Node]]:
        """Breadth-first walk over primary names only: the composefs inode order."""
        q: deque[tuple[bytes, Node]] = deque([(b"/", self.root)])
        while q:
            path, node = q.popleft()
            yield path, node
            if node.entries is not None:
                base = b"" if path == b"/" else path
                for name, entry in node.sorted_entries():
                    if isinstance(entry, Node):
                        q.append((base + b"/" + name, entry))

    def primary_paths(self) -> dict[int, bytes]:
        """``id(node) -> primary absolute path`` for every node."""
        return {id(node): path for path, node in self.bfs()}

    def link_counts(self) -> dict[int, int]:
        """``id(node) -> number of names`` for every non-directory node."""
        counts: dict[int, int] = {}
        for _, entry in self.walk():
            node = resolve(entry)
            if not node.is_dir:
                counts[id(node)] = counts.get(id(node), 0) + 1
        return counts

    def validate(self) -> None:
        """Check the invariants a writer relies on; raise :class:`TreeError` if broken."""
        primaries: set[int] = set()
        for _, node in self.bfs():
            if id(node) in primaries:
                raise TreeError("a node has two primary names (use HardLink for extra names)")
            primaries.add(id(node))
        for path, entry in self.walk():
            if isinstance(entry, HardLink):
                if entry.target.is_dir:
                    raise TreeError(f"hard link to a directory at {path!r}")
                if id(entry.target) not in primaries:
                    raise TreeError(f"hard link at {path!r} points outside the tree")
                continue
            _validate_node(path, entry)


def _walk_sub(prefix: bytes, d: Node) -> Iterator[tuple[bytes, Node | HardLink]]:
    """Pre-order walk below ``d`` without recursion (trees may be thousands of levels deep)."""
    stack: list[Iterator[tuple[bytes, Node | HardLink]]] = [iter(d.sorted_entries())]
    prefixes = [prefix]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            prefixes.pop()
            continue
        name, entry = item
        path = prefixes[-1] + b"/" + name
        yield path, entry
        if isinstance(entry, Node) and entry.is_dir:
            stack.append(iter(entry.sorted_entries()))
            prefixes.append(path)


def _validate_node(path: bytes, n: Node) -> None:
    ft = n.file_type
    if ft not in FILE_TYPES:
        raise TreeError(f"{path!r}: unknown file type {oct(n.mode)}")
    for v, what in ((n.uid, "uid"), (n.gid, "gid"), (n.nlink, "nlink"), (n.rdev, "rdev")):
        if not 0 <= v <= 0xFFFFFFFF:
            raise TreeError(f"{path!r}: {what} {v} out of range")
    # As libcomposefs stores them: signed 64-bit seconds (pre-1970 is negative) and a u32
    # nanosecond field (a dump may carry values past 10^9; they are written as given).
    if not 0 <= n.mtime_nsec <= 0xFFFFFFFF:
        raise TreeError(f"{path!r}: mtime nanoseconds {n.mtime_nsec} out of range")
    if not -(1 << 63) <= n.mtime_sec < 1 << 63:
        raise TreeError(f"{path!r}: mtime seconds {n.mtime_sec} out of range")
    if not 0 <= n.size < 1 << 64:
        raise TreeError(f"{path!r}: size {n.size} out of range")
    if ft == S_IFLNK and (not n.payload or len(n.payload) >= PATH_MAX):
        raise TreeError(f"{path!r}: symlink target must be 1..{PATH_MAX - 1} bytes")
    if ft == S_IFREG:
        if n.content is not None and len(n.content) != n.size:
            raise TreeError(f"{path!r}: inline content length differs from size")
        if n.digest is not None and len(n.digest) != DIGEST_SIZE:
            raise TreeError(f"{path!r}: digest must be {DIGEST_SIZE} bytes")
    for key, value in n.xattrs.items():
        if not 0 < len(key) <= XATTR_NAME_MAX:
            raise TreeError(f"{path!r}: xattr name length {len(key)} out of range")
        if len(value) > XATTR_VALUE_MAX:
            raise TreeError(f"{path!r}: xattr {key!r} value too long ({len(value)})")

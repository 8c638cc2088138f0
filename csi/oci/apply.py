"""Applying layer entries to a file tree, as ``umoci raw unpack`` applies them to a directory.

The tree is kept as :class:`~csi.image.tree.Node` objects; a hard-linked inode is one node
reachable under several names (:func:`finish_tree` turns that into the primary name +
:class:`~csi.image.tree.HardLink` form the writer wants, and sets ``nlink``).

What an entry does (umoci 0.4 ``UnpackEntry``, ``archive/tar`` header semantics):

- Names are cleaned (``./a//b`` is ``a/b``; leading ``/`` dropped). Unlike umoci, which clamps
  ``..`` at the root, a name with a ``..`` component is refused as path traversal.
- The parent directory path is resolved inside the tree, following symlinks scoped to the root
  (``filepath-securejoin``: absolute targets start again at the root, ``..`` stops at the
  root, at most 255 links); missing directories are created (mode 0755, owner 0:0, mtime 0:
  umoci makes them ``0777 &^ umask`` with the time of the unpack). The last component is never
  followed.
- A directory entry over an existing directory keeps its contents and replaces its metadata
  (mode, owner, mtime, xattrs); any other entry replaces what was there (a hard-linked inode
  keeps its other names).
- A hard link entry names the inode at its (resolved) target path, which must exist and not
  be a directory; it carries no metadata of its own.
- Whiteouts: ``.wh.NAME`` removes ``NAME`` and ``.wh..wh..opq`` empties its directory, except
  what this layer itself created (and the directories above it), as umoci's ``upperPaths``.
  They are applied where they occur in the stream.
- The root entry (``./``) may only be a directory and sets the root's metadata.
- Symlinks are mode 0777 whatever their header says (as ``symlink(2)`` makes them; umoci does
  not chmod them).
- Extended attributes umoci never sets are dropped: ``security.selinux``, ``system.nfs4_acl``
  and the overlay-private ``trusted.overlay.{opaque,redirect,origin,impure,nlink,upper,
  metacopy}``.

Every change is also recorded in :class:`LayerChanges`, from which :mod:`csi.oci.delta` makes
the layer's own image (``--layers``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from csi.image.tree import (
    NAME_MAX,
    PATH_MAX,
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFREG,
    HardLink,
    Node,
    Tree,
)

from .errors import LayerError
from .tarstream import BLK, CHR, DIR, FIFO, LINK, REG, SYMLINK, TarEntry

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
MAX_LINKS = 255
#: Extended attributes umoci refuses to set (``ignoreXattrs`` in umoci 0.4).
IGNORED_XATTRS = frozenset(
    {
        b"security.selinux",
        b"system.nfs4_acl",
        b"trusted.overlay.opaque",
        b"trusted.overlay.redirect",
        b"trusted.overlay.origin",
        b"trusted.overlay.impure",
        b"trusted.overlay.nlink",
        b"trusted.overlay.upper",
        b"trusted.overlay.metacopy",
    }
)
_XATTR_BUDGET = 0xFFFF // 2
#: ``(parent, name, node)`` per step of a resolved path below the root.
Chain = list[tuple[Node, bytes, Node]]
_TYPES = {REG: S_IFREG, SYMLINK: S_IFLNK, CHR: S_IFCHR, BLK: S_IFBLK, DIR: S_IFDIR, FIFO: S_IFIFO}


@dataclass
class LayerChanges:
    """What one layer did to the tree (keys are ``id()`` of nodes kept alive in ``keep``)."""

    #: Nodes created by this layer.
    born: set[int] = field(default_factory=set)
    #: Directory -> names this layer placed in it (new entries and hard links).
    added: dict[int, set[bytes]] = field(default_factory=dict)
    #: Directory -> names this layer removed that lower layers had; True if a directory.
    removed: dict[int, dict[bytes, bool]] = field(default_factory=dict)
    #: Directories this layer made opaque (``.wh..wh..opq``).
    opaque: set[int] = field(default_factory=set)
    #: Directories changed by this layer, or with a change somewhere below them.
    dirty: set[int] = field(default_factory=set)
    keep: list[Node] = field(default_factory=list)


def clean_path(raw: bytes, what: str) -> list[bytes]:
    """The components of a tar name (``[]`` is the root); refuses ``..`` and bad names."""
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    for p in parts:
        if p == b"..":
            raise LayerError(f"{what}: refusing the path traversal in {raw!r:.300}")
        if len(p) > NAME_MAX:
            raise LayerError(f"{what}: a name longer than {NAME_MAX} bytes in {raw!r:.300}")
    return parts


def filter_xattrs(xattrs: dict[bytes, bytes], *, overlay_private: bool) -> dict[bytes, bytes]:
    """Drop what umoci drops; ``overlay_private``: also every other ``trusted.overlay.*``."""
    out = {}
    for k, v in xattrs.items():
        if k in IGNORED_XATTRS or (overlay_private and k.startswith(b"trusted.overlay.")):
            continue
        out[k] = v
    return out


def new_root() -> Node:
    return Node(mode=S_IFDIR | 0o755)


class Applier:
    """The tree of an image being unpacked, and the entry-by-entry rules above."""

    def __init__(self, *, overlay_private_xattrs: bool = False) -> None:
        self.root = new_root()
        self._drop_overlay = overlay_private_xattrs
        self.changes = LayerChanges()
        self._touched: set[tuple[int, bytes]] = set()

    def begin_layer(self) -> None:
        self.changes = LayerChanges()
        self._touched = set()

    # -- bookkeeping --------------------------------------------------------------------------

    def _keep(self, node: Node) -> int:
        self.changes.keep.append(node)
        return id(node)

    def _dirty(self, chain: Chain) -> None:
        ch = self.changes
        ch.dirty.add(self._keep(self.root))
        for _parent, _name, node in chain:
            if node.is_dir:
                ch.dirty.add(self._keep(node))

    def _touch(self, chain: Chain) -> None:
        for parent, name, _node in chain:
            self._touched.add((self._keep(parent), name))

    def _remove(self, parent: Node, name: bytes) -> None:
        assert parent.entries is not None
        node = parent.entries.pop(name)
        pid = self._keep(parent)
        added = self.changes.added.get(pid)
        if added is not None and name in added:
            added.discard(name)  # placed by this layer: what it replaced was recorded then
            return
        gone = self.changes.removed.setdefault(pid, {})
        gone[name] = gone.get(name, False) or (isinstance(node, Node) and node.is_dir)

    def _place(self, parent: Node, name: bytes, node: Node, *, new: bool) -> None:
        assert parent.entries is not None
        if name in parent.entries:
            self._remove(parent, name)
        parent.entries[name] = node
        self.changes.added.setdefault(self._keep(parent), set()).add(name)
        if new:
            self.changes.born.add(self._keep(node))

    # -- path resolution ------------------------------------------------------------------------

    def _lexical(self, parts: list[bytes], what: str) -> list[tuple[bytes, Node | None]]:
        """Resolve directory components as securejoin does: ``(name, node or None)`` per step
        of the resulting path (None: missing, or below something that is not a directory)."""
        path: list[tuple[bytes, Node | None]] = []
        todo = list(reversed(parts))
        links = 0
        while todo:
            part = todo.pop()
            if part in (b"", b"."):
                continue
            if part == b"..":
                if path:
                    path.pop()
                continue
            cur = path[-1][1] if path else self.root
            child = None
            if cur is not None and cur.entries is not None:
                got = cur.entries.get(part)
                child = got if isinstance(got, Node) else None
            if child is not None and child.is_symlink:
                links += 1
                if links > MAX_LINKS:
                    raise LayerError(f"{what}: too many levels of symbolic links")
                target = child.payload or b""
                if target.startswith(b"/"):
                    path.clear()
                todo.extend(reversed(target.split(b"/")))
                continue
            path.append((part, child))
        return path

    def _parent_dir(self, parts: list[bytes], what: str) -> Chain:
        """The chain ``(parent, name, dir)`` down to the directory ``parts`` names, creating
        missing directories (as ``MkdirAll``)."""
        chain: Chain = []
        cur = self.root
        for name, node in self._lexical(parts, what):
            if node is None:
                node = new_root()  # an implicit directory: 0755, 0:0, mtime 0
                if cur.entries is None:
                    raise LayerError(f"{what}: a parent is not a directory")
                self._place(cur, name, node, new=True)
            elif not node.is_dir:
                raise LayerError(f"{what}: parent {name!r:.200} is not a directory")
            chain.append((cur, name, node))
            cur = node
        return chain

    def _existing_chain(self, parts: list[bytes], what: str) -> Chain | None:
        """The chain down to the directory ``parts`` resolves to; None if it is not one."""
        chain: Chain = []
        cur = self.root
        for name, node in self._lexical(parts, what):
            if node is None or not node.is_dir:
                return None
            chain.append((cur, name, node))
            cur = node
        return chain

    # -- entries ----------------------------------------------------------------------------

    def whiteout(self, parts: list[bytes], what: str) -> None:
        """Apply a ``.wh.`` entry (``parts`` is its cleaned path, the marker last)."""
        marker = parts[-1]
        chain = self._existing_chain(parts[:-1], what)
        if chain is None:
            return  # nothing there to remove
        d = chain[-1][2] if chain else self.root
        assert d.entries is not None
        self._dirty(chain)
        if marker == OPAQUE_MARKER:
            self.changes.opaque.add(self._keep(d))
            for name in list(d.entries):
                self._remove_untouched(d, name)
            return
        name = marker[len(WHITEOUT_PREFIX) :]
        if not name or name in (b".", b".."):
            raise LayerError(f"{what}: a whiteout without a name to remove")
        self._remove_untouched(d, name)

    def _remove_untouched(self, d: Node, name: bytes) -> None:
        todo = [(d, name)]
        while todo:
            parent, nm = todo.pop()
            assert parent.entries is not None
            node = parent.entries.get(nm)
            if node is None:
                continue
            if (id(parent), nm) not in self._touched:
                self._remove(parent, nm)
                self.changes.dirty.add(self._keep(parent))
            elif isinstance(node, Node) and node.entries is not None:
                self.changes.dirty.add(self._keep(node))
                todo.extend((node, child) for child in node.entries)

    def add(self, entry: TarEntry, parts: list[bytes], node: Node | None, what: str) -> None:
        """Apply a non-whiteout entry. ``node`` is the new inode (None for hard links), built
        by :func:`make_node` with its content already stored."""
        if not parts:
            if entry.type != DIR or node is None:
                raise LayerError(f"{what}: refusing to make the root anything but a directory")
            _set_meta(self.root, node)
            self._dirty([])
            return
        chain = self._parent_dir(parts[:-1], what)
        parent = chain[-1][2] if chain else self.root
        name = parts[-1]
        assert parent.entries is not None
        if entry.type == LINK:
            node = self._link_target(entry, what)
            if parent.entries.get(name) is node:
                raise LayerError(f"{what}: a hard link to itself")
            self._place(parent, name, node, new=False)
        else:
            assert node is not None
            existing = parent.entries.get(name)
            if node.is_dir and isinstance(existing, Node) and existing.is_dir:
                _set_meta(existing, node)
                node = existing
            else:
                self._place(parent, name, node, new=True)
        full = [*chain, (parent, name, node)]
        self._touch(full)
        self._dirty(full)

    def _link_target(self, entry: TarEntry, what: str) -> Node:
        parts = clean_path(entry.linkname, what)
        chain = self._existing_chain(parts[:-1], what) if parts else None
        d = None if chain is None else chain[-1][2] if chain else self.root
        target = d.entries.get(parts[-1]) if d is not None and d.entries is not None else None
        if not isinstance(target, Node):
            raise LayerError(
                f"{what}: hard link to {entry.linkname!r:.300}, which does not exist (yet)"
            )
        if target.is_dir:
            raise LayerError(f"{what}: hard link to the directory {entry.linkname!r:.300}")
        return target


def _set_meta(dst: Node, src: Node) -> None:
    dst.mode = (dst.mode & ~0o7777) | (src.mode & 0o7777)
    dst.uid, dst.gid = src.uid, src.gid
    dst.mtime_sec, dst.mtime_nsec = src.mtime_sec, src.mtime_nsec
    dst.xattrs = dict(src.xattrs)


def make_node(entry: TarEntry, what: str, *, overlay_private_xattrs: bool = False) -> Node:
    """The inode an entry describes (a regular file's content is set by the caller)."""
    ftype = _TYPES[entry.type]
    xattrs = filter_xattrs(entry.xattrs, overlay_private=overlay_private_xattrs)
    budget = 12 if xattrs else 0
    for k, v in xattrs.items():
        budget += 7 + len(k) + len(v)
    if budget > _XATTR_BUDGET:
        raise LayerError(f"{what}: extended attributes exceed {_XATTR_BUDGET} bytes")
    node = Node(
        mode=ftype | entry.mode,
        uid=entry.uid,
        gid=entry.gid,
        mtime_sec=entry.mtime_sec,
        mtime_nsec=entry.mtime_nsec,
        xattrs=xattrs,
    )
    if ftype == S_IFLNK:
        if not entry.linkname or len(entry.linkname) >= PATH_MAX:
            raise LayerError(f"{what}: a symlink target must be 1..{PATH_MAX - 1} bytes")
        node.payload = entry.linkname
        node.size = len(entry.linkname)
        node.mode = S_IFLNK | 0o777  # what symlink(2) makes, whatever the header says
    elif ftype in (S_IFCHR, S_IFBLK):
        if not (0 <= entry.devmajor <= 0xFFF and 0 <= entry.devminor <= 0xFFFFF):
            raise LayerError(
                f"{what}: device number {entry.devmajor}:{entry.devminor} out of range"
            )
        node.rdev = os.makedev(entry.devmajor, entry.devminor) & 0xFFFFFFFF
    elif ftype == S_IFREG:
        node.size = entry.size
    return node


def finish_tree(root: Node) -> Tree:
    """The writer's form of a tree built by :class:`Applier`: every inode's first name in
    breadth-first sorted order is its primary one, the others become :class:`HardLink`; a
    non-directory's ``nlink`` is its number of names. (Mutates the tree.)"""
    names: dict[int, int] = {}
    queue = [root]
    while queue:
        nxt: list[Node] = []
        for d in queue:
            assert d.entries is not None
            for name, entry in sorted(d.entries.items()):
                node = entry.target if isinstance(entry, HardLink) else entry
                if node.is_dir:
                    nxt.append(node)
                    continue
                if id(node) in names:
                    names[id(node)] += 1
                    d.entries[name] = HardLink(node)
                else:
                    names[id(node)] = 1
                    d.entries[name] = node
        queue = nxt
    _set_nlinks(root, names)
    return Tree(root)


def _set_nlinks(root: Node, names: dict[int, int]) -> None:
    stack = [root]
    while stack:
        d = stack.pop()
        assert d.entries is not None
        for entry in d.entries.values():
            if isinstance(entry, Node):
                if entry.is_dir:
                    stack.append(entry)
                else:
                    entry.nlink = names[id(entry)]

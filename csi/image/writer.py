"""composefs image writer, byte-identical to ``mkcomposefs`` 1.0.x for the same tree.

The output is a pure function of the tree and the version bounds (format reference §1.17):
children and xattrs are sorted, inodes are laid out breadth-first, the build time is the
minimum mtime, nothing random or time-dependent is written.

Pipeline (format reference §1):
1. :func:`_rewrite` copies the tree into writer nodes and applies the overlay rewriting
   (§1.14): ``trusted.overlay.*`` escaping, metacopy/redirect for external files, escaped
   whiteouts, the root's opaque marker and the 256 whiteout stubs.
2. breadth-first order, inode numbers, directory link counts, minimum mtime (§1.4).
3. shared xattr table (§1.13).
4. inode sizes, compact/extended choice, tail padding and nids (§1.5, §1.6).
5. serialisation: header, superblock, inodes, shared xattrs, data blocks (§1.1).
"""

from __future__ import annotations

import stat
from collections import deque
from dataclasses import dataclass, field

import xxhash

from . import erofs as E
from .errors import TreeError
from .tree import INLINE_CONTENT_MAX, S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG, HardLink, Node, Tree

VERSION_MAX = 1
_DT = {
    S_IFREG: E.FT_REG_FILE,
    S_IFDIR: E.FT_DIR,
    S_IFCHR: E.FT_CHRDEV,
    stat.S_IFBLK: E.FT_BLKDEV,
    stat.S_IFIFO: E.FT_FIFO,
    stat.S_IFSOCK: E.FT_SOCK,
    S_IFLNK: E.FT_SYMLINK,
}


@dataclass(eq=False, slots=True)
class _W:
    """A writer node: one inode of the output image."""

    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: tuple[int, int]
    size: int
    rdev: int
    content: bytes | None
    symlink: bytes | None
    xattrs: dict[bytes, bytes]
    # (name, inode); "." and ".." are added before layout. Primary children are _W nodes
    # with is_link False; hard links point at the target _W.
    children: list[tuple[bytes, _W, bool]] | None = None
    # computed
    chunks: list[list[tuple[bytes, _W, bool]]] = field(default_factory=list)
    ino: int = 0
    sorted_xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    shared: list[int] = field(default_factory=list)  # per sorted xattr: table offset or -1
    n_blocks: int = 0
    tail: int = 0
    compact: bool = True
    xattr_size: int = 0
    ipad: int = 0
    isize: int = 0
    nid: int = 0

    @property
    def ftype(self) -> int:
        return self.mode & 0o170000


def choose_version(tree: Tree, min_version: int = 0, max_version: int = VERSION_MAX) -> int:
    """The composefs format version mkcomposefs would write (format reference §1.15)."""
    if not 0 <= min_version <= max_version <= VERSION_MAX:
        raise TreeError(f"unsupported version range {min_version}..{max_version}")
    if min_version >= 1 or max_version < 1:
        return min_version
    for _, node in tree.bfs():
        if node.is_whiteout:
            return 1
    return min_version


def write_image(tree: Tree, *, min_version: int = 0, max_version: int = VERSION_MAX) -> bytes:
    """Serialise ``tree`` as a composefs image and return its bytes."""
    tree.validate()
    version = choose_version(tree, min_version, max_version)
    root = _rewrite(tree, version)
    order = _breadth_first(root)
    min_mtime = min(w.mtime for w in order)
    has_acl = False
    for w in order:
        w.sorted_xattrs = sorted(w.xattrs.items())
        if b"system.posix_acl_access" in w.xattrs or b"system.posix_acl_default" in w.xattrs:
            has_acl = True
    shared_table, shared_size = _share_xattrs(order)
    inodes_end, n_data_blocks = _layout(order, min_mtime)
    return _serialise(
        order, version, has_acl, min_mtime, shared_table, shared_size, inodes_end, n_data_blocks
    )


# -- 1. rewriting ------------------------------------------------------------------------------


def _rewrite(tree: Tree, version: int) -> _W:
    made: dict[int, _W] = {}

    def convert(node: Node) -> _W:
        xattrs: dict[bytes, bytes] = {}
        for key, value in node.xattrs.items():
            if key.startswith(E.OVL_PREFIX):
                key = E.OVL_ESCAPED_PREFIX + key[len(E.OVL_PREFIX) :]
            xattrs[key] = value
        ft = node.file_type
        size = node.size
        content: bytes | None = None
        symlink: bytes | None = None
        if ft == S_IFREG:
            if size > 0 and node.content is not None:
                if size > INLINE_CONTENT_MAX:
                    raise TreeError(f"inline content of {size} bytes exceeds {INLINE_CONTENT_MAX}")
                content = node.content
            elif size > 0:
                if E.chunk_count(size) > E.MAX_NONINLINE_CHUNKS:
                    raise TreeError(f"file too large for a composefs image: {size} bytes")
                xattrs[E.OVL_METACOPY] = E.metacopy_value(node.digest)
                if node.payload:
                    xattrs[E.OVL_REDIRECT] = b"/" + node.payload
        elif ft == S_IFLNK:
            assert node.payload is not None
            symlink = node.payload
            size = len(symlink)
        w = _W(
            mode=node.mode,
            uid=node.uid,
            gid=node.gid,
            nlink=node.nlink,
            mtime=(node.mtime_sec, node.mtime_nsec),
            size=size,
            rdev=node.rdev,
            content=content,
            symlink=symlink,
            xattrs=xattrs,
        )
        made[id(node)] = w
        return w

    root = convert(tree.root)
    # Convert primaries breadth-first so that hard links (whose targets may be anywhere)
    # can be resolved in a second pass.
    pending: list[tuple[Node, _W]] = []
    queue: deque[tuple[Node, _W]] = deque([(tree.root, root)])
    while queue:
        node, w = queue.popleft()
        pending.append((node, w))
        assert node.entries is not None
        for _, entry in node.sorted_entries():
            if isinstance(entry, Node):
                cw = convert(entry)
                if entry.is_dir:
                    queue.append((entry, cw))
    for node, w in pending:
        assert node.entries is not None
        children: list[tuple[bytes, _W, bool]] = []
        for name, entry in node.sorted_entries():
            if isinstance(entry, HardLink):
                children.append((name, made[id(entry.target)], True))
            else:
                children.append((name, made[id(entry)], False))
        w.children = children

    # Escaped whiteouts (a chr 0/0 anywhere) and their parents' markers.
    for _, w in pending:
        assert w.children is not None
        for _, child, is_link in w.children:
            if is_link or child.ftype != S_IFCHR or child.rdev != 0:
                continue
            child.size = 0
            child.mode = S_IFREG | (child.mode & ~0o170000)
            child.xattrs[E.OVL_ESCAPED_WHITEOUT] = b""
            child.xattrs[E.USER_OVL_WHITEOUT] = b""
            w.xattrs[E.OVL_ESCAPED_WHITEOUTS] = b""
            w.xattrs[E.USER_OVL_WHITEOUTS] = b""
            if version >= 1:
                w.xattrs[E.OVL_ESCAPED_OPAQUE] = b"x"
                w.xattrs[E.USER_OVL_OPAQUE] = b"x"

    root.xattrs[E.OVL_OPAQUE] = b"y"
    _add_whiteout_stubs(root)
    return root


def _add_whiteout_stubs(root: _W) -> None:
    assert root.children is not None
    existing = {name for name, _, _ in root.children}
    selinux = root.xattrs.get(b"security.selinux")
    for i in range(256):
        name = b"%02x" % i
        if name in existing:
            continue
        stub = _W(
            mode=S_IFCHR | 0o644,
            uid=root.uid,
            gid=root.gid,
            nlink=1,
            mtime=root.mtime,
            size=0,
            rdev=0,
            content=None,
            symlink=None,
            xattrs={b"security.selinux": selinux} if selinux is not None else {},
        )
        root.children.append((name, stub, False))
    root.children.sort(key=lambda c: c[0])


# -- 2. breadth-first order ----------------------------------------------------------------------


def _breadth_first(root: _W) -> list[_W]:
    order: list[_W] = []
    queue: deque[tuple[_W, _W]] = deque([(root, root)])
    while queue:
        w, parent = queue.popleft()
        w.ino = len(order)
        order.append(w)
        if w.children is None:
            continue
        subdirs = 0
        for _, child, is_link in w.children:
            if is_link:
                continue
            if child.ftype == S_IFDIR:
                subdirs += 1
            queue.append((child, w))
        w.nlink = 2 + subdirs
        w.children = sorted(
            [*w.children, (b".", w, True), (b"..", parent, True)], key=lambda c: c[0]
        )
    return order


# -- 3. shared xattrs ----------------------------------------------------------------------------


def _entry_size(key: bytes, value: bytes) -> int:
    _, suffix = E.xattr_prefix_index(key)
    return E.round_up(E.XATTR_ENTRY.size + len(suffix) + len(value), 4)


def _share_xattrs(order: list[_W]) -> tuple[list[tuple[bytes, bytes]], int]:
    counts: dict[tuple[bytes, bytes], int] = {}
    for w in order:
        for kv in w.sorted_xattrs:
            counts[kv] = counts.get(kv, 0) + 1
    table = sorted(
        (kv for kv, n in counts.items() if n > 1),
        key=lambda kv: (kv[0], len(kv[1]), kv[1]),
        reverse=True,
    )
    offsets: dict[tuple[bytes, bytes], int] = {}
    pos = 0
    for kv in table:
        offsets[kv] = pos
        pos += _entry_size(*kv)
    for w in order:
        n_shared = 0
        shared: list[int] = []
        for kv in w.sorted_xattrs:
            off = offsets.get(kv, -1)
            if off >= 0 and n_shared < E.XATTR_MAX_SHARED:
                shared.append(off)
                n_shared += 1
            else:
                shared.append(-1)
        w.shared = shared
    return table, pos


# -- 4. layout -----------------------------------------------------------------------------------


def _dir_chunks(w: _W) -> list[list[tuple[bytes, _W, bool]]]:
    """Dirents split into chunks that each fit one block (greedy, as the C writer packs)."""
    assert w.children is not None
    chunks: list[list[tuple[bytes, _W, bool]]] = [[]]
    used = 0
    for child in w.children:
        cost = E.DIRENT.size + len(child[0])
        if used + cost > E.BLOCK_SIZE:
            chunks.append([])
            used = 0
        chunks[-1].append(child)
        used += cost
    return chunks


def _chunk_bytes(chunk: list[tuple[bytes, _W, bool]]) -> int:
    return sum(E.DIRENT.size + len(name) for name, _, _ in chunk)


def _inode_size(w: _W) -> None:
    ft = w.ftype
    if ft == S_IFDIR:
        w.chunks = chunks = _dir_chunks(w)
        w.n_blocks = len(chunks) - 1
        w.tail = _chunk_bytes(chunks[-1])
        if w.tail > E.BLOCK_SIZE // 2:
            w.n_blocks += 1
            w.tail = 0
    elif ft == S_IFLNK:
        assert w.symlink is not None
        w.n_blocks = 0
        w.tail = len(w.symlink)
    elif ft == S_IFREG and w.size > 0:
        if w.content is not None:
            w.n_blocks, w.tail = divmod(w.size, E.BLOCK_SIZE)
            if w.tail > E.BLOCK_SIZE // 2:
                w.n_blocks += 1
                w.tail = 0
        else:
            w.n_blocks = 0
            w.tail = E.chunk_count(w.size) * 4
    else:
        w.n_blocks = 0
        w.tail = 0


def _logical_size(w: _W) -> int:
    if w.ftype == S_IFDIR:
        return w.n_blocks * E.BLOCK_SIZE + w.tail
    return w.size


def _tail_padding(w: _W, pos: int, inode_size: int) -> int:
    """Padding before the inode so that an inline tail never crosses a block (§1.6)."""
    non_tail = inode_size + w.xattr_size
    total = non_tail + w.tail
    bs = E.BLOCK_SIZE
    if w.ftype == S_IFLNK:
        if total // bs > 0:
            w.n_blocks += 1
            w.tail = 0
        if pos // bs != (pos + total - 1) // bs:
            return E.round_up(pos, bs) - pos
        return 0
    remainder = bs - ((pos + non_tail) % bs)
    if remainder < w.tail:
        extra = E.round_up(remainder, E.SLOT_SIZE)
        remainder = bs - ((pos + non_tail + extra) % bs)
        if w.tail <= remainder:
            return extra
        w.n_blocks += 1
        w.tail = 0
        return E.round_up(pos, bs) - pos
    return 0


def _layout(order: list[_W], min_mtime: tuple[int, int]) -> tuple[int, int]:
    pos = E.SUPER_OFFSET + E.SUPERBLOCK.size
    n_data_blocks = 0
    for w in order:
        _inode_size(w)
        w.compact = (
            w.mtime == min_mtime
            and w.nlink <= 0xFFFF
            and w.uid <= 0xFFFF
            and w.gid <= 0xFFFF
            and _logical_size(w) <= 0xFFFFFFFF
        )
        inode_size = E.INODE_COMPACT.size if w.compact else E.INODE_EXTENDED.size
        n_shared = sum(1 for off in w.shared if off >= 0)
        unshared = sum(
            _entry_size(k, v)
            for (k, v), off in zip(w.sorted_xattrs, w.shared, strict=True)
            if off < 0
        )
        w.xattr_size = (
            0
            if n_shared == 0 and unshared == 0
            else E.round_up(E.XATTR_IBODY_HEADER.size + 4 * n_shared + unshared, 4)
        )
        aligned = E.round_up(pos, E.SLOT_SIZE)
        w.ipad = aligned - pos
        pos = aligned
        extra = _tail_padding(w, pos, inode_size)
        w.ipad += extra
        pos += extra
        w.isize = inode_size + w.xattr_size + w.tail
        n_data_blocks += w.n_blocks
        w.nid = pos // E.SLOT_SIZE  # meta_blkaddr is 0
        pos += w.isize
    return E.round_up(pos, E.SLOT_SIZE), n_data_blocks


# -- 5. serialisation ----------------------------------------------------------------------------


def _xattr_entry(key: bytes, value: bytes) -> bytes:
    index, suffix = E.xattr_prefix_index(key)
    raw = E.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
    return raw + bytes(-len(raw) % 4)


def _name_filter(w: _W) -> int:
    bits = 0
    for key, _ in w.sorted_xattrs:
        index, suffix = E.xattr_prefix_index(key)
        bits |= 1 << (xxhash.xxh32_intdigest(suffix, E.XATTR_FILTER_SEED + index) & 31)
    return E.XATTR_FILTER_DEFAULT & ~bits


def _dirent_chunk(chunk: list[tuple[bytes, _W, bool]]) -> bytes:
    nameoff = len(chunk) * E.DIRENT.size
    heads = bytearray()
    names = bytearray()
    for name, target, _ in chunk:
        heads += E.DIRENT.pack(target.nid, nameoff, _DT[target.ftype])
        names += name
        nameoff += len(name)
    return bytes(heads + names)


def _serialise(
    order: list[_W],
    version: int,
    has_acl: bool,
    min_mtime: tuple[int, int],
    shared_table: list[tuple[bytes, bytes]],
    shared_size: int,
    inodes_end: int,
    n_data_blocks: int,
) -> bytes:
    bs = E.BLOCK_SIZE
    data_start = E.round_up(inodes_end + shared_size, bs)
    root = order[0]
    if root.nid >= 0xFFFF:
        raise TreeError("root inode number out of range")
    out = bytearray()
    out += E.HEADER.pack(
        E.COMPOSEFS_MAGIC,
        E.COMPOSEFS_HEADER_VERSION,
        E.COMPOSEFS_FLAG_HAS_ACL if has_acl else 0,
        version,
    )
    out += bytes(E.SUPER_OFFSET - len(out))
    out += E.SUPERBLOCK.pack(
        E.EROFS_MAGIC,
        0,
        E.FEATURE_COMPAT_MTIME | E.FEATURE_COMPAT_XATTR_FILTER,
        E.BLOCK_BITS,
        0,
        root.nid,
        len(order),
        min_mtime[0] & E.U64,
        min_mtime[1],
        data_start // bs + n_data_blocks,
        (E.SUPER_OFFSET + E.SUPERBLOCK.size) // bs,
        inodes_end // bs,
        b"",
        b"",
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    )

    current_end = data_start
    data = bytearray()  # the data blocks area, written after the shared xattrs
    for w in order:
        out += bytes(w.ipad)
        ft = w.ftype
        chunk_fmt: int | None = None
        layout = E.LAYOUT_FLAT_INLINE if w.tail > 0 else E.LAYOUT_FLAT_PLAIN
        if ft == S_IFDIR:
            size = w.n_blocks * bs + w.tail
        elif ft == S_IFREG:
            size = w.size
            if size > 0 and w.content is None:
                layout = E.LAYOUT_CHUNK_BASED
                chunk_fmt = E.chunk_bits(size) - E.BLOCK_BITS
        elif ft == S_IFLNK:
            size = w.size
        else:
            size = 0
        i_u = 0
        if ft in (S_IFCHR, stat.S_IFBLK):
            i_u = w.rdev & 0xFFFFFFFF
        elif ft in (S_IFDIR, S_IFREG, S_IFLNK):
            if w.n_blocks > 0:
                i_u = current_end // bs
                current_end += bs * w.n_blocks
                data += _block_data(w)
            if chunk_fmt is not None:
                i_u = (i_u & 0xFFFF0000) | chunk_fmt
        icount = 0 if w.xattr_size == 0 else (w.xattr_size - E.XATTR_IBODY_HEADER.size) // 4 + 1
        if icount > 0xFFFF:
            raise TreeError("too many extended attributes on one inode")
        if w.compact:
            fmt = layout << 1
            out += E.INODE_COMPACT.pack(
                fmt, icount, w.mode & 0xFFFF, w.nlink, size, 0, i_u, w.ino, w.uid, w.gid, 0
            )
        else:
            fmt = layout << 1 | 1
            out += E.INODE_EXTENDED.pack(
                fmt,
                icount,
                w.mode & 0xFFFF,
                0,
                size,
                i_u,
                w.ino,
                w.uid,
                w.gid,
                w.mtime[0] & E.U64,
                w.mtime[1],
                w.nlink,
            )
        if w.xattr_size:
            start = len(out)
            shared = [off for off in w.shared if off >= 0]
            out += E.XATTR_IBODY_HEADER.pack(_name_filter(w), len(shared))
            for off in shared:
                out += ((inodes_end % bs + off) // 4).to_bytes(4, "little")
            for (k, v), off in zip(w.sorted_xattrs, w.shared, strict=True):
                if off < 0:
                    out += _xattr_entry(k, v)
            assert len(out) - start == w.xattr_size
        if w.tail:
            out += _tail_data(w)
    out += bytes(E.round_up(len(out), E.SLOT_SIZE) - len(out))
    assert len(out) == inodes_end
    for k, v in shared_table:
        out += _xattr_entry(k, v)
    out += bytes(E.round_up(len(out), bs) - len(out))
    assert len(out) == data_start
    out += data
    assert len(out) == current_end == data_start + n_data_blocks * bs
    return bytes(out)


def _tail_data(w: _W) -> bytes:
    ft = w.ftype
    if ft == S_IFDIR:
        return _dirent_chunk(w.chunks[-1]) if w.n_blocks < len(w.chunks) else b""
    if ft == S_IFLNK:
        assert w.symlink is not None
        return w.symlink
    if ft == S_IFREG:
        if w.content is not None:
            return w.content[w.size - w.tail :]
        return E.NULL_ADDR.to_bytes(4, "little") * (w.tail // 4)
    return b""


def _block_data(w: _W) -> bytes:
    """The full data blocks of a node (directory blocks, inline content, symlink target)."""
    bs = E.BLOCK_SIZE
    ft = w.ftype
    out = bytearray()
    if ft == S_IFDIR:
        chunks = w.chunks
        # The first n_blocks chunks are full blocks; a last chunk not inlined is a block too.
        for chunk in chunks[: w.n_blocks]:
            raw = _dirent_chunk(chunk)
            out += raw + bytes(bs - len(raw))
    elif ft == S_IFREG:
        if w.content is None:
            out += E.NULL_ADDR.to_bytes(4, "little") * (bs // 4)
        else:
            for i in range(w.n_blocks):
                piece = w.content[i * bs : (i + 1) * bs]
                out += piece + bytes(bs - len(piece))
    elif ft == S_IFLNK:
        assert w.symlink is not None
        out += w.symlink + bytes(bs - len(w.symlink))
    assert len(out) == w.n_blocks * bs
    return bytes(out)

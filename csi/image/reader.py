"""A bounds-checked reader of composefs images (EROFS metadata images as mkcomposefs writes them).

Images come from the network, so every offset, length and count taken from an image is checked
before use, and every problem is reported as :class:`~csi.image.errors.FormatError` naming what
is wrong and where. Nothing is pre-walked when an image is opened: the header, the superblock and
the root inode are checked eagerly, everything else lazily, one inode or directory block at a time,
as the FUSE data plane asks for it. :meth:`Image.validate` walks the whole image eagerly (with an
amount of work bounded by the image size) and should be run before serving an untrusted image.

Two views are offered:

* the *raw* view (``raw_dirents``, ``raw_xattrs``, :class:`Attr`): what is stored;
* the *presented* view (``readdir``, ``lookup``, ``listxattr``, ``getxattr``): what a kernel
  composefs mount (EROFS + overlayfs) shows, see the format reference §1.20: ``.``/``..`` and
  every character device 0/0 (whiteout) are hidden, ``trusted.overlay.overlay.X`` is shown as
  ``trusted.overlay.X`` and every other ``trusted.overlay.*`` xattr is hidden.

:meth:`Image.to_tree` undoes the composefs rewriting so that writing the tree again gives the
same image.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import re
import stat
import struct
from collections import OrderedDict, deque
from collections.abc import Iterator
from types import TracebackType
from typing import Final, NamedTuple

from . import erofs as E
from .errors import FormatError
from .tree import DIGEST_SIZE, HardLink, Node, Tree

__all__ = ["Attr", "Image"]

# -- on-disk constants (EROFS erofs_fs.h, composefs lcfs-erofs.h) ---------------------------

BLOCK_BITS: Final = E.BLOCK_BITS
BLOCK_SIZE: Final = E.BLOCK_SIZE
_SLOT_BITS: Final = 5
#: Incompatible features that do not change how an uncompressed image is read.
_INCOMPAT_OK: Final = 0x1 | 0x4  # ZERO_PADDING (compression only), CHUNKED_FILE
_SUPPORTED_VERSIONS: Final = (0, 1, 2)

_HEADER = struct.Struct("<IIII")  # magic, version, flags, composefs_version
# magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos, build_time,
# build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr
_SUPER = struct.Struct("<IIIBBHQqIIII")  # build_time is signed, as libcomposefs writes it
_SUPER_INCOMPAT = struct.Struct("<I")  # feature_incompat at superblock offset 80
_SUPER_SIZE: Final = 128
# i_format, i_xattr_icount, i_mode, i_nlink, i_size, reserved, i_u, i_ino, i_uid, i_gid
_COMPACT = struct.Struct("<HHHHIIIIHH")
_COMPACT_SIZE: Final = 32
# i_format, i_xattr_icount, i_mode, reserved, i_size, i_u, i_ino, i_uid, i_gid, i_mtime,
# i_mtime_nsec, i_nlink
_EXTENDED = struct.Struct("<HHHHQIIIIqII")  # i_mtime signed (pre-1970 mtimes)
_EXTENDED_SIZE: Final = 64
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_DIRENT = struct.Struct("<QHBB")  # nid, nameoff, file_type, reserved
_DIRENT_SIZE: Final = 12
_XATTR_IBODY = struct.Struct("<IB")  # h_name_filter, h_shared_count (+7 reserved)
_XATTR_IBODY_SIZE: Final = 12
_XATTR_ENTRY = struct.Struct("<BBH")  # e_name_len, e_name_index, e_value_size
_XATTR_ENTRY_SIZE: Final = 4

LAYOUT_FLAT_PLAIN: Final = E.LAYOUT_FLAT_PLAIN
LAYOUT_FLAT_INLINE: Final = E.LAYOUT_FLAT_INLINE
LAYOUT_CHUNK_BASED: Final = E.LAYOUT_CHUNK_BASED
_PATH_MAX: Final = 4096
_NAME_MAX: Final = 255

#: Dirent file_type values -> S_IFMT bits.
_FT_TO_IFMT: Final = {
    1: stat.S_IFREG,
    2: stat.S_IFDIR,
    3: stat.S_IFCHR,
    4: stat.S_IFBLK,
    5: stat.S_IFIFO,
    6: stat.S_IFSOCK,
    7: stat.S_IFLNK,
}
FT_CHRDEV: Final = 3
_VALID_IFMT: Final = frozenset(_FT_TO_IFMT.values())

_XATTR_PREFIXES: Final[dict[int, bytes]] = {0: b"", **E.XATTR_PREFIXES}

_SELINUX: Final = b"security.selinux"
_STUB_NAMES: Final = frozenset(f"{i:02x}".encode() for i in range(256))
_STUB_MODE: Final = stat.S_IFCHR | 0o644
_OBJECT_PATH = re.compile(rb"[0-9a-f]{2}/[0-9a-f]{62}\Z")
_METACOPY_LEN: Final = 4 + DIGEST_SIZE

_DEFAULT_CACHE: Final = 4096
_DIR_CACHE: Final = 256
_BLOCK_CACHE: Final = 128


class Attr(NamedTuple):
    """One inode as stored in the image. (A named tuple: one is made per inode of a walk,
    and a frozen dataclass, built with a setattr per field, made a 100k-inode walk 7%
    slower.)"""

    nid: int
    #: What the kernel shows as ``st_ino``: the nid.
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    #: ``i_size``: content size of files, target length of symlinks, EROFS size of directories.
    size: int
    #: Signed seconds (negative before 1970).
    mtime_sec: int
    #: As stored (a u32: libcomposefs keeps values past 10^9 from dumps; normalise for stat).
    mtime_nsec: int
    #: Device number (raw ``st_rdev``) of character and block devices, else 0.
    rdev: int
    #: EROFS data layout: 0 flat plain, 2 flat inline, 4 chunk based.
    layout: int
    #: The ``i_ino`` field (the writer's breadth-first index in composefs v0/v1 images).
    i_ino: int


class _Ino:
    """Everything needed to read one inode, parsed and checked once."""

    __slots__ = ("attr", "data_off", "ifmt", "raw_blkaddr", "xattr_off", "xattr_size")

    def __init__(
        self,
        attr: Attr,
        ifmt: int,
        xattr_off: int,
        xattr_size: int,
        data_off: int,
        raw_blkaddr: int,
    ) -> None:
        self.attr = attr
        self.ifmt = ifmt
        self.xattr_off = xattr_off
        self.xattr_size = xattr_size
        #: Where inline data (the tail of flat inline inodes, the chunk table) starts.
        self.data_off = data_off
        self.raw_blkaddr = raw_blkaddr


class _Budget:
    """Bounds the total work of a whole-image walk by the size of the image.

    In a well-formed image, inodes, directory data, inline file data and shared xattr entries
    never overlap, so a walk that touches each of them once touches at most the image's bytes.
    A malformed image whose structures overlap (many nids pointing into one big xattr body,
    many directories sharing blocks) would make a naive walk quadratic; it runs out of budget
    instead.
    """

    __slots__ = ("left",)

    def __init__(self, image_size: int) -> None:
        self.left = 2 * image_size + (1 << 16)

    def spend(self, n: int, what: str, nid: int) -> None:
        """Spend ``n`` on ``what % nid`` (formatted only for the error: this runs several
        times per inode)."""
        self.left -= n
        if self.left < 0:
            raise FormatError(
                f"{what % nid}: image structures overlap (more data referenced than the image "
                "holds)"
            )


class Image:
    """A composefs image in memory (``bytes``) or mapped from a file (:meth:`open`).

    Directory offsets for :meth:`readdir` are resume cookies: the number of *presented*
    entries already returned (0 = start). They stay valid for the life of the image.
    """

    version: int
    flags: int
    root_nid: int
    build_time: tuple[int, int]
    inode_count: int
    blocks: int
    feature_compat: int

    def __init__(
        self,
        buffer: bytes | bytearray | memoryview | mmap.mmap,
        *,
        cache_size: int = _DEFAULT_CACHE,
    ) -> None:
        if isinstance(buffer, mmap.mmap):
            buf: bytes | mmap.mmap = buffer
        else:
            # Copy mutable/sliced buffers: the checks below must hold for the bytes later read.
            buf = bytes(buffer)
        self._buf = buf
        self._size = len(buf)
        self._mmap: mmap.mmap | None = None
        self._cache_size = max(16, cache_size)
        # Per-image caches (the FUSE data plane asks for the same inodes over and over).
        self._inode = functools.lru_cache(maxsize=self._cache_size)(self._load_inode)
        self._xattr_cache: OrderedDict[int, list[tuple[bytes, bytes]]] = OrderedDict()
        self._dir_index: OrderedDict[int, list[int]] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int], list[tuple[bytes, int, int]]] = OrderedDict()
        self._block_maps: OrderedDict[tuple[int, int], dict[bytes, int]] = OrderedDict()
        self._parse_super()

    # -- opening and closing ----------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, cache_size: int = _DEFAULT_CACHE) -> Image:
        """Map the image file read-only (read it whole if it cannot be mapped, e.g. empty)."""
        with open(path, "rb") as f:
            try:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (ValueError, OSError):
                data = f.read()
                return cls(data, cache_size=cache_size)
        try:
            img = cls(m, cache_size=cache_size)
        except BaseException:
            m.close()
            raise
        img._mmap = m
        return img

    def close(self) -> None:
        self._inode.cache_clear()
        self._xattr_cache.clear()
        self._dir_index.clear()
        self._blocks.clear()
        self._block_maps.clear()
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def __enter__(self) -> Image:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def size(self) -> int:
        """The image size in bytes."""
        return self._size

    # -- header and superblock ---------------------------------------------------------------

    def _parse_super(self) -> None:
        n = self._size
        if n < E.SUPER_OFFSET + _SUPER_SIZE:
            raise FormatError(f"image too small ({n} bytes) for a composefs header and superblock")
        magic, hversion, flags, cversion = _HEADER.unpack_from(self._buf, 0)
        if magic != E.COMPOSEFS_MAGIC:
            raise FormatError(f"bad composefs magic {magic:#010x}")
        if hversion != E.COMPOSEFS_HEADER_VERSION:
            raise FormatError(f"unsupported composefs header version {hversion}")
        if cversion not in _SUPPORTED_VERSIONS:
            raise FormatError(f"unsupported composefs format version {cversion}")
        (
            emagic,
            _checksum,
            compat,
            blkszbits,
            _extslots,
            root_nid,
            inos,
            build_time,
            build_time_nsec,
            blocks,
            meta_blkaddr,
            xattr_blkaddr,
        ) = _SUPER.unpack_from(self._buf, E.SUPER_OFFSET)
        if emagic != E.EROFS_MAGIC:
            raise FormatError(f"bad EROFS superblock magic {emagic:#010x}")
        if blkszbits != BLOCK_BITS:
            raise FormatError(f"unsupported EROFS block size bits {blkszbits} (need 12)")
        (incompat,) = _SUPER_INCOMPAT.unpack_from(self._buf, E.SUPER_OFFSET + 80)
        if incompat & ~_INCOMPAT_OK:
            raise FormatError(f"unsupported EROFS incompatible features {incompat:#x}")
        if blocks * BLOCK_SIZE > n:
            raise FormatError(
                f"superblock says {blocks} blocks but the image has {n} bytes (truncated?)"
            )
        self._meta_base = meta_blkaddr * BLOCK_SIZE
        self._xattr_base = xattr_blkaddr * BLOCK_SIZE
        if self._meta_base >= n:
            raise FormatError(f"meta_blkaddr {meta_blkaddr} past end of image (size {n})")
        if self._xattr_base >= n:
            raise FormatError(f"xattr_blkaddr {xattr_blkaddr} past end of image (size {n})")
        self.version = cversion
        self.flags = flags
        self.root_nid = root_nid
        self.build_time = (build_time, build_time_nsec)
        self.inode_count = inos
        self.blocks = blocks
        self.feature_compat = compat
        root = self._inode(root_nid)
        if root.ifmt != stat.S_IFDIR:
            raise FormatError(f"root nid {root_nid} is not a directory (mode {root.attr.mode:o})")

    # -- inodes ------------------------------------------------------------------------------

    def _load_inode(self, nid: int) -> _Ino:
        buf = self._buf
        n = self._size
        if nid < 0:
            raise FormatError(f"nid {nid}: negative")
        off = self._meta_base + (nid << _SLOT_BITS)
        if off + _COMPACT_SIZE > n:
            raise FormatError(f"nid {nid}: inode past end of image (size {n})")
        (fmt,) = _U16.unpack_from(buf, off)
        if fmt & ~0xF:
            raise FormatError(f"nid {nid}: unsupported i_format {fmt:#x}")
        layout = fmt >> 1
        if fmt & 1:
            if off + _EXTENDED_SIZE > n:
                raise FormatError(f"nid {nid}: extended inode past end of image (size {n})")
            (
                _f,
                icount,
                mode,
                _r,
                size,
                i_u,
                i_ino,
                uid,
                gid,
                mtime,
                mtime_nsec,
                nlink,
            ) = _EXTENDED.unpack_from(buf, off)
            isize = _EXTENDED_SIZE
        else:
            (_f, icount, mode, nlink, size, _r, i_u, i_ino, uid, gid) = _COMPACT.unpack_from(
                buf, off
            )
            isize = _COMPACT_SIZE
            mtime, mtime_nsec = self.build_time
        ifmt = mode & 0o170000
        if ifmt not in _VALID_IFMT:
            raise FormatError(f"nid {nid}: unknown file type in mode {mode:o}")
        xsize = _XATTR_IBODY_SIZE + 4 * (icount - 1) if icount else 0
        xoff = off + isize
        doff = xoff + xsize
        if doff > n:
            raise FormatError(f"nid {nid}: xattrs ({xsize} bytes) past end of image (size {n})")
        rdev = 0
        raw_blkaddr = 0
        if layout == LAYOUT_CHUNK_BASED:
            if ifmt != stat.S_IFREG:
                raise FormatError(f"nid {nid}: chunk-based layout on a non-regular file")
            cfmt = i_u & 0xFFFF
            if cfmt & ~E.CHUNK_FORMAT_BLKBITS_MASK:
                raise FormatError(f"nid {nid}: unsupported chunk format {cfmt:#x}")
            bits = BLOCK_BITS + cfmt
            # 64-bit arithmetic as libcomposefs: wraps for sizes within a chunk of 2^64
            count = ((size + (1 << bits) - 1) & E.U64) >> bits
            if doff + 4 * count > n:
                raise FormatError(
                    f"nid {nid}: chunk table of {count} chunks past end of image (size {n})"
                )
        elif layout in (LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE):
            if ifmt in (stat.S_IFCHR, stat.S_IFBLK):
                rdev = i_u
            elif ifmt in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
                raw_blkaddr = i_u
                if ifmt == stat.S_IFLNK and not 0 < size < _PATH_MAX:
                    raise FormatError(f"nid {nid}: symlink size {size} out of range")
                self._check_flat(nid, layout, size, raw_blkaddr, doff)
        else:
            raise FormatError(f"nid {nid}: unsupported data layout {layout}")
        attr = Attr(nid, nid, mode, uid, gid, nlink, size, mtime, mtime_nsec, rdev, layout, i_ino)
        return _Ino(attr, ifmt, xoff, xsize, doff, raw_blkaddr)

    def _check_flat(self, nid: int, layout: int, size: int, blkaddr: int, doff: int) -> None:
        n = self._size
        if layout == LAYOUT_FLAT_INLINE:
            tail = size & (BLOCK_SIZE - 1)
            full = size - tail
            if tail:
                if (doff & (BLOCK_SIZE - 1)) + tail > BLOCK_SIZE:
                    raise FormatError(f"nid {nid}: inline data crosses a block boundary")
                if doff + tail > n:
                    raise FormatError(f"nid {nid}: inline data past end of image (size {n})")
        else:
            full = size
        if full and blkaddr * BLOCK_SIZE + full > n:
            raise FormatError(
                f"nid {nid}: data blocks {blkaddr}+{size} bytes past end of image (size {n})"
            )

    def getattr(self, nid: int) -> Attr:
        return self._inode(nid).attr

    # -- file data -----------------------------------------------------------------------------

    def _read_flat(self, ino: _Ino, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of a flat inode's data, clamped to its size."""
        size = ino.attr.size
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(size, offset + length)
        if offset >= end:
            return b""
        base = ino.raw_blkaddr * BLOCK_SIZE
        if ino.attr.layout == LAYOUT_FLAT_PLAIN:
            return bytes(self._buf[base + offset : base + end])
        full = size & ~(BLOCK_SIZE - 1)
        parts = b""
        if offset < full:
            parts = bytes(self._buf[base + offset : base + min(end, full)])
        if end > full:
            start = max(offset, full) - full
            doff = ino.data_off
            parts += bytes(self._buf[doff + start : doff + end - full])
        return parts

    def read_inline(self, nid: int, offset: int, size: int) -> bytes:
        """Data of a regular file stored in the image (flat layouts), clamped to the file size.

        Raises :class:`FormatError` for a chunk-based (external) file: its data is not in the
        image; use :meth:`backing`.
        """
        ino = self._inode(nid)
        if ino.ifmt != stat.S_IFREG:
            raise FormatError(f"nid {nid}: not a regular file")
        if ino.attr.layout == LAYOUT_CHUNK_BASED:
            raise FormatError(f"nid {nid}: data is external (chunk-based), not in the image")
        return self._read_flat(ino, offset, size)

    def readlink(self, nid: int) -> bytes:
        ino = self._inode(nid)
        if ino.ifmt != stat.S_IFLNK:
            raise FormatError(f"nid {nid}: not a symlink")
        target = self._read_flat(ino, 0, ino.attr.size)
        if b"\0" in target:
            raise FormatError(f"nid {nid}: symlink target contains NUL")
        return target

    def is_external(self, nid: int) -> bool:
        """True for a regular file whose data lives in the object store (chunk-based)."""
        ino = self._inode(nid)
        return ino.ifmt == stat.S_IFREG and ino.attr.layout == LAYOUT_CHUNK_BASED

    def backing(self, nid: int) -> tuple[bytes, bytes | None] | None:
        """``(payload, digest)`` of an external file, or None for any other inode.

        ``payload`` is the ``trusted.overlay.redirect`` value minus one leading ``/`` (the
        store-relative object path, e.g. ``b"ab/cdef..."``), or ``b""`` when the image names
        none. ``digest`` is the fs-verity SHA-256 digest from ``trusted.overlay.metacopy``,
        or None when the metacopy carries no digest.
        """
        if not self.is_external(nid):
            return None
        return _backing(self.raw_xattrs(nid))

    # -- xattrs --------------------------------------------------------------------------------

    def raw_xattrs(self, nid: int) -> list[tuple[bytes, bytes]]:
        """Full xattr keys and values as stored: inline entries first, then shared ones.

        The returned list is shared with a cache: do not modify it.
        """
        cache = self._xattr_cache
        cached = cache.get(nid)
        if cached is not None:
            with contextlib.suppress(KeyError):  # evicted by another thread
                cache.move_to_end(nid)
            return cached
        ino = self._inode(nid)
        result = self._parse_xattrs(nid, ino) if ino.xattr_size else []
        cache[nid] = result
        if len(cache) > self._cache_size // 4:
            cache.popitem(last=False)
        return result

    def _parse_xattrs(self, nid: int, ino: _Ino) -> list[tuple[bytes, bytes]]:
        buf = self._buf
        start = ino.xattr_off
        end = start + ino.xattr_size
        if ino.xattr_size < _XATTR_IBODY_SIZE:
            raise FormatError(f"nid {nid}: xattr body too small")
        _filter, shared = _XATTR_IBODY.unpack_from(buf, start)
        pos = start + _XATTR_IBODY_SIZE + 4 * shared
        if pos > end:
            raise FormatError(
                f"nid {nid}: {shared} shared xattr ids do not fit in i_xattr_icount space"
            )
        out: list[tuple[bytes, bytes]] = []
        while pos + _XATTR_ENTRY_SIZE <= end:
            key, value, pos = self._xattr_entry(nid, pos, end)
            out.append((key, value))
        if pos != end:
            raise FormatError(f"nid {nid}: trailing bytes in inline xattr area")
        n = self._size
        for i in range(shared):
            (xid,) = _U32.unpack_from(buf, start + _XATTR_IBODY_SIZE + 4 * i)
            eoff = self._xattr_base + 4 * xid
            if eoff + _XATTR_ENTRY_SIZE > n:
                raise FormatError(f"nid {nid}: shared xattr id {xid} past end of image")
            key, value, _ = self._xattr_entry(nid, eoff, n)
            out.append((key, value))
        return out

    def _xattr_entry(self, nid: int, pos: int, limit: int) -> tuple[bytes, bytes, int]:
        buf = self._buf
        name_len, index, value_size = _XATTR_ENTRY.unpack_from(buf, pos)
        prefix = _XATTR_PREFIXES.get(index)
        if prefix is None:
            raise FormatError(f"nid {nid}: unknown xattr name prefix index {index}")
        nstart = pos + _XATTR_ENTRY_SIZE
        vstart = nstart + name_len
        vend = vstart + value_size
        if vend > limit:
            raise FormatError(
                f"nid {nid}: xattr entry (name {name_len}, value {value_size} bytes) out of bounds"
            )
        if index == 0 and name_len == 0:
            raise FormatError(f"nid {nid}: empty xattr name")
        suffix = bytes(buf[nstart:vstart])
        if b"\0" in suffix:
            raise FormatError(f"nid {nid}: xattr name contains NUL")
        return prefix + suffix, bytes(buf[vstart:vend]), (vend + 3) & ~3

    def listxattr(self, nid: int) -> list[bytes]:
        """Xattr names as a kernel composefs mount presents them."""
        out: list[bytes] = []
        for key, _ in self.raw_xattrs(nid):
            if key.startswith(E.OVL_PREFIX):
                if key.startswith(E.OVL_ESCAPED_PREFIX):
                    out.append(E.OVL_PREFIX + key[len(E.OVL_ESCAPED_PREFIX) :])
            else:
                out.append(key)
        return out

    def getxattr(self, nid: int, name: bytes) -> bytes | None:
        """The value of a presented xattr name, or None if the mount would not show it."""
        raw = (
            E.OVL_ESCAPED_PREFIX + name[len(E.OVL_PREFIX) :]
            if name.startswith(E.OVL_PREFIX)
            else name
        )
        for key, value in self.raw_xattrs(nid):
            if key == raw:
                return value
        return None

    # -- directories ---------------------------------------------------------------------------

    def _dir(self, nid: int) -> _Ino:
        ino = self._inode(nid)
        if ino.ifmt != stat.S_IFDIR:
            raise FormatError(f"nid {nid}: not a directory")
        return ino

    def _dir_blocks(self, ino: _Ino) -> list[tuple[int, int]]:
        """``(offset, length)`` in the image of each dirent block of a directory."""
        size = ino.attr.size
        base = ino.raw_blkaddr * BLOCK_SIZE
        out: list[tuple[int, int]] = []
        if ino.attr.layout == LAYOUT_FLAT_INLINE:
            full = size >> BLOCK_BITS
            out.extend((base + (i << BLOCK_BITS), BLOCK_SIZE) for i in range(full))
            tail = size & (BLOCK_SIZE - 1)
            if tail:
                out.append((ino.data_off, tail))
        else:
            pos = 0
            while pos < size:
                out.append((base + pos, min(BLOCK_SIZE, size - pos)))
                pos += BLOCK_SIZE
        return out

    def _block_count(self, nid: int, start: int, blen: int) -> int:
        if blen < _DIRENT_SIZE:
            raise FormatError(f"dir nid {nid}: directory block of {blen} bytes is too small")
        nameoff0: int = _U16.unpack_from(self._buf, start + 8)[0]
        if nameoff0 < _DIRENT_SIZE or nameoff0 % _DIRENT_SIZE or nameoff0 >= blen:
            raise FormatError(f"dir nid {nid}: bad first nameoff {nameoff0} (block {blen} bytes)")
        return nameoff0 // _DIRENT_SIZE

    def _parse_block(self, nid: int, start: int, blen: int) -> list[tuple[bytes, int, int]]:
        buf = self._buf
        count = self._block_count(nid, start, blen)
        out: list[tuple[bytes, int, int]] = []
        unpack = _DIRENT.unpack_from
        child, nameoff, ft, _ = unpack(buf, start)
        for i in range(count):
            if i + 1 < count:
                nchild, nxt, nft, _ = unpack(buf, start + _DIRENT_SIZE * (i + 1))
                if nxt <= nameoff or nxt > blen:
                    raise FormatError(f"dir nid {nid}: dirent {i + 1} nameoff {nxt} out of order")
                name = bytes(buf[start + nameoff : start + nxt])
                if b"\0" in name:
                    raise FormatError(f"dir nid {nid}: name {name!r} contains NUL")
            else:
                end = buf.find(b"\0", start + nameoff, start + blen)
                if end < 0:
                    end = start + blen
                name = bytes(buf[start + nameoff : end])
                nchild = nxt = nft = 0
            if not name or len(name) > _NAME_MAX or b"/" in name:
                raise FormatError(f"dir nid {nid}: invalid name {name!r}")
            if ft not in _FT_TO_IFMT:
                raise FormatError(f"dir nid {nid}: entry {name!r} has bad file type {ft}")
            out.append((name, child, ft))
            child, nameoff, ft = nchild, nxt, nft
        return out

    def _block_name(self, nid: int, start: int, blen: int, count: int, i: int) -> bytes:
        """Name of dirent ``i`` of a block with ``count`` entries (for binary search)."""
        buf = self._buf
        (nameoff,) = _U16.unpack_from(buf, start + _DIRENT_SIZE * i + 8)
        if i + 1 < count:
            (end,) = _U16.unpack_from(buf, start + _DIRENT_SIZE * (i + 1) + 8)
            if end > blen:
                end = blen
        else:
            end = blen
            e = buf.find(b"\0", start + nameoff, start + blen)
            if e >= 0:
                end = e - start
        if nameoff < count * _DIRENT_SIZE or nameoff >= end:
            raise FormatError(f"dir nid {nid}: dirent {i} has bad nameoff {nameoff}")
        return bytes(buf[start + nameoff : start + end])

    def _iter_raw(self, nid: int, first_block: int = 0) -> Iterator[tuple[bytes, int, int]]:
        prev: bytes | None = None
        for start, blen in self._dir_blocks(self._dir(nid))[first_block:]:
            for entry in self._block_entries(nid, start, blen):
                name = entry[0]
                if prev is not None and name <= prev:
                    raise FormatError(
                        f"dir nid {nid}: names not sorted or duplicated ({prev!r}, {name!r})"
                    )
                prev = name
                yield entry

    def raw_dirents(self, dir_nid: int) -> Iterator[tuple[bytes, int, int]]:
        """Every stored entry ``(name, nid, file_type)``, including ``.`` and ``..``."""
        return self._iter_raw(dir_nid)

    def _hidden(self, name: bytes, nid: int, ft: int) -> bool:
        if name == b"." or name == b"..":
            return True
        if ft == FT_CHRDEV:
            a = self._inode(nid).attr
            return a.rdev == 0 and stat.S_ISCHR(a.mode)
        return False

    def _presented_index(self, nid: int) -> list[int]:
        """Number of presented entries before each dirent block (cached per directory)."""
        cache = self._dir_index
        idx = cache.get(nid)
        if idx is None:
            idx = []
            count = 0
            for start, blen in self._dir_blocks(self._dir(nid)):
                idx.append(count)
                for name, child, ft in self._block_entries(nid, start, blen):
                    if not self._hidden(name, child, ft):
                        count += 1
            idx.append(count)
            cache[nid] = idx
            if len(cache) > _DIR_CACHE:
                cache.popitem(last=False)
        else:
            with contextlib.suppress(KeyError):  # evicted by another thread
                cache.move_to_end(nid)
        return idx

    def readdir_plus(self, dir_nid: int, offset: int = 0) -> Iterator[tuple[bytes, int, int, int]]:
        """Presented entries ``(name, nid, file_type, next_offset)`` from cookie ``offset``.

        ``next_offset`` is the cookie that resumes after this entry (= entries returned so far).
        """
        if offset < 0:
            raise ValueError("negative readdir offset")
        first_block = 0
        count = 0
        if offset:
            idx = self._presented_index(dir_nid)
            if offset >= idx[-1]:
                return
            lo, hi = 0, len(idx) - 2
            while lo < hi:  # last block whose starting count <= offset
                mid = (lo + hi + 1) // 2
                if idx[mid] <= offset:
                    lo = mid
                else:
                    hi = mid - 1
            first_block = lo
            count = idx[lo]
        for name, child, ft in self._iter_raw(dir_nid, first_block):
            if self._hidden(name, child, ft):
                continue
            count += 1
            if count > offset:
                yield name, child, ft, count

    def readdir(self, dir_nid: int, offset: int = 0) -> Iterator[tuple[bytes, int, int]]:
        """Presented entries ``(name, nid, file_type)``: no ``.``/``..``, no whiteouts.

        ``offset`` is a resume cookie: the number of presented entries to skip (so the entry
        yielded k-th, counting from 1, has cookie ``offset + k``). Resuming costs one block
        scan, not a rescan of the directory.
        """
        for name, child, ft, _ in self.readdir_plus(dir_nid, offset):
            yield name, child, ft

    def raw_lookup(self, dir_nid: int, name: bytes) -> int | None:
        """The nid of a stored entry (``.``/``..`` and whiteouts included), by binary search."""
        ino = self._dir(dir_nid)
        blocks = self._dir_blocks(ino)
        if not blocks or not name:
            return None
        # Last block whose first name <= name.
        lo, hi = 0, len(blocks) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            start, blen = blocks[mid]
            count = self._block_count(dir_nid, start, blen)
            if self._block_name(dir_nid, start, blen, count, 0) <= name:
                lo = mid
            else:
                hi = mid - 1
        start, blen = blocks[lo]
        return self._block_map(dir_nid, start, blen).get(name)

    def _block_entries(self, nid: int, start: int, blen: int) -> list[tuple[bytes, int, int]]:
        """The parsed entries of one dirent block, kept in a small LRU."""
        key = (start, blen)
        cache = self._blocks
        entries = cache.get(key)
        if entries is None:
            entries = self._parse_block(nid, start, blen)
            cache[key] = entries
            if len(cache) > _BLOCK_CACHE:
                cache.popitem(last=False)
        else:
            with contextlib.suppress(KeyError):  # evicted by another thread
                cache.move_to_end(key)
        return entries

    def _block_map(self, nid: int, start: int, blen: int) -> dict[bytes, int]:
        """``name -> nid`` of one dirent block, kept in a small LRU."""
        key = (start, blen)
        cache = self._block_maps
        m = cache.get(key)
        if m is None:
            m = {name: child for name, child, _ in self._block_entries(nid, start, blen)}
            cache[key] = m
            if len(cache) > _BLOCK_CACHE:
                cache.popitem(last=False)
        else:
            with contextlib.suppress(KeyError):  # evicted by another thread
                cache.move_to_end(key)
        return m

    def lookup(self, dir_nid: int, name: bytes) -> int | None:
        """The nid of a presented entry, or None (``.``, ``..`` and whiteouts are not found)."""
        if name == b"." or name == b"..":
            return None
        child = self.raw_lookup(dir_nid, name)
        if child is None:
            return None
        a = self._inode(child).attr
        if stat.S_ISCHR(a.mode) and a.rdev == 0:
            return None
        return child

    # -- whole-image walks ---------------------------------------------------------------------

    def _walk(
        self,
        budget: _Budget,
        seen: dict[int, _Ino],
        external: dict[int, list[tuple[bytes, bytes]]] | None = None,
    ) -> Iterator[tuple[int, list[tuple[bytes, int]]]]:
        """Breadth-first over directories: ``(dir_nid, [(name, child_nid)...])``.

        Every check is made: entries sorted and unique, ``.``/``..`` point where they should,
        dirent file types match the inodes, no directory is reachable twice (cycles, directory
        hard links), every inode's xattrs and data parse. Each inode is checked once; the
        total work is bounded by ``budget``. ``seen`` collects every inode reached, and
        ``external`` (if given) the parsed xattrs of every external file.
        """
        root = self.root_nid
        parent: dict[int, int] = {root: root}
        queue = deque([root])
        seen[root] = self._check_inode(root, budget, external)
        while queue:
            d = queue.popleft()
            dino = seen[d]
            budget.spend(dino.attr.size, "dir nid %d", d)
            entries: list[tuple[bytes, int]] = []
            for name, child, ft in self._iter_raw(d):
                if name == b".":
                    if child != d:
                        raise FormatError(f"dir nid {d}: '.' points to nid {child}")
                    continue
                if name == b"..":
                    if child != parent[d]:
                        raise FormatError(f"dir nid {d}: '..' points to nid {child}")
                    continue
                cino = seen.get(child)
                if cino is None:
                    cino = self._check_inode(child, budget, external)
                    seen[child] = cino
                    if cino.ifmt == stat.S_IFDIR:
                        parent[child] = d
                        queue.append(child)
                elif cino.ifmt == stat.S_IFDIR:
                    raise FormatError(
                        f"dir nid {d}: entry {name!r} -> directory nid {child} reached twice "
                        "(directory cycle or hard link)"
                    )
                if cino.ifmt != _FT_TO_IFMT[ft]:
                    raise FormatError(
                        f"dir nid {d}: entry {name!r} file type {ft} does not match inode "
                        f"mode {cino.attr.mode:o}"
                    )
                entries.append((name, child))
            yield d, entries

    def _check_inode(
        self,
        nid: int,
        budget: _Budget,
        external: dict[int, list[tuple[bytes, bytes]]] | None = None,
    ) -> _Ino:
        ino = self._load_inode(nid)
        a = ino.attr
        inline = 0
        if a.layout == LAYOUT_FLAT_INLINE:
            inline = a.size & (BLOCK_SIZE - 1)
        elif a.layout == LAYOUT_CHUNK_BASED:
            inline = ino.data_off - ino.xattr_off - ino.xattr_size
        budget.spend(_COMPACT_SIZE + ino.xattr_size + inline, "nid %d", nid)
        xattrs: list[tuple[bytes, bytes]] = []
        if ino.xattr_size:
            xattrs = self._parse_xattrs(nid, ino)
            keys = set()
            spent = 0
            for key, value in xattrs:
                if key in keys:
                    raise FormatError(f"nid {nid}: duplicate xattr {key!r}")
                keys.add(key)
                spent += len(key) + len(value)
            budget.spend(spent, "nid %d xattrs", nid)
        if ino.ifmt == stat.S_IFLNK:
            target = self._read_flat(ino, 0, a.size)
            if b"\0" in target:
                raise FormatError(f"nid {nid}: symlink target contains NUL")
            if a.layout == LAYOUT_FLAT_PLAIN:
                budget.spend(a.size, "nid %d", nid)
        elif ino.ifmt == stat.S_IFREG and a.layout == LAYOUT_FLAT_PLAIN:
            budget.spend(a.size, "nid %d", nid)
        elif ino.ifmt == stat.S_IFREG and a.layout == LAYOUT_FLAT_INLINE:
            budget.spend(a.size - inline, "nid %d", nid)
        elif external is not None and ino.ifmt == stat.S_IFREG and a.layout == LAYOUT_CHUNK_BASED:
            external[nid] = xattrs
        return ino

    def validate(self) -> None:
        """Walk and check the whole image; raise :class:`FormatError` at the first problem.

        The work is bounded by the image size (see :class:`_Budget`).
        """
        budget = _Budget(self._size)
        seen: dict[int, _Ino] = {}
        for _ in self._walk(budget, seen):
            pass

    def inodes(self) -> Iterator[int]:
        """Every nid reachable from the root, each once, breadth-first (validating as it goes)."""
        budget = _Budget(self._size)
        seen: dict[int, _Ino] = {}
        yielded: set[int] = set()
        for d, entries in self._walk(budget, seen):
            if d not in yielded:
                yielded.add(d)
                yield d
            for _, child in entries:
                if child not in yielded:
                    yielded.add(child)
                    yield child

    def object_refs(self) -> Iterator[tuple[int, bytes, bytes | None]]:
        """``(nid, payload, digest)`` for every external file inode (each nid once)."""
        for nid in self.inodes():
            ref = self.backing(nid)
            if ref is not None:
                yield nid, ref[0], ref[1]

    def object_digests(self) -> set[bytes]:
        """Every distinct 32-byte object digest the image references (validating the whole
        image on the way, as :meth:`validate` does).

        From ``trusted.overlay.metacopy``; when that carries no digest, parsed from a redirect
        of the form ``XX/<62 hex>``.
        """
        return set(self.object_sizes())

    def object_sizes(self) -> dict[bytes, int]:
        """Each referenced object digest (see :meth:`object_digests`) with the largest file size
        any inode gives it, in one validating walk of the image. A size is what the image
        declares: an object of another size simply fails its digest when fetched."""
        seen: dict[int, _Ino] = {}
        external: dict[int, list[tuple[bytes, bytes]]] = {}
        for _ in self._walk(_Budget(self._size), seen, external):
            pass
        out: dict[bytes, int] = {}
        for nid, xattrs in external.items():
            payload, digest = _backing(xattrs)
            if digest is None and _OBJECT_PATH.match(payload):
                digest = bytes.fromhex(payload[:2].decode() + payload[3:].decode())
            if digest is not None:
                size = seen[nid].attr.size
                if size > out.get(digest, -1):
                    out[digest] = size
        return out

    def statfs(self) -> tuple[int, int]:
        """``(blocks, inodes)`` as the superblock gives them, for statfs."""
        return self.blocks, self.inode_count

    # -- to_tree -------------------------------------------------------------------------------

    def to_tree(self, *, keep_opaque_markers: bool = False) -> Tree:
        """The logical tree this image was written from (the composefs rewriting undone).

        ``keep_opaque_markers`` keeps the ``trusted.overlay.opaque=x`` / ``user.overlay.opaque=x``
        that v1 adds to directories holding whiteouts, as the C reader (``composefs-info dump``)
        does; writing the tree gives the same image either way.

        Writing the result again (same format version) gives the same image. Hard links:
        the primary name of an inode is the one where the writer's breadth-first counter
        equals the inode's ``i_ino``; when that rule does not fit the image (for example
        composefs-rs v2 images, numbered depth-first), the first name met breadth-first is.
        """
        budget = _Budget(self._size)
        inos: dict[int, _Ino] = {}
        order: list[tuple[int, list[tuple[bytes, int]]]] = list(self._walk(budget, inos))
        root_nid = self.root_nid

        primary = _primaries(order, inos, root_nid)
        refcount: dict[int, int] = {}
        for _, entries in order:
            for _, child in entries:
                refcount[child] = refcount.get(child, 0) + 1

        xattrs = {
            nid: list(self._parse_xattrs(nid, ino)) if ino.xattr_size else []
            for nid, ino in inos.items()
        }
        nodes = {nid: self._node(nid, ino, xattrs[nid]) for nid, ino in inos.items()}
        root = nodes[root_nid]

        dropped: set[tuple[int, bytes]] = set()
        if self.version in (0, 1):
            for name, child in order[0][1] if order else []:
                if (
                    name in _STUB_NAMES
                    and refcount[child] == 1
                    and self._is_stub(inos[child], xattrs[child], inos[root_nid], xattrs[root_nid])
                ):
                    dropped.add((root_nid, name))
        # Escaped whiteouts back to character devices 0/0; their primary parents' markers go.
        parent_markers: dict[int, tuple[bytes, ...]] = {}
        dir_markers = _WHITEOUT_DIR_MARKERS_V1 if self.version >= 1 else _WHITEOUT_DIR_MARKERS_V0
        for nid, (pdir, _name) in primary.items():
            ino = inos[nid]
            if ino.ifmt != stat.S_IFREG or ino.attr.size != 0:
                continue
            x = dict(xattrs[nid])
            if x.get(E.OVL_ESCAPED_WHITEOUT) != b"" or x.get(E.USER_OVL_WHITEOUT) != b"":
                continue
            px = dict(xattrs[pdir])
            if any(px.get(k) != v for k, v in dir_markers):
                continue
            node = nodes[nid]
            node.mode = stat.S_IFCHR | (node.mode & 0o7777)
            node.rdev = 0
            node.size = 0
            for k in (E.OVL_ESCAPED_WHITEOUT, E.USER_OVL_WHITEOUT):
                node.xattrs.pop(_unescape(k), None)
            parent_markers[pdir] = tuple(
                k
                for k, _ in dir_markers
                if not (keep_opaque_markers and k in (E.OVL_ESCAPED_OPAQUE, E.USER_OVL_OPAQUE))
            )
        for pdir, keys in parent_markers.items():
            for k in keys:
                nodes[pdir].xattrs.pop(_unescape(k), None)

        for d, entries in order:
            dnode = nodes[d]
            assert dnode.entries is not None
            for name, child in entries:
                if (d, name) in dropped:
                    continue
                if primary.get(child) == (d, name):
                    dnode.entries[name] = nodes[child]
                else:
                    dnode.entries[name] = HardLink(nodes[child])
        return Tree(root)

    def _node(self, nid: int, ino: _Ino, raw: list[tuple[bytes, bytes]]) -> Node:
        a = ino.attr
        node = Node(
            mode=a.mode,
            uid=a.uid,
            gid=a.gid,
            nlink=a.nlink,
            mtime_sec=a.mtime_sec,
            mtime_nsec=a.mtime_nsec,
            size=a.size,
            rdev=a.rdev,
        )
        x: dict[bytes, bytes] = {}
        for key, value in raw:
            if key.startswith(E.OVL_PREFIX):
                if key.startswith(E.OVL_ESCAPED_PREFIX):
                    x[E.OVL_PREFIX + key[len(E.OVL_ESCAPED_PREFIX) :]] = value
                elif ino.ifmt == stat.S_IFREG and a.layout == LAYOUT_CHUNK_BASED:
                    if key == E.OVL_REDIRECT:
                        payload = value[1:] if value.startswith(b"/") else value
                        node.payload = payload or None
                    elif key == E.OVL_METACOPY:
                        node.digest = _metacopy_digest(value)
                continue
            x[key] = value
        node.xattrs = x
        if ino.ifmt == stat.S_IFREG:
            if a.layout != LAYOUT_CHUNK_BASED and a.size:
                node.content = self._read_flat(ino, 0, a.size)
        elif ino.ifmt == stat.S_IFLNK:
            node.payload = self._read_flat(ino, 0, a.size)
            node.size = 0
        elif ino.ifmt in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            node.size = a.size
            if (
                self.version in (0, 1)
                and ino.xattr_off - (self._meta_base + (nid << _SLOT_BITS)) == _EXTENDED_SIZE
                and (a.mtime_sec, a.mtime_nsec) == self.build_time
                and a.nlink <= 0xFFFF
                and a.uid <= 0xFFFF
                and a.gid <= 0xFFFF
                and a.size <= 0xFFFFFFFF
            ):
                # Extended for no visible reason: the writer saw a size above 2^32-1 (kept from
                # a dump, never stored for special files). Keep the inode extended on rewrite.
                node.size = 1 << 32
        return node

    @staticmethod
    def _is_stub(
        ino: _Ino,
        x: list[tuple[bytes, bytes]],
        root: _Ino,
        root_x: list[tuple[bytes, bytes]],
    ) -> bool:
        a, r = ino.attr, root.attr
        if a.mode != _STUB_MODE or a.rdev != 0 or a.nlink != 1 or a.size != 0:
            return False
        if (a.uid, a.gid, a.mtime_sec, a.mtime_nsec) != (r.uid, r.gid, r.mtime_sec, r.mtime_nsec):
            return False
        selinux = [kv for kv in root_x if kv[0] == _SELINUX]
        return x == selinux[:1]


_WHITEOUT_DIR_MARKERS_V0: Final = ((E.OVL_ESCAPED_WHITEOUTS, b""), (E.USER_OVL_WHITEOUTS, b""))
_WHITEOUT_DIR_MARKERS_V1: Final = (
    *_WHITEOUT_DIR_MARKERS_V0,
    (E.OVL_ESCAPED_OPAQUE, b"x"),
    (E.USER_OVL_OPAQUE, b"x"),
)


def _unescape(key: bytes) -> bytes:
    """The tree-side name of a stored xattr key (``trusted.overlay.overlay.X`` -> ``...X``)."""
    if key.startswith(E.OVL_ESCAPED_PREFIX):
        return E.OVL_PREFIX + key[len(E.OVL_ESCAPED_PREFIX) :]
    return key


def _backing(xattrs: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes | None]:
    """``(payload, digest)`` of an external file from its xattrs (see :meth:`Image.backing`)."""
    payload = b""
    digest: bytes | None = None
    for key, value in xattrs:
        if key == E.OVL_REDIRECT:
            payload = value[1:] if value.startswith(b"/") else value
        elif key == E.OVL_METACOPY:
            digest = _metacopy_digest(value)
    return payload, digest


def _metacopy_digest(value: bytes) -> bytes | None:
    """The SHA-256 fs-verity digest in a ``trusted.overlay.metacopy`` value, if it has one."""
    if (
        len(value) == _METACOPY_LEN
        and value[1] == _METACOPY_LEN
        and value[3] == E.FS_VERITY_HASH_ALG_SHA256
    ):
        return value[4:]
    return None


def _primaries(
    order: list[tuple[int, list[tuple[bytes, int]]]],
    inos: dict[int, _Ino],
    root_nid: int,
) -> dict[int, tuple[int, bytes]]:
    """``nid -> (dir nid, name)`` of each non-root inode's primary name.

    Rule: walking names breadth-first (the order of ``order``), a counter starts at 1 after
    the root (i_ino 0); the name at which the counter equals the inode's i_ino is primary and
    advances the counter. If the rule leaves an inode without a primary name, or a directory
    is not primary where it stands, fall back to the first name met.
    """
    primary: dict[int, tuple[int, bytes]] = {}
    ok = inos[root_nid].attr.i_ino == 0
    k = 1
    if ok:
        for d, entries in order:
            for name, child in entries:
                if child not in primary and inos[child].attr.i_ino == k:
                    primary[child] = (d, name)
                    k += 1
                elif inos[child].ifmt == stat.S_IFDIR:
                    ok = False
                    break
            if not ok:
                break
        ok = ok and len(primary) == len(inos) - 1
    if not ok:
        primary = {}
        for d, entries in order:
            for name, child in entries:
                if child not in primary:
                    primary[child] = (d, name)
    return primary

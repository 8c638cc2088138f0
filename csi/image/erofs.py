"""On-disk constants and structures of EROFS as composefs uses it (shared by writer and reader).

Offsets and values are those of the Linux EROFS format (``erofs_fs.h``) and the composefs
header (``lcfs-erofs.h``); see docs/format-notes.md and the format reference for sources.
"""

from __future__ import annotations

import struct

BLOCK_BITS = 12
BLOCK_SIZE = 1 << BLOCK_BITS
SLOT_SIZE = 32  # inodes are 32-byte aligned; nid = offset / 32
SUPER_OFFSET = 1024

# composefs header, at offset 0 (32 bytes)
COMPOSEFS_MAGIC = 0xD078629A
COMPOSEFS_HEADER_VERSION = 1
COMPOSEFS_FLAG_HAS_ACL = 1
HEADER = struct.Struct("<IIII16x")

# EROFS superblock, at offset 1024 (128 bytes)
EROFS_MAGIC = 0xE0F5E1E2
FEATURE_COMPAT_MTIME = 0x2
FEATURE_COMPAT_XATTR_FILTER = 0x4
#  magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos, build_time,
#  build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr, uuid, volume_name, feature_incompat,
#  u1, extra_devices, devt_slotoff, dirblkbits, xattr_prefix_count, xattr_prefix_start,
#  packed_nid, xattr_filter_reserved, reserved2
SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23x")
assert SUPERBLOCK.size == 128

# Inodes
INODE_COMPACT = struct.Struct("<HHHHIIIIHHI")  # format..i_gid, reserved
INODE_EXTENDED = struct.Struct("<HHHHQIIIIQII16x")
assert INODE_COMPACT.size == 32 and INODE_EXTENDED.size == 64
LAYOUT_FLAT_PLAIN = 0
LAYOUT_FLAT_INLINE = 2
LAYOUT_CHUNK_BASED = 4
CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
NULL_ADDR = 0xFFFFFFFF
U64 = (1 << 64) - 1
MAX_NONINLINE_CHUNKS = 1024

# Extended attributes
XATTR_IBODY_HEADER = struct.Struct("<IB7x")  # h_name_filter, h_shared_count
XATTR_ENTRY = struct.Struct("<BBH")  # e_name_len, e_name_index, e_value_size
XATTR_FILTER_SEED = 0x25BBE08F
XATTR_FILTER_BITS = 32
XATTR_FILTER_DEFAULT = 0xFFFFFFFF
XATTR_MAX_SHARED = 0x80  # writer uses at most this many shared refs per inode (exclusive)

#: Short-name prefixes, as the composefs writer uses them (index 5 "lustre." never written).
XATTR_PREFIXES: dict[int, bytes] = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    5: b"lustre.",
    6: b"security.",
}
_WRITER_PREFIX_ORDER = (1, 2, 3, 4, 6)

# Directory entries
DIRENT = struct.Struct("<QHBx")  # nid, nameoff, file_type, reserved
FT_UNKNOWN = 0
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7

# Overlay xattr names
OVL_PREFIX = b"trusted.overlay."
OVL_ESCAPED_PREFIX = b"trusted.overlay.overlay."
OVL_METACOPY = b"trusted.overlay.metacopy"
OVL_REDIRECT = b"trusted.overlay.redirect"
OVL_OPAQUE = b"trusted.overlay.opaque"
OVL_ESCAPED_WHITEOUT = b"trusted.overlay.overlay.whiteout"
OVL_ESCAPED_WHITEOUTS = b"trusted.overlay.overlay.whiteouts"
OVL_ESCAPED_OPAQUE = b"trusted.overlay.overlay.opaque"
USER_OVL_WHITEOUT = b"user.overlay.whiteout"
USER_OVL_WHITEOUTS = b"user.overlay.whiteouts"
USER_OVL_OPAQUE = b"user.overlay.opaque"
FS_VERITY_HASH_ALG_SHA256 = 1


def xattr_prefix_index(key: bytes) -> tuple[int, bytes]:
    """``(prefix index, suffix)`` of a full xattr key, as the composefs writer splits it."""
    for index in _WRITER_PREFIX_ORDER:
        prefix = XATTR_PREFIXES[index]
        if key.startswith(prefix):
            return index, key[len(prefix) :]
    return 0, key


def round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def metacopy_value(digest: bytes | None) -> bytes:
    """The ``trusted.overlay.metacopy`` value: empty, or the versioned fs-verity digest form."""
    if digest is None:
        return b""
    return bytes((0, 4 + len(digest), 0, FS_VERITY_HASH_ALG_SHA256)) + digest


def chunk_bits(size: int) -> int:
    """EROFS chunk size bits composefs uses for an external file of ``size`` (> 0) bytes."""
    # ilog2(size - 1) + 1 == bit length of (size - 1), at least one block.
    bits = max((size - 1).bit_length(), BLOCK_BITS)
    return min(bits, CHUNK_FORMAT_BLKBITS_MASK + BLOCK_BITS)


def chunk_count(size: int) -> int:
    """Number of chunks; computed in 64-bit arithmetic like libcomposefs, so it wraps for
    sizes within one chunk of 2^64 (such files are accepted there, and here)."""
    bits = chunk_bits(size)
    return ((size + (1 << bits) - 1) & U64) >> bits

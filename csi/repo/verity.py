"""Enabling kernel fs-verity on a stored file (best effort).

Only SHA-256 with 4096-byte blocks and no salt, so the kernel's digest equals the object's
name. The file must not be open for writing anywhere when this is called.
"""

from __future__ import annotations

import errno
import fcntl
import struct

FS_IOC_ENABLE_VERITY = 0x40806685
_FS_VERITY_HASH_ALG_SHA256 = 1
_BLOCK_SIZE = 4096

#: errnos meaning "this filesystem (or file) cannot do fs-verity": stop trying on them.
UNSUPPORTED_ERRNOS = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EACCES}
)


def _enable_arg() -> bytes:
    # struct fsverity_enable_arg: version, hash_algorithm, block_size, salt_size (u32 each),
    # salt_ptr (u64), sig_size, reserved1 (u32), sig_ptr (u64), reserved2[11] (u64): 128 bytes.
    return struct.pack("<IIIIQIIQ88x", 1, _FS_VERITY_HASH_ALG_SHA256, _BLOCK_SIZE, 0, 0, 0, 0, 0)


def enable_verity(fd: int) -> int:
    """Try ``FS_IOC_ENABLE_VERITY`` on ``fd``; return 0 on success (or already enabled),
    else the errno. Never raises for kernel refusals."""
    try:
        fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, _enable_arg())
    except OSError as e:
        if e.errno == errno.EEXIST:
            return 0
        return e.errno or errno.EIO
    return 0

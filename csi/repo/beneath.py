"""Opening files by a path relative to a root without ever leaving that root.

A repository served from a local directory (or a network mount) is as untrusted as one served
over HTTP: a symlink inside it (``images/refs/ns -> /etc``) must not make the driver, which
runs as root, read files elsewhere. :func:`open_beneath` resolves a relative path with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`` (Linux 5.6+): symlinks that stay inside the
root still work (``images/<hex> -> ../objects/..``), anything that would step outside fails
with ``EXDEV``. Where ``openat2`` is missing, each component is opened with ``O_NOFOLLOW``
instead, which refuses every symlink (stricter, never looser).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct

_SYS_OPENAT2 = 437  # the same number on every architecture Linux has (new syscall table)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_have_openat2: bool | None = None


def _openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
    how = struct.pack("QQQ", flags, 0, resolve)  # struct open_how {flags, mode, resolve}
    buf = ctypes.create_string_buffer(how, len(how))
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(path),
        buf,
        ctypes.c_size_t(len(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path.decode(errors="replace"))
    return int(fd)


def _walk_nofollow(dirfd: int, parts: list[str], flags: int) -> int:
    cur = os.dup(dirfd)
    try:
        for comp in parts[:-1]:
            nxt = os.open(
                comp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur
            )
            os.close(cur)
            cur = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
    finally:
        os.close(cur)


def open_beneath(root_fd: int, relpath: str, flags: int = os.O_RDONLY) -> int:
    """Open ``relpath`` (relative, no ``..``) under the directory ``root_fd`` without leaving
    it. Raises OSError: ``EXDEV`` or ``ELOOP`` if resolution would leave the root."""
    global _have_openat2
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or relpath.startswith("/"):
        raise OSError(errno.EINVAL, "not a relative path inside the root", relpath)
    clean = "/".join(parts)
    if _have_openat2 is not False:
        try:
            return _openat2(
                root_fd,
                os.fsencode(clean),
                flags | os.O_CLOEXEC,
                RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
            )
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EPERM) or _have_openat2:
                raise
            _have_openat2 = False  # no openat2 here (old kernel, or a seccomp filter)
        else:
            _have_openat2 = True
    return _walk_nofollow(root_fd, parts, flags)


def readlink_beneath(root_fd: int, relpath: str) -> str:
    """The target text of the symlink ``relpath`` under ``root_fd`` (its parent directory is
    reached without leaving the root). OSError ``EINVAL`` if it is not a symlink."""
    head, _, name = relpath.rstrip("/").rpartition("/")
    if not name or name in (".", ".."):
        raise OSError(errno.EINVAL, "not a path to a symlink", relpath)
    parent = open_beneath(root_fd, head, os.O_PATH | os.O_DIRECTORY) if head else os.dup(root_fd)
    try:
        return os.readlink(name, dir_fd=parent)
    finally:
        os.close(parent)

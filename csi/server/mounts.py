"""Bind mounts (read-only, nosuid, nodev) and the mount table (``/proc/self/mountinfo``)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
from dataclasses import dataclass

from csi.fuse.config import FSNAME

from .targets import OpenedTarget

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_PRIVATE = 1 << 18
MS_REC = 0x4000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

#: stat() errors that mean "a mount whose filesystem is gone" (dead FUSE daemon, stale NFS...).
BROKEN_ERRNOS = frozenset({errno.ENOTCONN, errno.ESTALE, errno.EIO, errno.ECONNABORTED})

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(s: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), s)


@dataclass(frozen=True, slots=True)
class MountInfo:
    mount_id: int
    parent_id: int
    device: str
    root: str
    mountpoint: str
    options: frozenset[str]
    fstype: str
    source: str

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def parse_mountinfo(text: str) -> list[MountInfo]:
    """Parse ``/proc/<pid>/mountinfo`` text (proc(5)); malformed lines are skipped."""
    out: list[MountInfo] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            out.append(
                MountInfo(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    device=fields[2],
                    root=_unescape(fields[3]),
                    mountpoint=_unescape(fields[4]),
                    options=frozenset(fields[5].split(",")),
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]) if len(fields) > sep + 2 else "",
                )
            )
        except (ValueError, IndexError):
            continue
    return out


def mount_table() -> list[MountInfo]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def mounts_at(
    path: str | os.PathLike[str], table: list[MountInfo] | None = None
) -> list[MountInfo]:
    """Mounts whose mount point is exactly ``path`` (stacked mounts: bottom first)."""
    p = os.path.normpath(os.path.abspath(path))
    return [m for m in (table if table is not None else mount_table()) if m.mountpoint == p]


def mounts_under(prefix: str | os.PathLike[str], table: list[MountInfo] | None = None) -> list[str]:
    p = os.path.normpath(os.path.abspath(prefix))
    return [
        m.mountpoint
        for m in (table if table is not None else mount_table())
        if m.mountpoint == p or m.mountpoint.startswith(p + "/")
    ]


def probe(path: str | os.PathLike[str]) -> int:
    """0 if ``path`` answers stat and statfs, else the errno (ENOTCONN for a dead FUSE mount:
    stat of a mount root may be answered from the kernel's cache, statfs never is)."""
    try:
        os.stat(path)
        os.statvfs(path)
    except OSError as e:
        return e.errno or errno.EIO
    return 0


def is_broken(path: str | os.PathLike[str]) -> bool:
    return probe(path) in BROKEN_ERRNOS


def _check(rc: int, what: str, path: str | os.PathLike[str]) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} {os.fspath(path)!r}: {os.strerror(err)}", os.fspath(path))


def bind_mount_ro(source: str | os.PathLike[str], target: OpenedTarget) -> None:
    """Bind ``source`` onto the target directory reached by ``target`` (its descriptor, so
    no symlink can redirect the mount), then make that mount read-only, nosuid and nodev."""
    src = os.fsencode(source)
    at = f"/proc/self/fd/{target.fd}".encode()
    if _libc.mount(src, at, None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        what = "bind mount of" if err in BROKEN_ERRNOS else "bind mount onto"
        where = os.fspath(source) if err in BROKEN_ERRNOS else target.path
        raise OSError(err, f"{what} {where!r}: {os.strerror(err)}", where)
    top = target.reopen()  # the new mount's root, for the remount
    try:
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
        if _libc.mount(None, f"/proc/self/fd/{top}".encode(), None, flags, None) != 0:
            err = ctypes.get_errno()
            _libc.umount2(f"/proc/self/fd/{top}".encode(), MNT_DETACH)
            raise OSError(err, f"read-only remount of {target.path!r}: {os.strerror(err)}")
    finally:
        os.close(top)


def make_private(path: str | os.PathLike[str]) -> None:
    """Make the mount at ``path`` private (not its submounts): mounts made on it or on binds
    of it no longer propagate to or from its former peers."""
    _check(_libc.mount(None, os.fsencode(path), None, MS_PRIVATE, None), "make private", path)


def is_ours(mount: MountInfo, source: str) -> bool:
    """A mount of the data plane whose mount source is ``source``
    (:func:`csi.fuse.config.mount_source`), or a bind of one of its views."""
    return mount.fstype == f"fuse.{FSNAME}" and mount.source == source


def unmount(target: str | os.PathLike[str], *, lazy: bool = False) -> bool:
    """Unmount ``target`` (not following a final symlink). False if nothing was mounted there.

    A busy mount is detached (lazy unmount) rather than failing: kubelet only unpublishes once
    the pod's containers are gone, and a leftover reference must not wedge the volume.
    """
    tgt = os.fsencode(target)
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    if _libc.umount2(tgt, flags) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EINVAL:
        return False  # not a mount point
    if err == errno.ENOENT:
        return False
    if err == errno.EBUSY and not lazy:
        return unmount(target, lazy=True)
    raise OSError(err, f"unmount {os.fspath(target)!r}: {os.strerror(err)}", os.fspath(target))


def unmount_ours(target: str, source: str) -> int:
    """Unmount the mounts of ours (:func:`is_ours`) stacked at ``target``, top first, and
    stop at the first that is not ours. Returns how many were removed."""
    n = 0
    while True:
        stack = mounts_at(target)
        if not stack or not is_ours(stack[-1], source):
            return n
        if not unmount(target, lazy=True):
            return n
        n += 1


def foreign_mounts(target: str, source: str) -> list[MountInfo]:
    """The mounts at ``target`` that are not ours."""
    return [m for m in mounts_at(target) if not is_ours(m, source)]


def remove_dir(path: str | os.PathLike[str]) -> None:
    """Remove the (empty) directory we created at ``path``; absent is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)

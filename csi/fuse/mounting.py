"""Mount-table helpers: stale FUSE mounts, the BDI read-ahead of a mount, unmounting."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _unescape(field: str) -> str:
    """Undo the octal escapes (``\\040``) of /proc/self/mountinfo fields."""
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_entry(mountpoint: str | os.PathLike[str]) -> tuple[str, str, str] | None:
    """``(major:minor, fstype, source)`` of the topmost mount at ``mountpoint``, or None."""
    target = os.path.abspath(os.fspath(mountpoint))
    found: tuple[str, str, str] | None = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 10 or _unescape(parts[4]) != target:
                continue
            sep = parts.index("-", 6)
            found = (parts[2], parts[sep + 1], _unescape(parts[sep + 2]))
    return found


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    return mount_entry(mountpoint) is not None


def umount(mountpoint: str | os.PathLike[str], *, detach: bool = False) -> bool:
    """Unmount; True if something was unmounted, False if nothing was mounted there."""
    rc = _libc.umount2(os.fsencode(mountpoint), MNT_DETACH if detach else 0)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise OSError(err, f"umount {mountpoint}: {os.strerror(err)}")


def clear_stale_mount(mountpoint: Path) -> None:
    """Detach a dead FUSE mount (ENOTCONN) left at ``mountpoint`` by a previous daemon.

    Raises if a live filesystem is mounted there (another daemon still serving).
    """
    entry = mount_entry(mountpoint)
    if entry is None:
        return
    try:
        os.statvfs(mountpoint)  # never answered from a cache: reaches the daemon, if any
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
            log.warning("detaching stale mount at %s (%s)", mountpoint, e.strerror)
            umount(mountpoint, detach=True)
            return
        raise
    raise RuntimeError(f"{mountpoint} is already mounted ({entry[1]} from {entry[2]})")


def set_read_ahead(mountpoint: Path, kb: int) -> bool:
    """Raise the BDI read-ahead of the FUSE mount at ``mountpoint`` (root only)."""
    entry = mount_entry(mountpoint)
    if entry is None:
        return False
    path = Path("/sys/class/bdi") / entry[0] / "read_ahead_kb"
    try:
        path.write_text(f"{kb}\n")
    except OSError as e:
        log.warning("cannot set %s to %d: %s", path, kb, e.strerror)
        return False
    return True


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard limit (objects are held open)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

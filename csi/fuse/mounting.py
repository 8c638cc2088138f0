"""Mount-table helpers: stale FUSE mounts, the BDI read-ahead of a mount, unmounting."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import logging
import os
from pathlib import Path

from .config import FSNAME

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
    """Detach a mount of ours left at ``mountpoint`` by a previous daemon.

    The caller holds the instance lock (:func:`instance_lock`), so no other daemon is serving
    this mountpoint: a ``fuse.composefs-csi`` mount found there belongs to a dead process,
    even when the kernel still answers some calls from its caches. Anything else mounted
    there is an error.
    """
    entry = mount_entry(mountpoint)
    if entry is None:
        return
    if entry[1] != f"fuse.{FSNAME}":
        raise RuntimeError(f"{mountpoint} is already mounted ({entry[1]} from {entry[2]})")
    log.warning("detaching the mount a previous data plane left at %s", mountpoint)
    umount(mountpoint, detach=True)


def instance_lock(store: Path, mountpoint: Path) -> int:
    """Take the exclusive lock of the data plane serving ``mountpoint`` (one per mountpoint).

    Returns the locked descriptor (keep it open while serving). Raises RuntimeError if
    another live daemon holds it.
    """
    key = hashlib.sha256(os.fsencode(os.path.abspath(mountpoint))).hexdigest()[:16]
    # A directory of its own: the store's temp cleaner only looks at files of .tmp and .tmp/locks.
    lock_dir = Path(store) / ".tmp" / "dataplane"
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"dataplane-{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"another data plane is serving {mountpoint}") from None
    return fd


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

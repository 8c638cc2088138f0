"""Kernel mounts for tests: a composefs image the way ``mount.composefs`` mounts it, and
plain read-only overlayfs stacks.

``mount_composefs`` follows composefs-format.md §6: the image is mounted as EROFS
(read-only, ``noacl`` unless the composefs header has the HAS_ACL flag), file-backed where the
kernel supports it (Linux >= 6.12) and through a loop device otherwise; then overlayfs is
mounted read-only with ``metacopy=on,redirect_dir=on`` and
``lowerdir=<erofs mount>::<objects dir>`` (the objects directory as a data-only lower layer,
Linux >= 6.5). The legacy ``mount(2)`` option string is used; ``\\``, ``:`` and ``,`` in
paths are escaped with a backslash, as overlayfs expects.

``have_kernel_composefs()`` returns ``None`` when all of this works here, or a sentence saying
what is missing, for ``pytest.skip``. It probes the facilities for real (mounting small
overlays of temporary directories), including the escaped ``trusted.overlay.overlay.*`` xattrs
(Linux >= 6.7) that composefs images rely on.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

COMPOSEFS_MAGIC = 0xD078629A
HAS_ACL = 1

MS_RDONLY = 1
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class KernelMountError(OSError):
    """A mount or unmount failed; the message says which and with what options."""


def _mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    rc = _libc.mount(
        os.fsencode(source), os.fsencode(target), fstype.encode(), flags, os.fsencode(data)
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise KernelMountError(
            err, f"mount -t {fstype} -o {data!r} {source} {target}: {os.strerror(err)}"
        )


def _umount(target: Path) -> None:
    """Unmount ``target``, retrying briefly on EBUSY, then detaching lazily."""
    path = os.fsencode(target)
    for attempt in range(50):
        if _libc.umount2(path, 0) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            return
        if err != errno.EBUSY:
            raise KernelMountError(err, f"umount {target}: {os.strerror(err)}")
        time.sleep(0.02 * (attempt + 1) if attempt < 10 else 0.2)
    if _libc.umount2(path, MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise KernelMountError(err, f"umount -l {target}: {os.strerror(err)}")


def escape_overlay_path(path: str | os.PathLike[str]) -> str:
    """Escape a path for an overlayfs ``lowerdir=`` value in a legacy option string."""
    s = os.fspath(path)
    return s.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def image_has_acl(image_path: str | os.PathLike[str]) -> bool:
    """Whether the composefs header of an image sets HAS_ACL (so erofs must allow ACLs)."""
    with open(image_path, "rb") as f:
        head = f.read(12)
    if len(head) < 12:
        raise ValueError(f"{image_path}: too short for a composefs header")
    magic, _version, flags = struct.unpack("<III", head)
    if magic != COMPOSEFS_MAGIC:
        raise ValueError(f"{image_path}: not a composefs image (magic {magic:#x})")
    return bool(flags & HAS_ACL)


def _filesystem_available(name: str) -> bool:
    def listed() -> bool:
        try:
            with open("/proc/filesystems") as f:
                return any(line.split()[-1] == name for line in f if line.strip())
        except OSError:
            return False

    if listed():
        return True
    if shutil.which("modprobe"):
        subprocess.run(["modprobe", name], capture_output=True, check=False)
    return listed()


@functools.cache
def have_kernel_composefs() -> str | None:
    """``None`` if composefs images can be kernel-mounted here, else the reason they can't."""
    if os.geteuid() != 0:
        return "kernel composefs mounts need root"
    if not _filesystem_available("erofs"):
        return "the kernel has no erofs filesystem (modprobe erofs failed)"
    if not _filesystem_available("overlay"):
        return "the kernel has no overlay filesystem (modprobe overlay failed)"
    with tempfile.TemporaryDirectory(prefix="cfs-probe-") as tmp:
        base = Path(tmp)
        lower, data, mnt = base / "lower", base / "data", base / "mnt"
        for d in (lower, data, mnt):
            d.mkdir()
        probe = lower / "f"
        probe.write_bytes(b"")
        try:
            os.setxattr(probe, "trusted.overlay.overlay.probe", b"1")
        except OSError as e:
            return f"cannot set trusted.* xattrs in {tmp}: {e.strerror}"
        opts = (
            f"ro,metacopy=on,redirect_dir=on,lowerdir={escape_overlay_path(lower)}"
            f"::{escape_overlay_path(data)}"
        )
        try:
            _mount("composefs-probe", mnt, "overlay", MS_RDONLY, opts)
        except KernelMountError as e:
            return f"overlayfs has no data-only lower layers (Linux >= 6.5 needed): {e}"
        try:
            names = os.listxattr(mnt / "f")
        finally:
            _umount(mnt)
        if "trusted.overlay.probe" not in names:
            return (
                "overlayfs does not unescape trusted.overlay.overlay.* xattrs (Linux >= 6.7 needed)"
            )
    return None


def _mount_erofs(image: Path, target: Path, *, acl: bool) -> None:
    opts = "ro" if acl else "ro,noacl"
    try:
        _mount(str(image), target, "erofs", MS_RDONLY, opts)
        return
    except KernelMountError as e:
        if e.errno not in (errno.ENOTBLK, errno.EINVAL, errno.ENODEV):
            raise
    # Older kernels: no file-backed erofs; let mount(8) set up an auto-clearing loop device.
    proc = subprocess.run(
        ["mount", "-t", "erofs", "-o", f"loop,{opts}", str(image), str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise KernelMountError(
            errno.EIO, f"mount -t erofs -o loop,{opts} {image} {target}: {proc.stderr.strip()}"
        )


@contextlib.contextmanager
def mount_composefs(
    image_path: str | os.PathLike[str],
    objects_dir: str | os.PathLike[str],
    *,
    verity: bool = False,
) -> Iterator[Path]:
    """Mount a composefs image read-only with the kernel; yield the mountpoint.

    Everything mounted and every temporary directory is removed on exit, exceptions included.
    """
    image = Path(image_path).resolve()
    objects = Path(objects_dir).resolve()
    acl = image_has_acl(image)
    base = Path(tempfile.mkdtemp(prefix="cfs-kmount-"))
    img_mnt, ovl_mnt = base / "image", base / "mnt"
    img_mnt.mkdir()
    ovl_mnt.mkdir()
    mounted: list[Path] = []
    try:
        _mount_erofs(image, img_mnt, acl=acl)
        mounted.append(img_mnt)
        opts = (
            f"ro,metacopy=on,redirect_dir=on,lowerdir={escape_overlay_path(img_mnt)}"
            f"::{escape_overlay_path(objects)}"
        )
        if verity:
            opts += ",verity=require"
        _mount("composefs", ovl_mnt, "overlay", MS_RDONLY, opts)
        mounted.append(ovl_mnt)
        yield ovl_mnt
    finally:
        _cleanup(base, mounted)


@contextlib.contextmanager
def mount_overlay(lowerdirs: list[Path]) -> Iterator[Path]:
    """Mount a read-only overlayfs of ``lowerdirs`` (first = uppermost); yield the mountpoint."""
    if not lowerdirs:
        raise ValueError("mount_overlay needs at least one lower directory")
    base = Path(tempfile.mkdtemp(prefix="cfs-ovl-"))
    mnt = base / "mnt"
    mnt.mkdir()
    layers = [Path(d).resolve() for d in lowerdirs]
    if len(layers) == 1:
        # overlayfs refuses a single lower layer without an upper: add an empty bottom layer.
        empty = base / "empty"
        empty.mkdir()
        layers.append(empty)
    mounted: list[Path] = []
    try:
        opts = "ro,lowerdir=" + ":".join(escape_overlay_path(d) for d in layers)
        _mount("overlay", mnt, "overlay", MS_RDONLY, opts)
        mounted.append(mnt)
        yield mnt
    finally:
        _cleanup(base, mounted)


def _cleanup(base: Path, mounted: list[Path]) -> None:
    errors: list[BaseException] = []
    for m in reversed(mounted):
        try:
            _umount(m)
        except OSError as e:
            errors.append(e)
    if not errors:
        shutil.rmtree(base, ignore_errors=True)
    if errors:
        raise errors[0]


def mounts_under(prefix: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below ``prefix`` (from /proc/self/mountinfo), for leak checks."""
    root = os.fspath(prefix).rstrip("/") or "/"
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape_mountinfo(line.split()[4])
            if mp == root or mp.startswith(root + "/"):
                found.append(mp)
    return found


def _unescape_mountinfo(s: str) -> str:
    out = []
    i = 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)

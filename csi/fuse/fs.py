"""The pyfuse3 filesystem: the mount root lists views; each view is one subdirectory.

Every handler runs on the trio thread: metadata comes from memory-mapped images; object opens
and reads go to worker threads, except small reads that the page cache answers or that a fast
local disk answers sooner than a trip to a thread would take (:mod:`csi.fuse.objects`); a
read waiting for a lazily fetched object never holds up the others. Handlers never
raise anything but :class:`pyfuse3.FUSEError` (pyfuse3 stops serving on any other exception):
a malformed image or an unexpected failure is logged and answered with EIO.

Two ways to serve, chosen when the filesystem is made (:func:`kernel_opens_supported`):

* **Kernel opens** (pyfuse3 with ``Operations.inode_as_fh``, the patch in ``patches/``):
  ``open`` and ``opendir`` answer ENOSYS once, after which the kernel opens files and
  directories itself, keeps file contents cached across opens (``FOPEN_KEEP_CACHE``) and
  caches directory listings (``FOPEN_CACHE_DIR``), and sends no release requests. ``read``
  and ``readdir`` then name the inode instead of a file handle. Reading an unchanged file a
  second time costs the daemon nothing. The root listing, which changes as views come and go,
  is invalidated in the kernel by the daemon (:meth:`DataPlaneFS.invalidate_root`).
* **Stock pyfuse3**: ``read`` and ``readdir`` only get a file handle, so every open, close
  and directory listing is a request to the daemon (slower; said once in the log and by the
  ``composefs_csi_fuse_kernel_opens`` metric).

In both, a removed view stays readable for the files and directories the kernel still holds:
its images are closed once the kernel has forgotten every inode of it (lookup counts, as the
kernel keeps them) and no open file of it is left.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3

from csi.image.errors import FormatError

from . import metrics
from .inodes import MAX_SLOT, ROOT_INO, slot_of
from .objects import ObjectFile, ObjectMissing, ObjectStoreAccess, ObjectUnavailable
from .pagepush import Item, PagePusher
from .readahead import SiblingReadahead
from .views import DOT_ENTRIES, FileRef, View, ViewError, entry_attributes

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S")

#: Attribute lifetime of the mount root (its listing changes as views come and go; with
#: kernel opens it is also invalidated explicitly at each change).
ROOT_TIMEOUT = 1.0
_U64_MAX = (1 << 64) - 1
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


_FORGETS = metrics.OPERATIONS.labels("forget")


def kernel_opens_supported() -> bool:
    """Whether this pyfuse3 passes inode numbers to ``read`` and ``readdir`` (the
    ``inode_as_fh`` patch), which lets the kernel handle opens and cache listings."""
    return hasattr(pyfuse3.Operations, "inode_as_fh")


#: Linux takes ENOSYS from opendir as "open it yourself" since 5.1 (from open a little earlier).
_NO_OPENDIR_KERNEL = (5, 1)


def _kernel_version(release: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def _object_error(e: Exception, doing: str, digest: bytes) -> pyfuse3.FUSEError:
    """What the kernel is told when an object cannot be opened or read: ENOENT for one the
    store lacks (and will not fetch), EIO otherwise (a system error is logged)."""
    if isinstance(e, ObjectMissing):
        return pyfuse3.FUSEError(errno.ENOENT)
    if not isinstance(e, ObjectUnavailable):
        log.error("%s object %s: %s", doing, digest.hex(), e)
    return pyfuse3.FUSEError(errno.EIO)


def handler(
    op: str,
) -> Callable[
    [Callable[Concatenate[S, P], Coroutine[Any, Any, T]]],
    Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
]:
    """Count the operation, and turn every failure into a FUSEError (logging the unexpected)."""
    ops = metrics.OPERATIONS.labels(op)

    def deco(
        fn: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
    ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
        @functools.wraps(fn)
        async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
            ops.inc()
            try:
                return await fn(self, *args, **kwargs)
            except pyfuse3.FUSEError as e:
                metrics.ERRORS.labels(op, _errname(e.errno)).inc()
                raise
            except ViewError as e:
                metrics.ERRORS.labels(op, _errname(e.errno)).inc()
                if e.errno == errno.EIO:
                    log.error("%s: %s", op, e)
                raise pyfuse3.FUSEError(e.errno) from None
            except FormatError as e:
                metrics.ERRORS.labels(op, "EIO").inc()
                log.error("%s: malformed image: %s", op, e)
                raise pyfuse3.FUSEError(errno.EIO) from None
            except Exception:
                metrics.ERRORS.labels(op, "EIO").inc()
                log.exception("%s failed", op)
                raise pyfuse3.FUSEError(errno.EIO) from None

        return wrapper

    return deco


@dataclass(eq=False, slots=True)
class _OpenFile:
    view: View
    ref: FileRef
    obj: ObjectFile | None


@dataclass(eq=False, slots=True)
class _OpenDir:
    view: View | None  # None: the mount root
    ino: int


class DataPlaneFS(pyfuse3.Operations):
    """Read-only FUSE operations over a set of views.

    With ``single`` set, the mount shows that one view at its root (``composefs-csi mount``);
    otherwise the root lists views by key and :meth:`attach`/:meth:`detach` change it.
    ``kernel_opens`` asks for kernel-handled opens; it is used only when pyfuse3 supports it
    (:func:`kernel_opens_supported`), so False forces the stock-pyfuse3 way.
    """

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False
    #: Symlink targets never change: the kernel may keep them (patched pyfuse3 only).
    enable_symlink_cache = True

    def __init__(
        self,
        objects: ObjectStoreAccess,
        *,
        timeout: float,
        kernel_opens: bool = True,
        readahead_files: int = 64,
    ) -> None:
        super().__init__()
        self.objects = objects
        self.timeout = timeout
        #: Read by a patched pyfuse3: ``read`` and ``readdir`` get inode numbers.
        old_kernel = _kernel_version(os.uname().release) < _NO_OPENDIR_KERNEL
        self.inode_as_fh = kernel_opens and kernel_opens_supported() and not old_kernel
        #: The next files of a directory read file by file (:mod:`csi.fuse.readahead`). Only
        #: reads that name the inode can use it: with file handles it stays off.
        self.readahead = SiblingReadahead(readahead_files if self.inode_as_fh else 0)
        #: Stores files read ahead into their inodes' page cache (:mod:`csi.fuse.pagepush`).
        self.pages = PagePusher(pyfuse3.notify_store)
        metrics.KERNEL_OPENS.set(1 if self.inode_as_fh else 0)
        if self.inode_as_fh:
            log.info("the kernel opens files itself and caches their contents and listings")
        elif kernel_opens and old_kernel:
            log.warning(
                "Linux %s cannot open FUSE files and directories by itself (5.1 or newer "
                "needed): every open and listing goes through the data plane (slower)",
                os.uname().release,
            )
        elif kernel_opens:
            log.warning(
                "pyfuse3 %s lacks the inode_as_fh patch (patches/ in the source tree): every "
                "open, close and directory listing goes through the data plane, several times "
                "slower for many small files; install the patched pyfuse3 (scripts/setup.sh, "
                "or the container image)",
                getattr(pyfuse3, "__version__", "?"),
            )
        else:
            log.info("kernel-handled opens are turned off (kernel_opens: false)")
        #: Lookup counts the kernel holds, by view slot (what FORGET gives back).
        self._lookups: dict[int, int] = {}
        self.views: dict[str, View] = {}
        self._by_slot: dict[int, View] = {}
        self._retired: dict[int, View] = {}
        self._next_slot = 1
        self.single: View | None = None
        self._files: dict[int, _OpenFile] = {}
        self._dirs: dict[int, _OpenDir] = {}
        self._next_fh = 1
        self._root_mtime_ns = time.time_ns()
        self.mounted = False

    # -- view registry -----------------------------------------------------------------------

    def allocate_slot(self) -> int:
        if self._next_slot > MAX_SLOT:
            raise RuntimeError("no view slots left (restart the data plane)")
        slot = self._next_slot
        self._next_slot += 1
        return slot

    def attach(self, view: View) -> None:
        self.views[view.key] = view
        self._by_slot[view.slot] = view
        self._root_mtime_ns = time.time_ns()
        self._update_view_metrics()

    def set_single(self, view: View) -> None:
        self.single = view
        self._by_slot[view.slot] = view

    def detach(self, view: View) -> None:
        """Remove a view from the root; its open files keep working until released."""
        self.views.pop(view.key, None)
        self._by_slot.pop(view.slot, None)
        self.readahead.forget_view(view.slot)
        self._root_mtime_ns = time.time_ns()
        self._update_view_metrics()
        self._retired[view.slot] = view
        self._close_if_unused(view.slot)
        # Idle object descriptors would keep objects the store may now collect from freeing
        # their space: let them go (files still open keep theirs).
        self.objects.fds.close_all()

    def _close_if_unused(self, slot: int) -> None:
        """Close a removed view once no open file and no kernel inode refers to it."""
        view = self._retired.get(slot)
        if view is None or view.open_files or self._lookups.get(slot, 0) > 0:
            return
        del self._retired[slot]
        self._lookups.pop(slot, None)
        view.close()

    def invalidate_root(self) -> None:
        """Make the kernel drop its cached attributes and listing of the mount root (blocking:
        call it from a worker thread, like :meth:`forget_entry`)."""
        if not self.mounted or self.single is not None:
            return
        try:
            pyfuse3.invalidate_inode(ROOT_INO)
        except OSError as e:  # ENOENT: nothing cached
            if e.errno != errno.ENOENT:
                log.warning("invalidating the mount root: %s", e)

    def forget_entry(self, view: View) -> None:
        """Make the kernel drop its cached entry of a detached view (blocking: call it from a
        worker thread, never from the trio thread, which must keep serving meanwhile)."""
        if not self.mounted:
            return
        try:
            pyfuse3.invalidate_entry(ROOT_INO, view.key.encode(), deleted=view.root_ino)
        except OSError as e:  # ENOENT: the kernel had already forgotten it
            if e.errno != errno.ENOENT:
                log.warning("invalidating %s: %s", view.key, e)

    def _update_view_metrics(self) -> None:
        images = sum(1 for v in self.views.values() if v.kind == "image")
        metrics.VIEWS.labels("image").set(images)
        metrics.VIEWS.labels("composition").set(len(self.views) - images)
        metrics.VIEW_HOLDERS.set(sum(len(v.holders) for v in self.views.values()))

    def _view(self, ino: int) -> View:
        if self.single is not None and ino == ROOT_INO:
            return self.single
        slot = slot_of(ino)
        view = self._by_slot.get(slot) or self._retired.get(slot)
        if view is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return view

    def _is_root(self, ino: int) -> bool:
        return ino == ROOT_INO and self.single is None

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ROOT_INO
        e.entry_timeout = ROOT_TIMEOUT
        e.attr_timeout = ROOT_TIMEOUT
        e.st_mode = stat.S_IFDIR | 0o755
        e.st_nlink = 2 + len(self.views)
        e.st_size = 4096
        e.st_blksize = 4096
        e.st_blocks = 8
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self._root_mtime_ns
        return e

    def _view_root_attrs(self, view: View) -> pyfuse3.EntryAttributes:
        return view.getattr(view.root_ino)

    # -- metadata -----------------------------------------------------------------------------

    @handler("lookup")
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self._is_root(parent_inode):
            if name == b"." or name == b"..":
                return self._root_attrs()
            view = self.views.get(name.decode("utf-8", "replace"))
            if view is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            self._looked_up(view.slot, 1)
            return self._view_root_attrs(view)
        view = self._view(parent_inode)
        attrs: pyfuse3.EntryAttributes | None
        if name == b".":
            attrs = view.getattr(parent_inode)
        elif name == b"..":
            up = view.parent_of(parent_inode)
            if self._is_root(up):
                return self._root_attrs()
            attrs = view.getattr(up)
        else:
            attrs = view.lookup(parent_inode, name)
        if attrs is None:
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = view.timeout
            return neg
        self._looked_up(view.slot, 1)
        return attrs

    def _looked_up(self, slot: int, n: int) -> None:
        """The kernel now holds ``n`` more lookups of inodes of the view in ``slot`` (each
        successful lookup and each listed entry but ``.`` and ``..``; the root is never
        forgotten and not counted)."""
        self._lookups[slot] = self._lookups.get(slot, 0) + n

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # No reply goes back and pyfuse3 does not catch exceptions here: never raise.
        _FORGETS.inc()
        lookups = self._lookups
        try:
            for ino, n in inode_list:
                if ino == ROOT_INO:
                    continue
                slot = slot_of(ino)
                left = lookups.get(slot, 0) - n
                lookups[slot] = left
                if left <= 0 and slot in self._retired:
                    self._close_if_unused(slot)
        except Exception:
            log.exception("forget failed")

    @handler("getattr")
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self._is_root(inode):
            return self._root_attrs()
        return self._view(inode).getattr(inode)

    @handler("readlink")
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if self._is_root(inode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self._view(inode).readlink(inode)

    @handler("listxattr")
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if self._is_root(inode):
            return []
        return self._view(inode).listxattr(inode)

    @handler("getxattr")
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if self._is_root(inode):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        value = self._view(inode).getxattr(inode, name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @handler("statfs")
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # pyfuse3 does not say which inode is asked about, so the answer covers the whole
        # mount: with one view it is exactly what a kernel composefs mount reports.
        views = [self.single] if self.single is not None else list(self.views.values())
        blocks = inos = 0
        for v in views:
            b, i = v.statfs()
            blocks += b
            inos += i
        s = pyfuse3.StatvfsData()
        s.f_bsize = 4096
        s.f_frsize = 4096
        s.f_blocks = blocks
        s.f_bfree = 0
        s.f_bavail = 0
        s.f_files = _U64_MAX
        s.f_ffree = _U64_MAX - inos
        s.f_favail = _U64_MAX - inos
        s.f_namemax = 255
        return s

    # -- directories ----------------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    @handler("opendir")
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self.inode_as_fh:
            # The kernel opens directories itself from now on (and caches their listings);
            # readdir gets the inode.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        fh = self._new_fh()
        if self._is_root(inode):
            self._dirs[fh] = _OpenDir(None, inode)
            return fh
        view = self._view(inode)
        view.dir_listing(inode)  # checks it is a directory; compositions merge it here
        self._dirs[fh] = _OpenDir(view, inode)
        return fh

    @handler("readdir")
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if self.inode_as_fh:
            d = _OpenDir(None, fh) if self._is_root(fh) else _OpenDir(self._view(fh), fh)
        else:
            found = self._dirs.get(fh)
            if found is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            d = found
        off = start_id
        if off < DOT_ENTRIES:
            dots = self._dot_attrs(d)
            for i in range(off, DOT_ENTRIES):
                name, attrs = dots[i]
                if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                    return
            off = DOT_ENTRIES
        if d.view is None:
            self._readdir_root(off, token)
            return
        slot = d.view.slot
        listed = 0
        first = off - DOT_ENTRIES
        ahead = self.readahead
        try:
            for name, attrs, cookie in d.view.readdir(d.ino, first):
                if not pyfuse3.readdir_reply(token, name, attrs, DOT_ENTRIES + cookie):
                    return
                if ahead.depth:
                    ahead.listed(
                        slot, d.ino, first + listed, attrs.st_ino, attrs.st_mode, attrs.st_size
                    )
                listed += 1
        finally:
            self._looked_up(slot, listed)

    def _readdir_root(self, off: int, token: pyfuse3.ReaddirToken) -> None:
        """The views in the order they were added; an entry's cookie is its slot (+2), so a
        listing resumes correctly however views come and go in between."""
        for slot in sorted(s for s in self._by_slot if s + DOT_ENTRIES > off):
            view = self._by_slot[slot]
            attrs = self._view_root_attrs(view)
            if not pyfuse3.readdir_reply(token, view.key.encode(), attrs, slot + DOT_ENTRIES):
                return
            self._looked_up(slot, 1)

    def _dot_attrs(self, d: _OpenDir) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        if d.view is None:
            root = self._root_attrs()
            return [(b".", root), (b"..", root)]
        here = d.view.getattr(d.ino)
        up = d.view.parent_of(d.ino)
        parent = self._root_attrs() if self._is_root(up) else d.view.getattr(up)
        return [(b".", here), (b"..", parent)]

    @handler("releasedir")
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files ------------------------------------------------------------------------------------

    async def _acquire(self, view: View, ref: FileRef) -> ObjectFile | None:
        """The object behind ``ref`` (fetched first for a lazy view), or None when inline."""
        if ref.digest is None:
            return None
        try:
            return await self.objects.acquire(ref.digest, ref.size, view.lazy_source)
        except (ObjectMissing, ObjectUnavailable, OSError) as e:
            raise _object_error(e, "opening", ref.digest) from None

    @handler("open")
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.inode_as_fh:
            # The kernel opens files itself from now on (keeping their cached pages); read
            # gets the inode, and a lazy view's object is fetched by the first read.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if self._is_root(inode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        view = self._view(inode)
        ref = view.file(inode)
        obj = await self._acquire(view, ref)
        fh = self._new_fh()
        self._files[fh] = _OpenFile(view, ref, obj)
        view.open_files += 1
        metrics.OPEN_FILES.inc()
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @handler("read")
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if self.inode_as_fh:
            return await self._read_inode(fh, off, size)
        f = self._files.get(fh)
        if f is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self._read(f.ref, f.obj, off, size)

    async def _read_inode(self, ino: int, off: int, size: int) -> bytes:
        if self._is_root(ino):
            raise pyfuse3.FUSEError(errno.EISDIR)
        view = self._view(ino)
        ref = view.file(ino)
        end = min(off + size, ref.size)
        if off >= end:
            return b""
        if off == 0 and self.readahead.depth:
            self._read_ahead(view, ino)
        if ref.digest is None:
            data = ref.image.read_inline(ref.nid, off, end - off)
        else:
            try:
                data = await self.objects.read(
                    ref.digest, ref.size, view.lazy_source, end - off, off
                )
            except (ObjectMissing, ObjectUnavailable, OSError) as e:
                raise _object_error(e, "reading", ref.digest) from None
        metrics.READ_BYTES.inc(len(data))
        return data

    def _read_ahead(self, view: View, ino: int) -> None:
        """Start reading ahead the files listed after ``ino`` if it is read in turn: into
        the page cache of their inodes where the kernel allows, else of their objects."""
        refs: list[tuple[int, bytes, int]] = []
        for nxt in self.readahead.on_read_start(view.slot, ino):
            try:
                ref = view.file(nxt)
            except ViewError:
                continue
            if ref.digest is not None:
                refs.append((nxt, ref.digest, ref.size))
        if not refs:
            return
        items: list[Item] = [(i, self.objects.object_path(d), size) for i, d, size in refs]
        if not self.pages.push(items):
            self.objects.warm([(d, size) for _, d, size in refs])

    async def _read(self, ref: FileRef, obj: ObjectFile | None, off: int, size: int) -> bytes:
        end = min(off + size, ref.size)
        if off >= end:
            return b""
        if obj is None:
            data = ref.image.read_inline(ref.nid, off, end - off)
        else:
            try:
                data = await self.objects.pread(obj, end - off, off)
            except OSError as e:
                log.error("reading object %s: %s", obj.digest.hex(), e)
                raise pyfuse3.FUSEError(errno.EIO) from None
        metrics.READ_BYTES.inc(len(data))
        return data

    @handler("release")
    async def release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        if f is None:
            return
        metrics.OPEN_FILES.dec()
        if f.obj is not None:
            self.objects.release(f.obj)
        view = f.view
        view.open_files -= 1
        if view.open_files == 0:
            self._close_if_unused(view.slot)

    def close_all(self) -> None:
        """Drop every view and cached descriptor (after unmounting)."""
        for f in self._files.values():
            if f.obj is not None:
                self.objects.release(f.obj)
        self._files.clear()
        self._dirs.clear()
        views = {id(v): v for v in [*self.views.values(), *self._retired.values()]}
        if self.single is not None:
            views[id(self.single)] = self.single
        for v in views.values():
            v.close()
        self.views.clear()
        self._by_slot.clear()
        self._retired.clear()
        self.objects.fds.close_all()
        self.objects.io.close()
        self.pages.stop()
        self._update_view_metrics()


__all__ = ["DataPlaneFS", "entry_attributes"]

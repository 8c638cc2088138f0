"""Views: what one subdirectory of the node-wide mount shows.

A view is either one image, presented exactly as a kernel composefs mount presents it, or a
composition of several images (lowest first) with container-layer semantics, presented as
overlayfs presents the kernel composefs mounts of those images stacked as lower layers:

* an upper entry hides the same name below; directories present in several layers merge (the
  uppermost one gives the attributes; ``st_nlink`` is 1 for a directory merged from more than
  one layer, as overlayfs reports it);
* whiteouts delete the name below and are not shown: a zero-size regular file with the
  ``trusted.overlay.whiteout`` xattr in a directory marked ``trusted.overlay.opaque=x`` (how a
  composefs image carries an overlay whiteout, format §1.14), or an OCI ``.wh.<name>`` file;
* opaque directories hide everything below them: ``trusted.overlay.opaque=y`` or an OCI
  ``.wh..wh..opq`` entry (never shown);
* overlay-private xattrs (``trusted.overlay.*``) are hidden and ``trusted.overlay.overlay.*``
  is shown as ``trusted.overlay.*``, as overlayfs does for lower layers.

Everything here is synchronous and cheap (the image is memory-mapped); the FUSE handlers call
it from the trio thread.
"""

from __future__ import annotations

import errno
import stat
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyfuse3

from csi.image import erofs as E
from csi.image.reader import Attr, Image

from .inodes import NID_MASK, ROOT_INO, SLOT_SHIFT, make_ino, split_ino
from .objects import FetchProgress, ObjectSource

BLOCK = E.BLOCK_SIZE
#: How a merged view names overlay xattrs as the kernel presents them (unescaped).
_OPAQUE = E.OVL_OPAQUE
_XWHITEOUT = E.OVL_PREFIX + b"whiteout"
_WH = b".wh."
_WH_OPQ = b".wh..wh..opq"
_FT_REG = E.FT_REG_FILE
_FT_DIR = E.FT_DIR

#: Readdir cookies 1 and 2 are "." and ".."; entries follow.
DOT_ENTRIES = 2


class ViewError(Exception):
    """A request about an inode of a view failed; ``errno`` is the FUSE answer."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err


def entry_attributes(
    a: Attr, ino: int, timeout: float, nlink: int | None = None
) -> pyfuse3.EntryAttributes:
    """FUSE attributes of an image inode, as EROFS (under overlayfs) reports them."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = ino
    e.generation = 0
    e.entry_timeout = timeout
    e.attr_timeout = timeout
    e.st_mode = a.mode
    e.st_nlink = a.nlink if nlink is None else nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = a.rdev
    e.st_size = a.size
    e.st_blksize = BLOCK
    # EROFS: i_blocks = round_up(i_size, block size) in 512-byte units; overlayfs passes it on.
    e.st_blocks = ((a.size + BLOCK - 1) // BLOCK) * (BLOCK // 512)
    ns = a.mtime_sec * 1_000_000_000 + a.mtime_nsec
    e.st_atime_ns = ns
    e.st_mtime_ns = ns
    e.st_ctime_ns = ns
    return e


@dataclass(frozen=True, slots=True)
class FileRef:
    """What an open of a regular file reads: inline bytes of ``image`` or an object."""

    image: Image
    nid: int
    size: int
    #: Digest of the backing object, or None when the data is inline in the image.
    digest: bytes | None


@dataclass(slots=True)
class DirEntry:
    name: bytes
    ino: int
    attrs: pyfuse3.EntryAttributes


class View:
    """State common to single images and compositions."""

    kind = "image"

    def __init__(
        self,
        key: str,
        slot: int,
        digests: Sequence[bytes],
        images: Sequence[Image],
        *,
        timeout: float,
        root_ino: int | None = None,
        parent_ino: int = ROOT_INO,
    ) -> None:
        self.key = key
        self.slot = slot
        self.digests = list(digests)
        self.images = list(images)
        self.timeout = timeout
        self.base = slot << SLOT_SHIFT
        self.parent_ino = parent_ino
        self.holders: set[str] = set()
        self.lazy_source: ObjectSource | None = None
        self.repository: str | None = None
        self.progress = FetchProgress()
        self.prefetch_scope: Any = None
        self.open_files = 0
        top = len(self.images) - 1
        natural = make_ino(slot, top if self.kind == "composition" else 0, self.images[-1].root_nid)
        self.root_ino = natural if root_ino is None else root_ino

    # -- common ------------------------------------------------------------------------------

    def owns(self, ino: int) -> bool:
        return ino == self.root_ino or (ino >> SLOT_SHIFT) == self.slot

    def statfs(self) -> tuple[int, int]:
        blocks = inos = 0
        for img in self.images:
            b, i = img.statfs()
            blocks += b
            inos += i
        return blocks, inos

    def close(self) -> None:
        for img in self.images:
            img.close()

    # -- to be provided by subclasses -------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes | None:
        raise NotImplementedError

    def getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        raise NotImplementedError

    def dir_listing(self, ino: int) -> list[DirEntry] | None:
        """A materialised listing (compositions), or None to stream with :meth:`readdir`."""
        raise NotImplementedError

    def readdir(
        self, ino: int, offset: int
    ) -> Iterator[tuple[bytes, pyfuse3.EntryAttributes, int]]:
        raise NotImplementedError

    def parent_of(self, ino: int) -> int:
        raise NotImplementedError

    def readlink(self, ino: int) -> bytes:
        raise NotImplementedError

    def listxattr(self, ino: int) -> list[bytes]:
        raise NotImplementedError

    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        raise NotImplementedError

    def file(self, ino: int) -> FileRef:
        raise NotImplementedError


def _file_ref(img: Image, nid: int) -> FileRef:
    a = img.getattr(nid)
    if not stat.S_ISREG(a.mode):
        raise ViewError(errno.EISDIR if stat.S_ISDIR(a.mode) else errno.EINVAL)
    ref = img.backing(nid)
    if ref is None:
        return FileRef(img, nid, a.size, None)
    payload, digest = ref
    if digest is None:
        digest = _digest_from_payload(payload)
    if digest is None:
        # Only store-relative "XX/<62 hex>" backing paths are served: anything else could
        # point outside the store.
        raise ViewError(errno.EIO, f"nid {nid}: unsupported backing path {payload!r}")
    return FileRef(img, nid, a.size, digest)


def _digest_from_payload(payload: bytes) -> bytes | None:
    if len(payload) != 65 or payload[2:3] != b"/":
        return None
    try:
        text = (payload[:2] + payload[3:]).decode("ascii")
        if text != text.lower():
            return None
        return bytes.fromhex(text)
    except (UnicodeDecodeError, ValueError):
        return None


Listing = list[tuple[bytes, pyfuse3.EntryAttributes, int]]


class ListingCache:
    """Directory listings with their attributes, ready to reply, across all views.

    The kernel does not cache directory contents (pyfuse3 cannot ask it to), so every walk
    lists every directory again; replying from here costs a fraction of rebuilding the
    entries. Bounded by the total number of entries held (least recently listed out first).
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self.entries = 0
        self._lists: OrderedDict[tuple[int, int], Listing] = OrderedDict()

    def get(self, key: tuple[int, int]) -> Listing | None:
        listing = self._lists.get(key)
        if listing is not None:
            self._lists.move_to_end(key)
        return listing

    def put(self, key: tuple[int, int], listing: Listing) -> None:
        if len(listing) > self.max_entries:
            return
        old = self._lists.pop(key, None)
        if old is not None:
            self.entries -= len(old)
        self._lists[key] = listing
        self.entries += len(listing)
        while self.entries > self.max_entries:
            _, victim = self._lists.popitem(last=False)
            self.entries -= len(victim)

    def drop_slot(self, slot: int) -> None:
        for key in [k for k in self._lists if k[0] == slot]:
            self.entries -= len(self._lists.pop(key))


class ImageView(View):
    """One image, field for field what a kernel composefs mount of it shows.

    Inode numbers are ``base | nid`` (see :mod:`csi.fuse.inodes`); ``root_ino`` replaces the
    root's number when the view is the mount root.
    """

    kind = "image"

    def __init__(
        self,
        key: str,
        slot: int,
        digest: bytes,
        image: Image,
        *,
        listings: ListingCache | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(key, slot, [digest], [image], **kw)
        self.image = image
        self.listings = listings if listings is not None else ListingCache(0)
        self.root_nid = image.root_nid
        # Directory nid -> parent directory nid, learnt as directories are looked up (the
        # kernel cannot know a directory before looking it up or listing its parent).
        self._parents: dict[int, int] = {}

    def close(self) -> None:
        self.listings.drop_slot(self.slot)
        super().close()

    def _nid(self, ino: int) -> int:
        if ino == self.root_ino:
            return self.root_nid
        slot, layer, nid = split_ino(ino)
        if slot != self.slot or layer != 0 or nid == self.root_nid:
            raise ViewError(errno.ESTALE)
        return nid

    def _ino(self, nid: int) -> int:
        return self.root_ino if nid == self.root_nid else self.base | nid

    def lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes | None:
        dnid = self._nid(parent)
        nid = self.image.lookup(dnid, name)
        if nid is None:
            return None
        a = self.image.getattr(nid)
        if stat.S_ISDIR(a.mode):
            self._parents[nid] = dnid
        return entry_attributes(a, self._ino(nid), self.timeout)

    def getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.image.getattr(self._nid(ino)), ino, self.timeout)

    def dir_listing(self, ino: int) -> list[DirEntry] | None:
        a = self.image.getattr(self._nid(ino))
        if not stat.S_ISDIR(a.mode):
            raise ViewError(errno.ENOTDIR)
        return None

    def parent_of(self, ino: int) -> int:
        nid = self._nid(ino)
        if nid == self.root_nid:
            return self.parent_ino
        return self._ino(self._parents.get(nid, self.root_nid))

    def readdir(
        self, ino: int, offset: int
    ) -> Iterator[tuple[bytes, pyfuse3.EntryAttributes, int]]:
        """Entries from cookie ``offset`` (after ``.`` and ``..``) with their next cookies."""
        dnid = self._nid(ino)
        listing = self.listings.get((self.slot, dnid))
        if listing is None:
            if offset and self.listings.max_entries == 0:
                yield from self._read_dir(dnid, offset)
                return
            listing = list(self._read_dir(dnid, 0))
            self.listings.put((self.slot, dnid), listing)
        for i in range(offset, len(listing)):
            yield listing[i]

    def _read_dir(
        self, dnid: int, offset: int
    ) -> Iterator[tuple[bytes, pyfuse3.EntryAttributes, int]]:
        img = self.image
        timeout = self.timeout
        for name, nid, ft, cookie in img.readdir_plus(dnid, offset):
            a = img.getattr(nid)
            if ft == _FT_DIR:
                self._parents[nid] = dnid
            yield name, entry_attributes(a, self._ino(nid), timeout), cookie

    def readlink(self, ino: int) -> bytes:
        nid = self._nid(ino)
        if not stat.S_ISLNK(self.image.getattr(nid).mode):
            raise ViewError(errno.EINVAL)
        return self.image.readlink(nid)

    def listxattr(self, ino: int) -> list[bytes]:
        return self.image.listxattr(self._nid(ino))

    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        return self.image.getxattr(self._nid(ino), name)

    def file(self, ino: int) -> FileRef:
        return _file_ref(self.image, self._nid(ino))


@dataclass(slots=True)
class _MergedDir:
    ino: int
    parent: int
    #: ``(layer, nid)`` of this directory in each layer that contributes, uppermost first.
    layers: tuple[tuple[int, int], ...]
    listing: list[DirEntry] | None = field(default=None)


def _present_ovl_xattrs(names: list[bytes]) -> list[bytes]:
    out = []
    for n in names:
        if n.startswith(E.OVL_PREFIX):
            if n.startswith(E.OVL_ESCAPED_PREFIX):
                out.append(E.OVL_PREFIX + n[len(E.OVL_ESCAPED_PREFIX) :])
        else:
            out.append(n)
    return out


class CompositionView(View):
    """Several images stacked lowest-first, merged as overlayfs merges lower layers."""

    kind = "composition"

    def __init__(
        self, key: str, slot: int, digests: Sequence[bytes], images: Sequence[Image], **kw: Any
    ) -> None:
        super().__init__(key, slot, digests, images, **kw)
        top = len(self.images) - 1
        layers: list[tuple[int, int]] = []
        for layer in range(top, -1, -1):
            img = self.images[layer]
            layers.append((layer, img.root_nid))
            if self._opaque(layer, img.root_nid):
                break
        self._dirs: dict[int, _MergedDir] = {
            self.root_ino: _MergedDir(self.root_ino, self.parent_ino, tuple(layers))
        }

    # -- layer rules -----------------------------------------------------------------------

    def _opaque(self, layer: int, nid: int) -> bool:
        img = self.images[layer]
        return img.getxattr(nid, _OPAQUE) == b"y" or img.lookup(nid, _WH_OPQ) is not None

    def _xwhiteouts_dir(self, layer: int, nid: int) -> bool:
        return self.images[layer].getxattr(nid, _OPAQUE) == b"x"

    def _is_xwhiteout(self, layer: int, nid: int, a: Attr) -> bool:
        return (
            stat.S_ISREG(a.mode)
            and a.size == 0
            and self.images[layer].getxattr(nid, _XWHITEOUT) is not None
        )

    def _resolve(
        self, d: _MergedDir, name: bytes, start: int = 0
    ) -> tuple[int, pyfuse3.EntryAttributes] | None:
        """``(ino, attrs)`` of ``name`` in merged directory ``d``, or None."""
        if name.startswith(_WH):
            return None
        dirs: list[tuple[int, int]] = []
        for layer, dnid in d.layers[start:]:
            img = self.images[layer]
            nid = img.lookup(dnid, name)
            if nid is not None:
                a = img.getattr(nid)
                if self._xwhiteouts_dir(layer, dnid) and self._is_xwhiteout(layer, nid, a):
                    break
                if not stat.S_ISDIR(a.mode):
                    if dirs:
                        break  # a non-directory below a directory is hidden
                    ino = make_ino(self.slot, layer, nid)
                    return ino, entry_attributes(a, ino, self.timeout)
                dirs.append((layer, nid))
                if self._opaque(layer, nid):
                    break
            if img.lookup(dnid, _WH + name) is not None:
                break
        if not dirs:
            return None
        top_layer, top_nid = dirs[0]
        ino = make_ino(self.slot, top_layer, top_nid)
        if ino not in self._dirs:
            self._dirs[ino] = _MergedDir(ino, d.ino, tuple(dirs))
        a = self.images[top_layer].getattr(top_nid)
        return ino, entry_attributes(a, ino, self.timeout, 1 if len(dirs) > 1 else None)

    def _dir(self, ino: int) -> _MergedDir:
        d = self._dirs.get(ino)
        if d is None:
            if not self.owns(ino):
                raise ViewError(errno.ESTALE)
            raise ViewError(errno.ENOTDIR)
        return d

    def _layer_nid(self, ino: int) -> tuple[int, int]:
        d = self._dirs.get(ino)
        if d is not None:
            return d.layers[0]
        slot, layer, nid = split_ino(ino)
        if slot != self.slot or layer >= len(self.images):
            raise ViewError(errno.ESTALE)
        return layer, nid

    # -- requests ------------------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes | None:
        found = self._resolve(self._dir(parent), name)
        return None if found is None else found[1]

    def getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        d = self._dirs.get(ino)
        if d is not None:
            layer, nid = d.layers[0]
            nlink = 1 if len(d.layers) > 1 else None
            return entry_attributes(self.images[layer].getattr(nid), ino, self.timeout, nlink)
        layer, nid = self._layer_nid(ino)
        return entry_attributes(self.images[layer].getattr(nid), ino, self.timeout)

    def parent_of(self, ino: int) -> int:
        return self._dir(ino).parent

    def dir_listing(self, ino: int) -> list[DirEntry] | None:
        d = self._dir(ino)
        if d.listing is None:
            d.listing = self._merge(d)
        return d.listing

    def _merge(self, d: _MergedDir) -> list[DirEntry]:
        """The merged listing, in the order overlayfs gives it."""
        seen: set[bytes] = set()
        hidden: set[bytes] = set()
        per_layer: list[list[DirEntry]] = []
        for k, (layer, dnid) in enumerate(d.layers):
            img = self.images[layer]
            xw = self._xwhiteouts_dir(layer, dnid)
            hide_below: list[bytes] = []
            out: list[DirEntry] = []
            for name, nid, ft, _ in img.readdir_plus(dnid):
                if name.startswith(_WH):
                    if name != _WH_OPQ:
                        hide_below.append(name[len(_WH) :])
                    continue
                if name in seen or name in hidden:
                    continue
                if xw and ft == _FT_REG and self._is_xwhiteout(layer, nid, img.getattr(nid)):
                    hidden.add(name)
                    continue
                seen.add(name)
                if ft == _FT_DIR:
                    found = self._resolve(d, name, k)
                    if found is None:  # cannot happen: the directory itself is here
                        continue
                    ino, attrs = found
                else:
                    ino = make_ino(self.slot, layer, nid)
                    attrs = entry_attributes(img.getattr(nid), ino, self.timeout)
                out.append(DirEntry(name, ino, attrs))
            hidden.update(hide_below)
            per_layer.append(out)
        if len(per_layer) == 1:
            return per_layer[0]
        # overlayfs lists every name of the lowest layer first, in that layer's order (moving
        # names already found above there), then the rest in the order they were found.
        by_name = {e.name: e for entries in per_layer for e in entries}
        layer, dnid = d.layers[-1]
        first: list[DirEntry] = []
        for name, _, _, _ in self.images[layer].readdir_plus(dnid):
            e = by_name.pop(name, None)
            if e is not None:
                first.append(e)
        return first + [e for entries in per_layer[:-1] for e in entries if e.name in by_name]

    def readdir(
        self, ino: int, offset: int
    ) -> Iterator[tuple[bytes, pyfuse3.EntryAttributes, int]]:
        listing = self.dir_listing(ino)
        assert listing is not None
        for i in range(offset, len(listing)):
            e = listing[i]
            yield e.name, e.attrs, i + 1

    def readlink(self, ino: int) -> bytes:
        layer, nid = self._layer_nid(ino)
        img = self.images[layer]
        if not stat.S_ISLNK(img.getattr(nid).mode):
            raise ViewError(errno.EINVAL)
        return img.readlink(nid)

    def listxattr(self, ino: int) -> list[bytes]:
        layer, nid = self._layer_nid(ino)
        return _present_ovl_xattrs(self.images[layer].listxattr(nid))

    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        layer, nid = self._layer_nid(ino)
        img = self.images[layer]
        if name.startswith(E.OVL_PREFIX):
            return img.getxattr(nid, E.OVL_ESCAPED_PREFIX + name[len(E.OVL_PREFIX) :])
        return img.getxattr(nid, name)

    def file(self, ino: int) -> FileRef:
        if ino in self._dirs:
            raise ViewError(errno.EISDIR)
        layer, nid = self._layer_nid(ino)
        return _file_ref(self.images[layer], nid)


__all__ = [
    "DOT_ENTRIES",
    "NID_MASK",
    "CompositionView",
    "DirEntry",
    "FileRef",
    "ImageView",
    "View",
    "ViewError",
    "entry_attributes",
]

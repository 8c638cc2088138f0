"""One layer blob into the tree: a tar layer entry by entry, or an artifact's plain file.

File contents go from the stream into objects (:class:`~csi.oci.objects.ObjectSink`); files of
at most 64 bytes are kept inline in the image, as ``mkcomposefs`` and ``composefs-csi build``
do, so an imported image equals a build of the unpacked tree.
"""

from __future__ import annotations

from csi.image.tree import INLINE_CONTENT_DEFAULT_MAX, object_path

from .apply import WHITEOUT_PREFIX, Applier, clean_path, make_node
from .errors import LayerError
from .objects import ObjectSink, ShortRead
from .streams import ByteReader
from .tarstream import LINK, REG, TarEntry, TarReader


def _read_small(tar: TarReader, size: int, what: str) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = tar.readinto(view[got:])
        if n == 0:
            raise LayerError(f"{what}: the stream ends inside the file")
        got += n
    return bytes(buf)


def apply_tar(
    tar: TarReader, applier: Applier, sink: ObjectSink, what: str, *, layers_mode: bool
) -> int:
    """Apply every entry of ``tar``; return how many there were."""
    count = 0
    while (e := tar.next()) is not None:
        count += 1
        ewhat = f"{what}: {e.name.decode('utf-8', 'backslashreplace')[:300]!r}"
        parts = clean_path(e.name, ewhat)
        if parts and parts[-1].startswith(WHITEOUT_PREFIX):
            applier.whiteout(parts, ewhat)
            continue
        if e.type == LINK:
            applier.add(e, parts, None, ewhat)
            continue
        node = make_node(e, ewhat, overlay_private_xattrs=layers_mode)
        if e.type == REG and e.size:
            if e.size <= INLINE_CONTENT_DEFAULT_MAX:
                node.content = _read_small(tar, e.size, ewhat)
            else:
                digest = sink.store(tar.readinto, e.size)
                node.digest, node.payload = digest, object_path(digest)
        applier.add(e, parts, node, ewhat)
    return count


def add_file(
    reader: ByteReader,
    size: int,
    path: bytes,
    applier: Applier,
    sink: ObjectSink,
    what: str,
) -> None:
    """An artifact layer that is a plain file: stored whole at ``path`` (mode 0644, 0:0)."""
    parts = clean_path(path, what)
    if not parts:
        raise LayerError(f"{what}: the file name {path!r:.300} names no file")
    entry = TarEntry(
        name=path,
        type=REG,
        mode=0o644,
        uid=0,
        gid=0,
        size=size,
        mtime_sec=0,
        mtime_nsec=0,
        linkname=b"",
        devmajor=0,
        devminor=0,
    )
    node = make_node(entry, what)
    if size:
        try:
            if size <= INLINE_CONTENT_DEFAULT_MAX:
                data = reader.read_exact(size)
                if data is None:
                    raise ShortRead
                node.content = data
            else:
                digest = sink.store(reader.readinto, size)
                node.digest, node.payload = digest, object_path(digest)
        except (ShortRead, EOFError):
            raise LayerError(f"{what}: shorter than the {size} bytes its descriptor says") from None
    applier.add(entry, parts, node, what)

"""Optional pack files: an image's small objects also stored back to back, for few requests.

A repository without ``packs/`` is complete (composefs-rs ignores the folder); a client that
finds an image's pack index fetches the objects the index lists with a few HTTP Range requests
instead of one request per object, and everything else from ``objects/``. Nothing in a pack is
trusted: every object taken out of one is checked against its digest (after decompression)
before it is used, and an object that does not check out is fetched from ``objects/``.

Layout (docs/publishing.md)::

    packs/<64 hex>            a pack: object bodies back to back, each raw or one zstd frame;
                              named by the SHA-256 of the file
    packs/index/<64 hex>      the index of the image with that digest

Index format (all integers little-endian)::

    header   8s magic "CFSCSIP1", u32 pack count P, u32 entry count E
    packs    P x 32 bytes: pack names (the <64 hex> of packs/<64 hex>)
    entries  E x 25 bytes: 8s first 8 bytes of the object digest, u32 pack number (< P),
             u64 offset in the pack, u32 stored length, u8 encoding (0 raw, 1 zstd frame)

Entries are in pack order. The stored length of a raw entry is the object's size; a zstd entry
is one frame that decompresses to the object's size (the image says which size).
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from csi.image.tree import Tree

from . import layout
from .repository import Repository

PACKS_DIR = "packs"
INDEX_DIR = "packs/index"
MAGIC = b"CFSCSIP1"
ENC_RAW = 0
ENC_ZSTD = 1
_HEADER = struct.Struct("<8sII")
_ENTRY = struct.Struct("<8sIQIB")
ENTRY_SIZE = _ENTRY.size
PREFIX = 8
#: Largest object written into packs by default (larger ones are fetched one per request:
#: their own size already keeps a transfer busy).
DEFAULT_MAX_OBJECT = 1 << 20
#: Largest stored length an index may give an entry.
MAX_ENTRY = 64 << 20
#: A pack is closed and a new one started past this size.
PACK_MAX = 1 << 30
#: A zstd frame is kept only when it is at most this fraction of the object.
KEEP_RATIO = 0.95


class PackIndexError(ValueError):
    """A pack index that does not parse (the message says where)."""


class IndexEntry(NamedTuple):
    """One object's place in a pack. (A named tuple: an index has one per object of its
    image, 100k for a big one, and a frozen dataclass took three times as long to build.)"""

    prefix: bytes
    pack: int
    offset: int
    length: int
    encoding: int


@dataclass(frozen=True, slots=True)
class PackIndex:
    packs: list[bytes]
    entries: list[IndexEntry]

    def encode(self) -> bytes:
        out = [_HEADER.pack(MAGIC, len(self.packs), len(self.entries)), *self.packs]
        out.extend(
            _ENTRY.pack(e.prefix, e.pack, e.offset, e.length, e.encoding) for e in self.entries
        )
        return b"".join(out)


def index_size_limit(objects: int) -> int:
    """The largest index an image of ``objects`` objects can have."""
    return _HEADER.size + objects * (32 + ENTRY_SIZE)


def parse_index(data: bytes | memoryview, *, max_entries: int) -> PackIndex:
    """Parse (and bounds-check) an index of at most ``max_entries`` entries."""
    if len(data) < _HEADER.size:
        raise PackIndexError(f"{len(data)} bytes: shorter than the header")
    magic, npacks, nentries = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise PackIndexError("not a pack index (bad magic)")
    if nentries > max_entries or npacks > max(nentries, 0):
        raise PackIndexError(f"{npacks} packs, {nentries} entries: more than the image has")
    if npacks == 0 and nentries:
        raise PackIndexError("entries but no packs")
    want = _HEADER.size + 32 * npacks + ENTRY_SIZE * nentries
    if len(data) != want:
        raise PackIndexError(f"{len(data)} bytes where the header implies {want}")
    pos = _HEADER.size
    packs = [bytes(data[pos + 32 * i : pos + 32 * (i + 1)]) for i in range(npacks)]
    pos += 32 * npacks
    entries = list(map(IndexEntry._make, _ENTRY.iter_unpack(data[pos:])))
    for _, pack, offset, length, enc in entries:
        if pack >= npacks:
            raise PackIndexError(f"entry names pack {pack} of {npacks}")
        if enc not in (ENC_RAW, ENC_ZSTD):
            raise PackIndexError(f"unknown encoding {enc}")
        if not 0 < length <= MAX_ENTRY or offset > (1 << 48):
            raise PackIndexError(f"entry at offset {offset} has length {length}")
    return PackIndex(packs, entries)


def pack_relpath(pack: bytes) -> str:
    return f"{PACKS_DIR}/{layout.check_digest(pack).hex()}"


def index_relpath(image: bytes) -> str:
    return f"{INDEX_DIR}/{layout.check_digest(image).hex()}"


# -- writing (composefs-csi build --pack) -----------------------------------------------------


@dataclass
class PackReport:
    """What :func:`write_packs` did."""

    objects: int = 0  # entries in the image's index
    written: int = 0  # objects written into new packs
    reused: int = 0  # objects already in earlier packs
    raw_bytes: int = 0  # size of the objects written
    stored_bytes: int = 0  # what they take in the new packs
    packs: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class PackOptions:
    """How ``build --pack`` and ``import --pack`` write packs."""

    #: Largest object written into packs.
    max_object: int = DEFAULT_MAX_OBJECT
    #: zstd level of entries (1-19), or None: raw.
    level: int | None = None

    def __post_init__(self) -> None:
        if self.level is not None and not 1 <= self.level <= 19:
            raise ValueError(f"zstd level {self.level}: choose one from 1 to 19")
        if self.max_object < 1:
            raise ValueError("the largest packed object must be at least 1 byte")


def pack_tree(repo: Repository, image: bytes, tree: Tree, options: PackOptions) -> PackReport:
    """:func:`write_packs` for the image of ``tree`` (digest ``image``): its objects that
    ``repo`` holds, in the tree's order."""
    objects = [
        (n.digest, n.size)
        for _, n in tree.bfs()
        if n.is_external and n.digest is not None and repo.has_object(n.digest)
    ]
    return write_packs(repo, image, objects, max_object=options.max_object, level=options.level)


def _known_entries(repo: Repository) -> dict[bytes, tuple[bytes, int, int, int]]:
    """prefix -> (pack, offset, length, encoding) for every object the repository's indexes
    already place in a pack that exists."""
    known: dict[bytes, tuple[bytes, int, int, int]] = {}
    folder = repo.root / INDEX_DIR
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return known
    present: dict[bytes, bool] = {}
    for name in names:
        if not layout.is_hex_digest(name):
            continue
        try:
            data = (folder / name).read_bytes()
            idx = parse_index(data, max_entries=len(data) // ENTRY_SIZE)
        except (OSError, ValueError):
            continue
        for e in idx.entries:
            pack = idx.packs[e.pack]
            if pack not in present:
                present[pack] = (repo.root / pack_relpath(pack)).is_file()
            if present[pack]:
                known.setdefault(e.prefix, (pack, e.offset, e.length, e.encoding))
    return known


class _PackFile:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.tmp = repo.tmp.create("pack")
        self.size = 0
        self.hash = hashlib.sha256()

    def append(self, data: bytes) -> int:
        offset = self.size
        view = memoryview(data)
        while view:
            n = os.write(self.tmp.fd, view)
            view = view[n:]
        self.hash.update(data)
        self.size += len(data)
        return offset

    def finish(self) -> bytes:
        name = self.hash.digest()
        os.fchmod(self.tmp.fd, 0o644)
        os.fsync(self.tmp.fd)
        path = self.repo.root / pack_relpath(name)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.tmp.publish(path)  # the same bytes may be there already: either is fine
        return name


_Encoded = tuple[bytes, bytes, int]


def _encoder(level: int | None) -> Callable[[tuple[bytes, int, str]], _Encoded]:
    """What turns (digest, size, path) into (digest, bytes to store, encoding), in threads
    (reading and zstd release the GIL)."""
    local = threading.local()

    def encode(item: tuple[bytes, int, str]) -> _Encoded:
        digest, size, path = item
        with open(path, "rb", buffering=0) as f:
            data = f.read()
        if len(data) != size:
            raise OSError(f"object {digest.hex()} is {len(data)} bytes, the image says {size}")
        if level is None:
            return digest, data, ENC_RAW
        c = getattr(local, "c", None)
        if c is None:
            import zstandard

            c = local.c = zstandard.ZstdCompressor(level=level, write_content_size=True)
        packed = c.compress(data)
        if len(packed) <= size * KEEP_RATIO:
            return digest, packed, ENC_ZSTD
        return digest, data, ENC_RAW

    return encode


def write_packs(
    repo: Repository,
    image: bytes,
    objects: Sequence[tuple[bytes, int]],
    *,
    max_object: int = DEFAULT_MAX_OBJECT,
    level: int | None = None,
) -> PackReport:
    """Write the pack index of ``image``, whose objects are ``objects`` (digest, size) in the
    order they should follow each other in a pack (the tree's order); objects of at most
    ``max_object`` bytes that no earlier pack holds go into new packs first. ``level``: zstd
    level for entries (kept where the frame saves at least 5%); None: raw.

    Call it before the image is linked and before any ref moves: a client that sees the image
    may look for its index at once. Every object must be in ``repo``.
    """
    layout.check_digest(image)
    known = _known_entries(repo)
    report = PackReport()
    seen: set[bytes] = set()
    todo: list[tuple[bytes, int, str]] = []
    for digest, size in objects:
        if digest in seen or size > max_object or size == 0:
            continue
        seen.add(digest)
        if digest[:PREFIX] in known:
            report.reused += 1
        else:
            todo.append((digest, size, repo.object_file(digest)))
    placed: dict[bytes, tuple[bytes, int, int, int]] = {}
    if todo:
        encode = _encoder(level)
        pool = ThreadPoolExecutor(max(2, os.cpu_count() or 1), thread_name_prefix="pack")
        pack = _PackFile(repo)
        pending: list[tuple[bytes, int, int, int]] = []  # (prefix, offset, length, enc)
        try:
            with pool:
                for digest, data, enc in pool.map(encode, todo):
                    if pack.size and pack.size + len(data) > PACK_MAX:
                        name = pack.finish()
                        report.packs.append(name)
                        for p, off, n, e in pending:
                            placed[p] = (name, off, n, e)
                        pending = []
                        pack = _PackFile(repo)
                    offset = pack.append(data)
                    pending.append((digest[:PREFIX], offset, len(data), enc))
                    report.written += 1
                    report.stored_bytes += len(data)
            name = pack.finish()
        except BaseException:
            pack.tmp.discard()
            raise
        report.packs.append(name)
        for p, off, n, e in pending:
            placed[p] = (name, off, n, e)
        report.raw_bytes = sum(size for _, size, _ in todo)
    # The index lists the image's packed objects in pack order.
    rows: list[tuple[bytes, int, int, int, bytes]] = []
    for digest in seen:
        p = digest[:PREFIX]
        pack_name, offset, length, enc = placed.get(p) or known[p]
        rows.append((pack_name, offset, length, enc, p))
    names = sorted({r[0] for r in rows})
    number = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: (number[r[0]], r[1]))
    index = PackIndex(
        names, [IndexEntry(p, number[n], off, length, enc) for n, off, length, enc, p in rows]
    )
    report.objects = len(rows)
    repo.write_file(repo.root / index_relpath(image), index.encode(), tag="index")
    return report


def iter_index_files(root: Path) -> Iterator[tuple[bytes, Path]]:
    """(image digest, path) of every pack index under ``root``."""
    folder = root / INDEX_DIR
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return
    for name in names:
        if layout.is_hex_digest(name):
            yield bytes.fromhex(name), folder / name

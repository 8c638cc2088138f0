"""Fetching objects out of pack files (:mod:`csi.repo.packs`) with a few Range requests.

An eager fetch of many objects asks for the image's pack index once (``packs/index/<hex>``; a
repository without packs answers 404 and nothing else changes). :func:`plan` turns the missing
objects the index places in packs into :class:`RangeJob` s: runs of entries of one pack,
joined across gaps of at most :data:`GAP` bytes and cut at :data:`RANGE_MAX` bytes, so that a
cold fetch of 10k small objects is a few dozen requests instead of 10k. The rest (objects the
index does not list, large ones, entries that disagree with the image) are fetched from
``objects/`` as usual.

Nothing from a pack is trusted: :class:`RangeSplitter` cuts a range's body into entries,
:func:`decode` decompresses a zstd entry into at most the size the image records, and the
object is then checked against its digest like any download. An entry that fails any of that
is fetched from ``objects/`` (with mirrors and retries).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import NamedTuple

from csi.repo.packs import (
    ENC_RAW,
    ENC_ZSTD,
    PREFIX,
    PackIndex,
    index_relpath,
    index_size_limit,
    pack_relpath,
    parse_index,
)

from .errors import SourceError, SourceNotFound
from .mirrors import Mirrors

log = logging.getLogger(__name__)

#: Bytes of entries nobody needs that a range may carry to join two runs (cheaper than a
#: request at any round trip above ~1 ms).
GAP = 256 << 10
#: Longest range: long enough that a request's round trip is small beside its transfer, short
#: enough to spread a fetch over every worker and connection.
RANGE_MAX = 4 << 20
#: Most entries in one range (its objects are claimed in the store together, one lock each).
RANGE_MAX_ENTRIES = 512
#: Largest object taken from a pack (an entry is held in memory whole while it is checked).
ENTRY_MAX = 16 << 20


class RangeEntry(NamedTuple):
    digest: bytes
    offset: int  # from the start of the range
    length: int  # bytes stored
    encoding: int
    size: int  # the object's size, from the image


class RangeJob(NamedTuple):
    relpath: str
    offset: int
    length: int
    entries: tuple[RangeEntry, ...]


def load_index(mirrors: Mirrors, image: bytes, objects: int) -> tuple[PackIndex | None, int]:
    """The pack index of ``image`` (which has ``objects`` objects) from the first mirror that
    has one, or None; and the bytes received while looking for it (an index is downloaded like
    anything else). Each mirror is asked at most twice (once more after a transient error):
    packs only save requests, so there is no backoff and no error."""
    relpath = index_relpath(image)
    limit = index_size_limit(objects)
    received = 0
    for src in mirrors.sources:
        for attempt in range(2):
            chunks: list[bytes] = []
            try:
                try:
                    src.get(relpath, chunks.append, max_size=limit)
                finally:
                    received += sum(map(len, chunks))
            except SourceNotFound:
                break
            except SourceError as e:
                log.info(
                    "repository %r: no pack index from %s (%s)",
                    mirrors.name,
                    src.label,
                    mirrors.safe(e),
                )
                if e.transient and not attempt:
                    continue
                break
            try:
                return parse_index(b"".join(chunks), max_entries=objects), received
            except ValueError as e:
                log.warning(
                    "repository %r: unusable pack index of image %s from %s: %s",
                    mirrors.name,
                    image.hex(),
                    src.label,
                    e,
                )
                break
    return None, received


def plan(
    index: PackIndex,
    missing: Mapping[bytes, int],
    *,
    gap: int = GAP,
    range_max: int = RANGE_MAX,
    max_entries: int = RANGE_MAX_ENTRIES,
) -> tuple[list[RangeJob], set[bytes]]:
    """Ranges for the objects of ``missing`` (digest: size) that ``index`` places in packs;
    and the objects left to fetch one by one."""
    by_prefix: dict[bytes, bytes | None] = {}
    for digest in missing:
        p = digest[:PREFIX]
        by_prefix[p] = None if p in by_prefix else digest  # two alike: neither from packs
    picked: dict[int, list[tuple[int, int, int, bytes, int]]] = {}
    for e in index.entries:
        d = by_prefix.get(e.prefix)
        if d is None:
            continue
        size = missing[d]
        # A raw entry is the object; a zstd frame is kept only where it is smaller (the
        # writer's KEEP_RATIO), which also bounds what a lying index makes a range carry.
        if size > ENTRY_MAX or (
            e.length != size
            if e.encoding == ENC_RAW
            else not (e.encoding == ENC_ZSTD and e.length < size)
        ):
            continue  # disagrees with the image: from objects/
        by_prefix[e.prefix] = None  # once
        picked.setdefault(e.pack, []).append((e.offset, e.length, e.encoding, d, size))
    jobs: list[RangeJob] = []
    for pack_no, rows in sorted(picked.items()):
        rows.sort()
        relpath = pack_relpath(index.packs[pack_no])
        run: list[tuple[int, int, int, bytes, int]] = []
        end = 0
        for row in rows:
            offset, length = row[0], row[1]
            if run and (
                offset < end
                or offset - end > gap
                or offset + length - run[0][0] > range_max
                or len(run) >= max_entries
            ):
                if offset < end:
                    continue  # overlaps the previous entry: from objects/
                jobs.append(_job(relpath, run))
                run = []
            run.append(row)
            end = offset + length
        if run:
            jobs.append(_job(relpath, run))
    planned = {e.digest for j in jobs for e in j.entries}
    return jobs, set(missing) - planned


def _job(relpath: str, run: list[tuple[int, int, int, bytes, int]]) -> RangeJob:
    start = run[0][0]
    end = run[-1][0] + run[-1][1]
    entries = tuple(RangeEntry(d, off - start, n, enc, size) for off, n, enc, d, size in run)
    return RangeJob(relpath, start, end - start, entries)


class RangeSplitter:
    """Cuts the body of one range into its entries as it arrives: ``deliver(entry, stored
    bytes, gap bytes skipped before it)`` for each entry complete, in order. :attr:`pending`
    lists the entries not delivered yet."""

    __slots__ = ("_buf", "_deliver", "_i", "_pos", "_skipped", "entries")

    def __init__(
        self,
        entries: tuple[RangeEntry, ...],
        deliver: Callable[[RangeEntry, bytes, int], None],
    ) -> None:
        self.entries = entries
        self._deliver = deliver
        self._i = 0  # next entry
        self._pos = 0  # bytes of the range seen
        self._skipped = 0  # gap bytes before entry _i
        self._buf: list[bytes] = []  # bytes of entry _i seen so far

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view and self._i < len(self.entries):
            e = self.entries[self._i]
            if self._pos < e.offset:  # a gap: skip it
                skip = min(len(view), e.offset - self._pos)
                view = view[skip:]
                self._pos += skip
                self._skipped += skip
                continue
            have = self._pos - e.offset
            take = min(len(view), e.length - have)
            self._buf.append(bytes(view[:take]))
            view = view[take:]
            self._pos += take
            if have + take == e.length:
                data = self._buf[0] if len(self._buf) == 1 else b"".join(self._buf)
                self._buf = []
                self._i += 1
                skipped, self._skipped = self._skipped, 0
                self._deliver(e, data, skipped)

    @property
    def pending(self) -> tuple[RangeEntry, ...]:
        return self.entries[self._i :]


def decode(entry: RangeEntry, data: bytes) -> bytes:
    """The object an entry stores (decompressed into at most its size); ValueError if the
    entry does not decode to exactly ``entry.size`` bytes."""
    if entry.encoding == ENC_RAW:
        out = data
    else:
        import zstandard

        try:
            # The frame's own content size decides the buffer: refuse one that is not the
            # object's size before anything is allocated.
            declared = zstandard.frame_content_size(data)
            if declared not in (-1, entry.size):
                raise ValueError(
                    f"a zstd frame of {declared} bytes where the image says {entry.size}"
                )
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=entry.size)
        except zstandard.ZstdError as e:
            raise ValueError(f"zstd: {e}") from None
    if len(out) != entry.size:
        raise ValueError(f"{len(out)} bytes where the image says {entry.size}")
    return out

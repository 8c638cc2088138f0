"""A streaming tar reader for layers: headers parsed and bounds-checked, contents left in the
stream for the caller to read straight into object writers.

Formats read the way Go's ``archive/tar`` reads them (what umoci and the container runtimes
use): V7, ustar (with the ``prefix`` field, and the star variant), GNU (``L``/``K`` long
names, base-256 numbers) and PAX (``x`` records: ``path``, ``linkpath``, ``size``, ``uid``,
``gid``, ``mtime`` with fractions, ``SCHILY.xattr.*``). A GNU long name wins over a PAX path,
as in Go. The ``size`` of header-only entries (links, devices, directories, fifos) is
ignored. Old-style regular entries whose name ends in ``/`` are directories. PAX records with an
empty value are ignored (Go keeps the header's own field, and sets no empty xattr).

Refused with :class:`~csi.oci.errors.LayerError` (naming the entry and its offset): bad
checksums, malformed numbers and PAX records, NUL bytes in names, sparse files (GNU ``S`` or
PAX ``GNU.sparse.*``), unknown entry types, extended headers over 1 MiB, a stream that ends
inside a header or an entry's data. PAX global headers (``g``) carry nothing a layer needs and
are skipped. The end is two zero blocks, or the end of the stream at a header boundary (Go
accepts both); whatever follows the end is left to the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import LayerError
from .streams import ByteReader

BLOCK = 512
#: Longest PAX or GNU long-name header accepted (Go's limit too).
MAX_SPECIAL = 1 << 20
#: Largest entry size accepted (positive 63-bit, as Go).
MAX_SIZE = (1 << 63) - 1
_U32 = 0xFFFFFFFF

REG = b"0"
LINK = b"1"
SYMLINK = b"2"
CHR = b"3"
BLK = b"4"
DIR = b"5"
FIFO = b"6"
_HEADER_ONLY = frozenset({LINK, SYMLINK, CHR, BLK, DIR, FIFO})
_XATTR = b"SCHILY.xattr."
_ZERO = bytes(BLOCK)

#: Makes the error for a problem at a stream offset.
_Fail = Callable[[int, str], LayerError]


@dataclass(slots=True)
class TarEntry:
    """One member of the archive, with every extended header applied."""

    name: bytes
    type: bytes  # one of REG, LINK, SYMLINK, CHR, BLK, DIR, FIFO
    mode: int  # permission bits only (07777)
    uid: int
    gid: int
    size: int  # bytes of data that follow (0 for header-only types)
    mtime_sec: int
    mtime_nsec: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    #: Offset of the entry's (first) header in the uncompressed stream.
    offset: int = 0


class TarReader:
    """``next()`` entries; ``readinto()`` the current entry's data (whatever is not read is
    skipped by the next ``next()``)."""

    def __init__(self, src: ByteReader, what: str) -> None:
        self._src = src
        self._what = what
        self._left = 0  # data bytes of the current entry not read yet
        self._pad = 0  # padding after them
        self.ended = False

    def _fail(self, offset: int, message: str) -> LayerError:
        return LayerError(f"{self._what}: malformed tar at byte {offset}: {message}")

    def readinto(self, out: memoryview) -> int:
        """Read data of the current entry into ``out``; 0 once it is all read."""
        if not self._left:
            return 0
        want = min(len(out), self._left)
        n = self._src.readinto(out[:want])
        if n == 0:
            raise self._fail(self._src.pos, "the stream ends inside an entry's data")
        self._left -= n
        return n

    @property
    def remaining(self) -> int:
        return self._left

    def _skip_rest(self) -> None:
        try:
            self._src.skip(self._left + self._pad)
        except EOFError:
            raise self._fail(self._src.pos, "the stream ends inside an entry's data") from None
        self._left = self._pad = 0

    def _block(self) -> bytes | None:
        at = self._src.pos
        try:
            return self._src.read_exact(BLOCK)
        except EOFError:
            raise self._fail(at, "the stream ends inside a header") from None

    def _data(self, size: int, at: int) -> bytes:
        if size > MAX_SPECIAL:
            raise self._fail(at, f"extended header of {size} bytes (limit {MAX_SPECIAL})")
        padded = -size % BLOCK
        try:
            data = self._src.read_exact(size) if size else b""
            if data is None:
                raise EOFError
            self._src.skip(padded)
        except EOFError:
            raise self._fail(at, "the stream ends inside an extended header") from None
        return data

    def next(self) -> TarEntry | None:
        """The next entry, or None at the end of the archive."""
        if self.ended:
            return None
        self._skip_rest()
        pax: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        first = -1
        while True:
            at = self._src.pos
            block = self._block()
            if first < 0:
                first = at
            if block is None:  # end of stream at a header boundary
                if pax or long_name is not None or long_link is not None:
                    raise self._fail(at, "the stream ends after an extended header")
                self.ended = True
                return None
            if block == _ZERO:
                second = self._block()
                if second is not None and second != _ZERO:
                    raise self._fail(at, "a zero block inside the archive")
                if pax or long_name is not None or long_link is not None:
                    raise self._fail(at, "the archive ends after an extended header")
                self.ended = True
                return None
            _check_sum(block, at, self._fail)
            kind = block[156:157]
            size = _number(block[124:136], at, "size", self._fail)
            if kind == b"x":
                pax.update(_parse_pax(self._data(size, at), at, self._fail))
                continue
            if kind == b"g":
                self._data(size, at)
                continue
            if kind == b"L":
                long_name = _cstr(self._data(size, at))
                continue
            if kind == b"K":
                long_link = _cstr(self._data(size, at))
                continue
            break
        entry = _entry(block, first, size, self._fail)
        _apply_pax(entry, pax, first, self._fail)
        if long_name is not None:
            entry.name = long_name
        if long_link is not None:
            entry.linkname = long_link
        if entry.type == REG and entry.name.endswith(b"/") and block[156:157] in (b"\0", b""):
            entry.type = DIR
        if entry.type in _HEADER_ONLY:
            entry.size = 0
        if b"\0" in entry.name or b"\0" in entry.linkname:
            raise self._fail(first, f"NUL byte in the name {entry.name!r:.200}")
        if not entry.name:
            raise self._fail(first, "an entry with an empty name")
        self._left = entry.size
        self._pad = -entry.size % BLOCK
        return entry


def _cstr(field_: bytes) -> bytes:
    end = field_.find(b"\0")
    return field_ if end < 0 else field_[:end]


def _check_sum(block: bytes, at: int, fail: _Fail) -> None:
    try:
        want = _number(block[148:156], at, "checksum", fail)
    except LayerError:
        want = -1
    rest = block[:148] + block[156:]
    unsigned = sum(rest) + 8 * 0x20
    signed = unsigned - 256 * sum(1 for b in rest if b > 127)
    if want not in (unsigned, signed):
        raise fail(at, "header checksum mismatch (not a tar archive, or a corrupt one)")


def _number(raw: bytes, at: int, what: str, fail: _Fail) -> int:
    if raw and raw[0] & 0x80:  # base-256 (GNU): big endian, the first byte's top bit marks it
        value = int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
        if raw[0] == 0xFF:  # negative
            value -= 1 << (8 * len(raw) - 1)
        return value
    text = raw.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        if any(c not in b"01234567" for c in text):
            raise ValueError
        return int(text, 8)
    except ValueError:
        raise fail(at, f"malformed {what} field {raw!r}") from None


def _entry(block: bytes, at: int, size: int, fail: _Fail) -> TarEntry:
    kind = block[156:157] or b"\0"
    magic = block[257:263]
    name = _cstr(block[0:100])
    if magic == b"ustar\0" and block[263:265] == b"00":
        prefix = _cstr(block[345:476] if block[508:512] == b"tar\0" else block[345:500])
        if prefix:
            name = prefix + b"/" + name
    if kind in (b"\0", b"7"):
        kind = REG
    elif kind == b"S":
        raise fail(at, f"{name!r:.200} is a GNU sparse file (not supported)")
    elif kind not in (REG, LINK, SYMLINK, CHR, BLK, DIR, FIFO):
        raise fail(at, f"{name!r:.200} has an unsupported entry type {kind!r}")
    if not 0 <= size <= MAX_SIZE:
        raise fail(at, f"{name!r:.200} has a size of {size}")
    mtime = _number(block[136:148], at, "mtime", fail)
    return TarEntry(
        name=name,
        type=kind,
        mode=_number(block[100:108], at, "mode", fail) & 0o7777,
        uid=_id(_number(block[108:116], at, "uid", fail), at, "uid", fail),
        gid=_id(_number(block[116:124], at, "gid", fail), at, "gid", fail),
        size=size,
        mtime_sec=mtime,
        mtime_nsec=0,
        linkname=_cstr(block[157:257]),
        devmajor=_number(block[329:337], at, "devmajor", fail) if magic[:5] == b"ustar" else 0,
        devminor=_number(block[337:345], at, "devminor", fail) if magic[:5] == b"ustar" else 0,
        offset=at,
    )


def _id(value: int, at: int, what: str, fail: _Fail) -> int:
    if not 0 <= value <= _U32:
        raise fail(at, f"{what} {value} does not fit in 32 bits")
    return value


def _parse_pax(data: bytes, at: int, fail: _Fail) -> dict[bytes, bytes]:
    """``"<len> <key>=<value>\\n"`` records (``len`` counts the whole record)."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        if space <= pos or not data[pos:space].isdigit():
            raise fail(at, "malformed PAX record length")
        length = int(data[pos:space])
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise fail(at, "malformed PAX record")
        record = data[space + 1 : end - 1]
        key, eq, value = record.partition(b"=")
        if not eq or not key:
            raise fail(at, "PAX record without a key")
        out[key] = value
        pos = end
    return out


def _apply_pax(entry: TarEntry, pax: dict[bytes, bytes], at: int, fail: _Fail) -> None:
    for key, value in pax.items():
        if not value:
            continue  # as Go: an empty value keeps the header's own (and sets no xattr)
        if key == b"path":
            entry.name = value
        elif key == b"linkpath":
            entry.linkname = value
        elif key == b"size":
            entry.size = _decimal(value, at, "size", fail)
            if entry.size > MAX_SIZE:
                raise fail(at, f"PAX size {entry.size} out of range")
        elif key == b"uid":
            entry.uid = _id(_decimal(value, at, "uid", fail), at, "uid", fail)
        elif key == b"gid":
            entry.gid = _id(_decimal(value, at, "gid", fail), at, "gid", fail)
        elif key == b"mtime":
            entry.mtime_sec, entry.mtime_nsec = _pax_time(value, at, fail)
        elif key.startswith(_XATTR):
            name = key[len(_XATTR) :]
            if not name or b"\0" in name:
                raise fail(at, f"PAX xattr record with an invalid name {name[:100]!r}")
            entry.xattrs[name] = value
        elif key.startswith(b"GNU.sparse."):
            raise fail(at, f"{entry.name!r:.200} is a sparse file (not supported)")


def _decimal(value: bytes, at: int, what: str, fail: _Fail) -> int:
    if not value.isdigit() or len(value) > 20:
        raise fail(at, f"malformed PAX {what} {value[:40]!r}")
    return int(value)


def _pax_time(value: bytes, at: int, fail: _Fail) -> tuple[int, int]:
    """``[-]SECONDS[.FRACTION]``, as Go reads it: the fraction is cut to nanoseconds."""
    text = value[1:] if value.startswith(b"-") else value
    whole, _, frac = text.partition(b".")
    if not whole.isdigit() or len(whole) > 19 or (frac and not frac.isdigit()):
        raise fail(at, f"malformed PAX mtime {value[:40]!r}")
    sec = int(whole)
    nsec = int((frac + b"000000000")[:9]) if frac else 0
    if value.startswith(b"-"):
        sec, nsec = -sec, -nsec
        if nsec:
            sec, nsec = sec - 1, nsec + 1_000_000_000
    return sec, nsec

"""Optional image deltas: a node that holds an earlier image fetches a new one as a zstd patch.

An image is metadata for every file (about 245 bytes each), downloaded whole for each new
version: 24.5 MB for a 100k-file tree whose second version changes 10% of its files, a
quarter of what those files weigh. Against the first version's image, zstd with that image as
its dictionary (``zstd --patch-from``) makes the second one about 1 MB.

A client can only use a delta if it knows the new image's digest before it downloads the
ref, and a ref is answered with the image itself. So ``build --pack`` also writes, for each
ref it moves, a small pointer naming the image the ref now points to and the deltas there are
to it. Nothing here is trusted: a delta's output must hash to the pointer's digest, and the
client confirms that the ref itself serves that image (the same ``ETag`` for the ref and for
``images/<hex>``) before it uses the pointer, so a pointer left behind by a tool that moved the
ref without it only costs a few small requests.

Layout (docs/publishing.md)::

    packs/refs/<ref name>               the pointer (text, below)
    packs/deltas/<image hex>/<base hex> one zstd frame: the image, compressed with the base
                                        image as a raw-content dictionary

Pointer format (UTF-8 lines, at most :data:`MAX_POINTER` bytes)::

    composefs-csi-ref 1
    image <64 hex> <size>
    delta <base 64 hex> <length>        (0 to MAX_DELTAS lines)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import layout
from .errors import RefNotFound
from .repository import Repository

POINTERS_DIR = "packs/refs"
DELTAS_DIR = "packs/deltas"
POINTER_MAGIC = "composefs-csi-ref 1"
#: Longest pointer accepted.
MAX_POINTER = 4096
#: Deltas listed in one pointer at most (and written per ref by ``build``).
MAX_DELTAS = 4
#: Bases ``build`` makes deltas from by default: the ref's previous image and the most
#: recently moved refs beside it.
DEFAULT_BASES = 2
#: zstd level of deltas, with hash and chain tables large enough to index the whole base
#: (measured on the 100k-file benchmark image: level 3 with default tables 9.7 MB in 0.3 s,
#: level 6 with 2^25-entry tables 0.94 MB in 1.0 s, level 19 0.97 MB in 20 s).
LEVEL = 6
#: At most 2^25-entry hash and chain tables: 128 MiB each while a delta is made.
_TABLE_LOG_MAX = 25
#: The largest window a delta may ask for (base and image of up to 1 GiB each).
WINDOW_LOG_MAX = 31


class PointerError(ValueError):
    """A pointer that does not parse (the message says where)."""


@dataclass(frozen=True, slots=True)
class Pointer:
    image: bytes
    size: int
    #: (base image digest, delta length), at most MAX_DELTAS.
    deltas: list[tuple[bytes, int]] = field(default_factory=list)

    def encode(self) -> bytes:
        lines = [POINTER_MAGIC, f"image {self.image.hex()} {self.size}"]
        lines += [f"delta {base.hex()} {length}" for base, length in self.deltas]
        return ("\n".join(lines) + "\n").encode()


def parse_pointer(data: bytes) -> Pointer:
    """Parse (and bounds-check) a pointer."""
    if len(data) > MAX_POINTER:
        raise PointerError(f"{len(data)} bytes: longer than {MAX_POINTER}")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise PointerError("not UTF-8") from None
    if not lines or lines[0] != POINTER_MAGIC:
        raise PointerError("not a ref pointer (bad first line)")
    if len(lines) < 2:
        raise PointerError("no image line")
    image, size = _digest_and_number(lines[1], "image")
    if size <= 0:
        raise PointerError(f"image size {size}")
    deltas = [_digest_and_number(line, "delta") for line in lines[2:] if line]
    if len(deltas) > MAX_DELTAS:
        raise PointerError(f"{len(deltas)} deltas: more than {MAX_DELTAS}")
    if any(length <= 0 for _, length in deltas):
        raise PointerError("a delta of no bytes")
    return Pointer(image, size, deltas)


def _digest_and_number(line: str, word: str) -> tuple[bytes, int]:
    parts = line.split(" ")
    if len(parts) != 3 or parts[0] != word:
        raise PointerError(f"expected '{word} <64 hex> <number>', got {line[:100]!r}")
    if not layout.is_hex_digest(parts[1]) or not parts[2].isdigit() or len(parts[2]) > 15:
        raise PointerError(f"bad {word} line {line[:100]!r}")
    return bytes.fromhex(parts[1]), int(parts[2])


def pointer_relpath(name: str) -> str:
    return f"{POINTERS_DIR}/{layout.validate_ref_name(name)}"


def delta_relpath(image: bytes, base: bytes) -> str:
    return f"{DELTAS_DIR}/{layout.check_digest(image).hex()}/{layout.check_digest(base).hex()}"


# -- the codec --------------------------------------------------------------------------------


def _window_log(base_size: int, size: int) -> int:
    return max(10, (base_size + size - 1).bit_length())


def make_delta(base: bytes, image: bytes) -> bytes:
    """``image`` as one zstd frame with ``base`` as its dictionary."""
    import zstandard

    wlog = _window_log(len(base), len(image))
    if wlog > WINDOW_LOG_MAX:
        raise ValueError(f"base and image of {len(base) + len(image)} bytes: too large for a delta")
    table = min(_TABLE_LOG_MAX, max(17, len(base).bit_length()))
    d = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    # With the frame's checksum: a delta applied to the wrong base fails as it is decoded.
    params = zstandard.ZstdCompressionParameters.from_level(
        LEVEL,
        window_log=wlog,
        hash_log=table,
        chain_log=table,
        enable_ldm=True,
        write_checksum=True,
    )
    return zstandard.ZstdCompressor(dict_data=d, compression_params=params).compress(image)


def apply_delta(base: bytes, delta: bytes, size: int) -> bytes:
    """The image a delta makes of ``base``: exactly ``size`` bytes, or ValueError (a frame
    that claims another size, asks for a window past what these sizes need, or is corrupt)."""
    import zstandard

    try:
        declared = zstandard.frame_content_size(delta)
        if declared not in (-1, size):
            raise ValueError(f"a delta of {declared} bytes where the pointer says {size}")
        params = zstandard.get_frame_parameters(delta)
        if params.window_size > 1 << _window_log(len(base), size):
            raise ValueError(f"a delta asking for a {params.window_size}-byte window")
        d = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        out = zstandard.ZstdDecompressor(
            dict_data=d, max_window_size=1 << _window_log(len(base), size)
        ).decompress(delta, max_output_size=size)
    except zstandard.ZstdError as e:
        raise ValueError(f"zstd: {e}") from None
    if len(out) != size:
        raise ValueError(f"{len(out)} bytes where the pointer says {size}")
    return out


# -- writing (composefs-csi build --pack) -----------------------------------------------------


@dataclass
class DeltaReport:
    deltas: int = 0
    delta_bytes: int = 0
    image_bytes: int = 0


def choose_bases(
    repo: Repository, name: str, image: bytes, count: int = DEFAULT_BASES
) -> list[bytes]:
    """Images a new version of ref ``name`` is likely to be pulled over: the one the ref
    points to now, then those of the refs beside it (in the same folder; at the top, those
    with the same name before ``:``), most recently moved first. Call it before the ref
    moves."""
    out: list[bytes] = []
    refs = repo.root / layout.IMAGES_DIR / layout.REFS_DIR

    def add(digest: bytes) -> None:
        if digest != image and digest not in out and repo.image_path(digest).exists():
            out.append(digest)

    with contextlib.suppress(RefNotFound, OSError, ValueError):  # a new ref, or broken
        add(repo.resolve_ref(name))
    folder, _, leaf = name.rpartition("/")
    family = leaf.split(":", 1)[0]
    siblings: list[tuple[float, bytes]] = []
    for other, digest in repo.iter_refs():
        o_folder, _, o_leaf = other.rpartition("/")
        if folder:  # the same folder
            beside = o_folder == folder
        else:  # at the top, the same name before ':' (not every ref at the top)
            beside = not o_folder and o_leaf.split(":", 1)[0] == family
        if other == name or not beside:
            continue
        try:
            siblings.append((os.lstat(refs / other).st_mtime, digest))
        except OSError:
            continue
    for _, digest in sorted(siblings, key=lambda s: -s[0]):
        if len(out) >= count:
            break
        add(digest)
    return out[:count]


def write_ref_deltas(repo: Repository, image: bytes, bases: list[bytes]) -> DeltaReport:
    """Write ``packs/deltas/<image>/<base>`` for each of ``bases`` (skipping those already
    there). Call it before the ref moves and :func:`write_pointer` after."""
    report = DeltaReport()
    data = Path(repo.image_path(image)).read_bytes()
    report.image_bytes = len(data)
    for base in bases[:MAX_DELTAS]:
        final = repo.root / delta_relpath(image, base)
        if final.exists():
            continue
        try:
            delta = make_delta(Path(repo.image_path(base)).read_bytes(), data)
        except ValueError:  # too large for one window: nodes fetch the image whole
            continue
        repo.write_file(final, delta, replace=False, tag="delta")
        report.deltas += 1
        report.delta_bytes += len(delta)
    return report


def write_pointer(repo: Repository, name: str, image: bytes) -> Pointer:
    """Point ``packs/refs/<name>`` at ``image``, listing the deltas to it that exist."""
    size = Path(repo.image_path(image)).stat().st_size
    deltas: list[tuple[bytes, int]] = []
    folder = repo.root / DELTAS_DIR / image.hex()
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        names = []
    for entry in names:
        if layout.is_hex_digest(entry) and len(deltas) < MAX_DELTAS:
            deltas.append((bytes.fromhex(entry), (folder / entry).stat().st_size))
    pointer = Pointer(image, size, deltas)
    repo.write_file(repo.root / pointer_relpath(name), pointer.encode(), tag="pointer")
    return pointer

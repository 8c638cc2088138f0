"""Fuzzing the image reader with mutated images: every API must succeed or raise FormatError.

Images are written by our writer from the trees of tests/writer_trees.py, then mutated (bit
flips, truncations, field overwrites at inode/superblock/dirent/xattr offsets, huge counts,
structures copied over others). For each mutant the whole API is exercised: a lazy walk with
getattr/readdir (with resume cookies)/lookup/readlink/xattrs/backing/read_inline, then
validate(), to_tree(), object_digests(). Anything but FormatError is a reader bug; the seed in
the failure message reproduces it (``CFS_FUZZ_SEED=<seed> CFS_FUZZ_EXAMPLES=1``).

CI runs a few thousand cases; raise ``CFS_FUZZ_EXAMPLES`` (seeded mutator cases) and
``CFS_FUZZ_HYPOTHESIS`` (hypothesis examples) for a longer local campaign.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import stat
import struct
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi.image.errors import FormatError, ImageError
from csi.image.reader import Image
from tests import writer_trees as wt

EXAMPLES = int(os.environ.get("CFS_FUZZ_EXAMPLES", "2400"))
HYPOTHESIS_EXAMPLES = int(os.environ.get("CFS_FUZZ_HYPOTHESIS", "400"))
SEED0 = int(os.environ.get("CFS_FUZZ_SEED", "0"))
BASES = (
    "basic",
    "xattrs",
    "hardlinks",
    "whiteouts",
    "symlinks",
    "names_order",
    "acl",
    "inline_sizes",
    "big_directories",
)
#: Bounds of the lazy walk of one mutant (the reader's own work is bounded by the image size).
MAX_NODES = 3000

T = TypeVar("T")


@functools.cache
def base_images() -> list[tuple[str, bytes, list[int]]]:
    try:
        from csi.image.writer import write_image
    except ImportError:  # pragma: no cover
        pytest.skip("csi.image.writer is not available yet")
    out = []
    for name in BASES:
        data = write_image(wt.TREES[name]())
        out.append((name, data, interesting_offsets(data)))
    return out


def interesting_offsets(data: bytes) -> list[int]:
    """Offsets of header/superblock fields, inode fields, xattr bodies and dirents."""
    offs = [0, 4, 8, 12, *(1024 + f for f in (0, 8, 12, 13, 14, 16, 24, 32, 36, 40, 44, 80))]
    img = Image(data)
    for nid in img.inodes():
        ino = img._inode(nid)
        base = nid * 32
        offs += [base + f for f in (0, 2, 4, 6, 8, 16, 20, 24, 26, 40, 44)]
        if ino.xattr_size:
            offs += [ino.xattr_off + f for f in (0, 4, 12, 13, 14, 16)]
        if stat.S_ISDIR(ino.attr.mode):
            for start, blen in img._dir_blocks(ino):
                count = img._block_count(nid, start, blen)
                for i in range(count):
                    offs += [start + 12 * i, start + 12 * i + 8, start + 12 * i + 10]
    return sorted({o for o in offs if o < len(data)})


_VALUES = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0xFFFFFFFF, (1 << 64) - 1, 36)
_FORMATS = ("<B", "<H", "<I", "<Q")


def mutate(rng: random.Random, data: bytes, offs: list[int]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.randrange(7)
        if kind == 0:  # bit flips anywhere
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
        elif kind in (1, 2):  # a field overwrite at an interesting offset
            off = rng.choice(offs)
            fmt = rng.choice(_FORMATS)
            size = struct.calcsize(fmt)
            if off + size > len(buf):
                continue
            old = struct.unpack_from(fmt, buf, off)[0]
            mask = (1 << (8 * size)) - 1
            value = rng.choice(
                (
                    rng.choice(_VALUES),
                    old + rng.randint(-40, 40),
                    rng.getrandbits(8 * size),
                    len(buf) // 32 + rng.randint(-2, 2),
                    old ^ (1 << rng.randrange(8 * size)),
                )
            )
            struct.pack_into(fmt, buf, off, value & mask)
        elif kind == 3:  # truncation
            cut = rng.choice((rng.randrange(len(buf)), rng.choice(offs), len(buf) - 4096))
            del buf[max(cut, 0) :]
            if len(buf) >= 1024 + 40 and rng.random() < 0.7:
                # keep the superblock consistent so the damage is found deeper
                struct.pack_into("<I", buf, 1024 + 36, len(buf) // 4096)
            if not buf:
                break
        elif kind == 4:  # a structure copied over another (confuses nids and blocks)
            a, b = rng.choice(offs), rng.choice(offs)
            n = rng.choice((4, 12, 32, 64))
            chunk = buf[a : a + n]
            buf[b : b + len(chunk)] = chunk
        elif kind == 5:  # a zeroed or 0xff-filled range
            a = rng.choice(offs)
            n = rng.randint(1, 128)
            buf[a : a + n] = bytes([rng.choice((0, 0xFF))]) * len(buf[a : a + n])
        else:  # random bytes at an interesting place
            a = rng.choice(offs)
            n = rng.randint(1, 16)
            buf[a : a + n] = rng.randbytes(n)[: len(buf[a : a + n])]
    return bytes(buf)


def _try(fn: Callable[..., T], *args: Any) -> T | None:
    try:
        return fn(*args)
    except FormatError:
        return None


def _collect(fn: Callable[..., Iterable[T]], *args: Any) -> list[T]:
    return list(fn(*args))


def exercise(data: bytes) -> None:
    """Use every API on an image; only FormatError may escape (and is swallowed here)."""
    try:
        img = Image(data)
    except FormatError:
        return
    seen: set[int] = set()
    queue = deque([img.root_nid])
    while queue and len(seen) < MAX_NODES:
        nid = queue.popleft()
        if nid in seen:
            continue
        seen.add(nid)
        attr = _try(img.getattr, nid)
        _try(img.raw_xattrs, nid)
        names = _try(img.listxattr, nid) or []
        for name in names[:8]:
            _try(img.getxattr, nid, name)
        _try(img.getxattr, nid, b"trusted.overlay.opaque")
        _try(img.backing, nid)
        if attr is None:
            continue
        if stat.S_ISLNK(attr.mode):
            _try(img.readlink, nid)
        elif stat.S_ISREG(attr.mode):
            _try(img.read_inline, nid, 0, 1 << 20)
            _try(img.read_inline, nid, 4090, 20)
        elif stat.S_ISDIR(attr.mode):
            entries = _try(_collect, img.readdir, nid) or []
            _try(_collect, img.raw_dirents, nid)
            _try(_collect, img.readdir, nid, 3)
            _try(_collect, img.readdir_plus, nid, len(entries) // 2)
            for name, child, _ in entries[:64]:
                _try(img.lookup, nid, name)
                queue.append(child)
            _try(img.lookup, nid, b"zz-not-there")
            _try(img.raw_lookup, nid, b"..")
    valid = _try(img.validate) is not None or _validates(img)
    tree = _try(img.to_tree)
    # The store validates images through object_digests() alone: it must reject exactly
    # what validate() rejects.
    assert (_try(img.object_digests) is not None) == _validates(img)
    if valid:
        assert tree is not None, "validate() passed but to_tree() failed"
        tree.validate()  # the tree of a valid image is always a valid tree
        try:
            from csi.image.writer import write_image
        except ImportError:  # pragma: no cover
            return
        # The writer may refuse (e.g. xattrs beyond its limits): an error, not a crash.
        with contextlib.suppress(ImageError):
            write_image(tree, min_version=img.version % 2, max_version=1)


def _validates(img: Image) -> bool:
    try:
        img.validate()
    except FormatError:
        return False
    return True


def test_pristine_bases_are_valid() -> None:
    for name, data, offs in base_images():
        img = Image(data)
        img.validate()
        assert len(offs) > 50, name
        exercise(data)


@pytest.mark.timeout(900)
def test_seeded_mutations() -> None:
    bases = base_images()
    counts = {"rejected_at_open": 0, "valid": 0, "other": 0}
    for case in range(EXAMPLES):
        seed = SEED0 + case
        rng = random.Random(seed)
        name, data, offs = bases[seed % len(bases)]
        mutant = mutate(rng, data, offs)
        try:
            exercise(mutant)
        except Exception as e:
            raise AssertionError(f"seed {seed} (base {name}): {type(e).__name__}: {e}") from e
        try:
            Image(mutant)
        except FormatError:
            counts["rejected_at_open"] += 1
            continue
        counts["valid" if _validates(Image(mutant)) else "other"] += 1
    # The mutator must produce a mix: some images rejected early, some deep, some still valid.
    if EXAMPLES >= 500:
        assert all(v > 0 for v in counts.values()), counts


@settings(
    max_examples=HYPOTHESIS_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=os.environ.get("CFS_FUZZ_RANDOM") is None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def test_hypothesis_field_overwrites(data: st.DataObject) -> None:
    bases = base_images()
    _name, image, offs = bases[data.draw(st.integers(0, len(bases) - 1))]
    buf = bytearray(image)
    for _ in range(data.draw(st.integers(1, 3))):
        off = data.draw(st.sampled_from(offs))
        fmt = data.draw(st.sampled_from(_FORMATS))
        size = struct.calcsize(fmt)
        value = data.draw(st.integers(0, (1 << (8 * size)) - 1))
        if off + size <= len(buf):
            struct.pack_into(fmt, buf, off, value)
    if data.draw(st.booleans()):
        del buf[data.draw(st.integers(0, len(buf))) :]
    exercise(bytes(buf))


def test_huge_counts_rejected_without_allocation() -> None:
    """Sizes and counts far beyond the image fail the bounds checks, not memory."""
    _, data, _ = base_images()[0]
    img = Image(data)
    for nid in img.inodes():
        a = img.getattr(nid)
        for field, fmt in ((8, "<I"), (2, "<H")):
            buf = bytearray(data)
            struct.pack_into(fmt, buf, nid * 32 + field, (1 << (8 * struct.calcsize(fmt))) - 1)
            if a.layout == 4 and field == 8:
                continue  # a chunk-based size needs only one chunk entry per 2^chunkbits
            exercise(bytes(buf))

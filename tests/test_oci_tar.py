"""The streaming tar reader and the blob streams of the OCI importer (no root, no network).

Archives are written by Python's ``tarfile`` in every format it knows (and by GNU tar when
installed), read back by our reader, and compared field by field with what ``tarfile`` reads;
malformed archives must fail with a :class:`~csi.oci.errors.LayerError` that says where.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi.oci.digests import Digest, parse_digest
from csi.oci.errors import DigestError, FormatError, LayerError
from csi.oci.streams import ByteReader, CheckedBlob, Decompressed
from csi.oci.tarstream import TarEntry, TarReader

_TYPES = {
    tarfile.REGTYPE: b"0",
    tarfile.AREGTYPE: b"0",
    tarfile.LNKTYPE: b"1",
    tarfile.SYMTYPE: b"2",
    tarfile.CHRTYPE: b"3",
    tarfile.BLKTYPE: b"4",
    tarfile.DIRTYPE: b"5",
    tarfile.FIFOTYPE: b"6",
}


class _Bytes:
    def __init__(self, data: bytes, piece: int = 1 << 20) -> None:
        self._f = io.BytesIO(data)
        self._piece = piece

    def read(self, n: int) -> bytes:
        return self._f.read(min(n, self._piece))

    def close(self) -> None:
        pass


def read_all(data: bytes, piece: int = 1 << 20) -> list[tuple[TarEntry, bytes]]:
    src = _Bytes(data, piece)
    reader = ByteReader(lambda: src.read(1 << 20))
    tar = TarReader(reader, "test layer")
    out = []
    while (e := tar.next()) is not None:
        buf = bytearray(e.size)
        view = memoryview(buf)
        got = 0
        while got < e.size:
            got += tar.readinto(view[got:])
        out.append((e, bytes(buf)))
    return out


def write(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return out.getvalue()


def expect_same(data: bytes) -> None:
    """Our reading of ``data`` equals tarfile's, entry by entry."""
    ours = read_all(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as tf:  # fmt: skip
        theirs = tf.getmembers()
        contents = [tf.extractfile(m).read() if m.isreg() else b"" for m in theirs]  # type: ignore[union-attr]
    assert len(ours) == len(theirs)
    for (e, body), ti, content in zip(ours, theirs, contents, strict=True):
        assert e.name.rstrip(b"/") == os.fsencode(ti.name).rstrip(b"/")
        assert e.type == _TYPES[ti.type]
        assert e.mode == ti.mode & 0o7777
        assert (e.uid, e.gid) == (ti.uid, ti.gid)
        assert e.mtime_sec == int(ti.mtime // 1)
        assert body == content
        if ti.issym() or ti.islnk():
            assert e.linkname == os.fsencode(ti.linkname)
        if ti.ischr() or ti.isblk():
            assert (e.devmajor, e.devminor) == (ti.devmajor, ti.devminor)
        xattrs = {
            k[len("SCHILY.xattr.") :].encode(): v.encode("utf-8", "surrogateescape")
            for k, v in ti.pax_headers.items()
            if k.startswith("SCHILY.xattr.") and v
        }
        assert e.xattrs == xattrs


def info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, **kw: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = size
    ti.mtime = 1_700_000_000
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def sample(long: bool = False) -> list[tuple[tarfile.TarInfo, bytes]]:
    deep = "/".join(["component-" + str(i) for i in range(20)]) if long else "d"
    return [
        (info("./", tarfile.DIRTYPE, mode=0o755), b""),
        (info(deep + "/", tarfile.DIRTYPE, mode=0o1777, uid=1000, gid=1000), b""),
        (info(deep + "/file", size=5000, mode=0o4755), os.urandom(5000)),
        (info(deep + "/empty", mode=0o600), b""),
        (info("link", tarfile.SYMTYPE, linkname="../" * (40 if long else 1) + "x"), b""),
        (info("hard", tarfile.LNKTYPE, linkname=deep + "/file"), b""),
        (info("null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), b""),
        (info("loop", tarfile.BLKTYPE, devmajor=7, devminor=300), b""),
        (info("fifo", tarfile.FIFOTYPE), b""),
    ]


@pytest.mark.parametrize(
    "fmt",
    [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
    ids=["ustar", "gnu", "pax"],
)
def test_formats_read_like_tarfile(fmt: int) -> None:
    expect_same(write(sample(), fmt))
    if fmt != tarfile.USTAR_FORMAT:  # ustar cannot hold these names
        expect_same(write(sample(long=True), fmt))


def test_ustar_prefix_field_joins_long_names() -> None:
    name = "p" * 120 + "/" + "n" * 90
    data = write([(info(name, size=3), b"abc")], tarfile.USTAR_FORMAT)
    assert data[345:350] == b"ppppp"  # really in the prefix field
    [(e, body)] = read_all(data)
    assert e.name == name.encode() and body == b"abc"


def test_gnu_base256_numbers_and_pax_records() -> None:
    big = info("f", size=1, uid=70_000_000, gid=3_000_000_000 % (1 << 32))
    data = write([(big, b"x")], tarfile.GNU_FORMAT)
    assert data[108] & 0x80  # base-256 uid
    [(e, _)] = read_all(data)
    assert (e.uid, e.gid) == (70_000_000, 3_000_000_000 % (1 << 32))
    pax = info("p", size=0)
    pax.pax_headers = {
        "SCHILY.xattr.user.bin": "\udcff\x00ok",  # arbitrary bytes (surrogateescape)
        "SCHILY.xattr.trusted.t": "v",
        "SCHILY.xattr.user.empty": "",  # Go (and we) set no xattr for an empty value
        "mtime": "1700000000.123456789",
        "LIBARCHIVE.xattr.user.ignored": "eA==",
    }
    [(e, _)] = read_all(write([(pax, b"")], tarfile.PAX_FORMAT))
    assert e.xattrs == {b"user.bin": b"\xff\x00ok", b"trusted.t": b"v"}
    assert (e.mtime_sec, e.mtime_nsec) == (1_700_000_000, 123_456_789)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("-1.5", (-2, 500_000_000)),
        ("0.000000001", (0, 1)),
        ("12.1234567899", (12, 123_456_789)),
        ("-3", (-3, 0)),
    ],
)
def test_pax_times(value: str, expected: tuple[int, int]) -> None:
    ti = info("t")
    ti.pax_headers = {"mtime": value}
    [(e, _)] = read_all(write([(ti, b"")], tarfile.PAX_FORMAT))
    assert (e.mtime_sec, e.mtime_nsec) == expected


def test_gnu_tar_archives(tmp_path: Path) -> None:
    gnutar = shutil.which("tar")
    if gnutar is None:
        pytest.skip("GNU tar is not installed")
    src = tmp_path / "src"
    (src / ("x" * 150)).mkdir(parents=True)
    (src / ("x" * 150) / ("y" * 120)).write_bytes(b"long name")
    (src / "s").symlink_to("z" * 200)
    os.link(src / ("x" * 150) / ("y" * 120), src / "h")
    for fmt in ("gnu", "posix", "oldgnu"):
        data = subprocess.run(
            [gnutar, "-c", f"--format={fmt}", "-C", str(src), "."], capture_output=True, check=True
        ).stdout
        expect_same(data)


NAMES = st.text(
    st.characters(blacklist_characters="\x00/", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=120,
)
XATTRS = st.dictionaries(
    st.sampled_from(["user.a", "user.b", "trusted.c"]), st.text(max_size=30), max_size=2
)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.lists(
        st.tuples(
            st.text(
                st.characters(blacklist_characters="\x00/", blacklist_categories=("Cs",)),
                min_size=1,
                max_size=120,
            ),
            st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.FIFOTYPE]),
            st.binary(max_size=2000),
            st.integers(0, 0o7777),
            st.integers(0, 2**21 - 1),
            st.dictionaries(
                st.sampled_from(["user.a", "user.b", "trusted.c"]), st.text(max_size=30), max_size=2
            ),
        ),
        max_size=8,
    ),
    st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
    st.integers(1, 1500),
)
def test_random_archives_read_like_tarfile(
    members: list[tuple[str, bytes, bytes, int, int, dict[str, str]]], fmt: int, piece: int
) -> None:
    built = []
    for name, kind, data, mode, uid, xattrs in members:
        if name in (".", ".."):
            continue
        ti = info(name, kind, len(data) if kind == tarfile.REGTYPE else 0, mode=mode, uid=uid)
        if kind == tarfile.SYMTYPE:
            ti.linkname = name[::-1]
        if fmt == tarfile.PAX_FORMAT and xattrs:
            ti.pax_headers = {"SCHILY.xattr." + k: v for k, v in xattrs.items()}
        built.append((ti, data if kind == tarfile.REGTYPE else b""))
    data = write(built, fmt)
    expect_same(data)
    # Pieces of any size make no difference.
    assert [(e, b) for e, b in read_all(data, piece)] == read_all(data)


# -- malformed archives ---------------------------------------------------------------------


def corrupt(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def test_malformed_archives_are_refused_with_their_offset() -> None:
    good = write(
        [(info("a", size=600), b"a" * 600), (info("b", size=3), b"bbb")], tarfile.GNU_FORMAT
    )
    cases = {
        "checksum": corrupt(good, 0, b"X"),
        "not a tar": os.urandom(2048),
        "truncated data": good[: 512 + 100],
        "truncated header": good[:300],
        "bad number": corrupt(good, 124, b"99999999999"),
        "unknown type": corrupt(good, 156, b"Z"),
        "zero block inside": good[:1536] + bytes(512) + good[1536:],
    }
    for what, data in cases.items():
        with pytest.raises(LayerError, match=r"test layer: malformed tar at byte \d+") as e:
            read_all(data)
        assert what and "malformed" in str(e.value)
    # The checksum is recomputed for the corrupted headers to prove the other checks themselves.
    for field_offset, value, message in (
        (124, b"9" * 11, "malformed size"),
        (156, b"S", "sparse"),
        (156, b"V", "unsupported entry type"),
    ):
        raw = bytearray(corrupt(good, field_offset, value))
        raw[148:156] = b" " * 8
        raw[148:155] = f"{sum(raw[:512]):06o}\0".encode()
        with pytest.raises(LayerError, match=message):
            read_all(bytes(raw))


def test_pax_header_errors() -> None:
    for record in (b"999 path=x\n", b"5 p\n", b"x path=y\n", b"12 =nokey\n"):
        ti = tarfile.TarInfo("././@PaxHeader")
        ti.type = tarfile.XHDTYPE
        ti.size = len(record)
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            tf.addfile(ti, io.BytesIO(record))
            tf.addfile(info("f"))
        with pytest.raises(LayerError, match="PAX"):
            read_all(out.getvalue())
    sparse = info("s", size=0)
    sparse.pax_headers = {"GNU.sparse.major": "1"}
    with pytest.raises(LayerError, match="sparse"):
        read_all(write([(sparse, b"")], tarfile.PAX_FORMAT))
    nul = info("n")
    nul.pax_headers = {"path": "a\x00b"}
    with pytest.raises(LayerError, match="NUL"):
        read_all(write([(nul, b"")], tarfile.PAX_FORMAT))


def test_end_of_archive_forms() -> None:
    good = write([(info("a", size=3), b"abc")], tarfile.GNU_FORMAT)
    assert len(read_all(good)) == 1
    assert len(read_all(good[:1024])) == 1  # no end blocks at all (Go accepts it)
    assert len(read_all(good[:1024] + bytes(512))) == 1  # one zero block, then the end
    assert len(read_all(good + b"trailing junk after the end")) == 1


# -- blob streams ----------------------------------------------------------------------------


def digest(data: bytes) -> Digest:
    return parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


def decompress(blob: bytes, uncompressed: bytes | None = None) -> tuple[bytes, str]:
    checked = CheckedBlob(_Bytes(blob, 7000), digest(blob), len(blob), "layer")
    dec = Decompressed(checked, "layer")
    out = ByteReader(dec)
    data = bytearray()
    buf = bytearray(3000)
    while n := out.readinto(memoryview(buf)):
        data += buf[:n]
    checked.finish()
    if uncompressed is not None:
        dec.check_diff_id(digest(uncompressed), "layer")
    return bytes(data), dec.compression


def test_decompression_forms() -> None:
    raw = os.urandom(100_000) + bytes(3_000_000)  # mostly compressible: output capped per piece
    assert decompress(raw, raw) == (raw, "none")
    assert decompress(gzip.compress(raw), raw) == (raw, "gzip")
    two = gzip.compress(raw[:1000]) + gzip.compress(raw[1000:])
    assert decompress(two, raw) == (raw, "gzip")  # several gzip members
    assert decompress(gzip.compress(raw) + bytes(100), raw)[0] == raw  # trailing NULs ignored
    zst = zstandard.ZstdCompressor().compress(raw[:5000]) + zstandard.ZstdCompressor().compress(
        raw[5000:]
    )
    assert decompress(zst, raw) == (raw, "zstd")


def test_decompression_errors() -> None:
    raw = os.urandom(50_000)
    gz = gzip.compress(raw)
    with pytest.raises(LayerError, match="gzip stream ends"):
        decompress(gz[:-100])
    with pytest.raises(LayerError, match="corrupt gzip"):
        decompress(gz[:20] + bytes(200) + gz[220:])
    with pytest.raises(LayerError, match="corrupt zstd"):
        decompress(zstandard.ZstdCompressor().compress(raw) + b"junk")
    with pytest.raises(DigestError, match="diff_id"):
        decompress(gz, raw + b"x")


def test_checked_blob_size_and_digest() -> None:
    data = os.urandom(10_000)
    blob = CheckedBlob(_Bytes(data), digest(data), len(data) - 1, "blob x")
    with pytest.raises(DigestError, match="longer than the 9999 bytes"):
        blob.finish()
    blob = CheckedBlob(_Bytes(data), digest(data), len(data) + 1, "blob x")
    with pytest.raises(DigestError, match="10000 bytes, but its descriptor says 10001"):
        blob.finish()
    blob = CheckedBlob(_Bytes(data), digest(data + b"!"), len(data), "blob x")
    with pytest.raises(DigestError, match="content hashes to sha256:"):
        blob.finish()
    with pytest.raises(FormatError):
        parse_digest("sha256:" + "0" * 63)
    with pytest.raises(FormatError):
        parse_digest("md5:" + "0" * 32)

"""fs-verity digests: the format doc's test vectors (§2.1) and an independent reference."""

import hashlib
import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csi.image.fsverity import FsVerityHasher, digest_bytes, digest_file, digest_stream

HELLO = "1e2eaa4202d750a41174ee454970b92c1bc2f925b1e35076d8c7d5f56362ba64"
EMPTY = "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"


def reference(data: bytes) -> bytes:
    """Whole-buffer Merkle tree, written straight from the definition (not streaming)."""
    if not data:
        root = bytes(32)
    else:
        level = [
            hashlib.sha256(data[i : i + 4096].ljust(4096, b"\0")).digest()
            for i in range(0, len(data), 4096)
        ]
        while len(level) > 1:
            joined = b"".join(level)
            level = [
                hashlib.sha256(joined[i : i + 4096].ljust(4096, b"\0")).digest()
                for i in range(0, len(joined), 4096)
            ]
        root = level[0]
    desc = struct.pack("<BBBBIQ64s32s144s", 1, 1, 12, 0, 0, len(data), root, b"", b"")
    return hashlib.sha256(desc).digest()


def test_vectors() -> None:
    assert digest_bytes(b"hello world").hex() == HELLO
    assert digest_bytes(b"").hex() == EMPTY


@pytest.mark.parametrize(
    "size",
    [1, 4095, 4096, 4097, 8192, 128 * 4096, 128 * 4096 + 1, 129 * 4096, 128 * 128 * 4096 + 7],
)
def test_block_boundaries(size: int) -> None:
    data = bytes((i * 7 + 3) % 251 for i in range(size))
    assert digest_bytes(data) == reference(data)
    assert digest_stream(io.BytesIO(data), chunk_size=1000) == reference(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=20000), st.lists(st.integers(1, 9000), max_size=20))
def test_streaming_split_points(data: bytes, cuts: list[int]) -> None:
    h = FsVerityHasher()
    pos = 0
    for c in cuts:
        h.update(data[pos : pos + c])
        pos += c
    h.update(data[pos:])
    assert h.digest() == reference(data)
    assert h.digest() == h.digest()  # digest() does not consume the state
    assert h.size == len(data)


def test_digest_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "f"
    p.write_bytes(b"hello world")
    assert digest_file(p).hex() == HELLO


@pytest.mark.parametrize("size", [4096, 128 * 4096 + 5, 129 * 4096 * 2 + 4095])
def test_same_digest_with_other_threads_alive(size: int) -> None:
    """Hashing takes a different path (keeping the GIL) while another thread exists."""
    import threading

    data = bytes((i * 13 + 5) % 253 for i in range(size))
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert threading.active_count() > 1
        h = FsVerityHasher()
        h.update(data[:5000])
        h.update(data[5000:])
        assert h.digest() == reference(data)
        assert digest_bytes(data) == reference(data)
    finally:
        stop.set()
        other.join()

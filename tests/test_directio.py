"""Direct-I/O object writing (csi.repo.directio): exact bytes and sizes, whatever the path."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from csi.repo import directio
from csi.repo.directio import ALIGN, BlockWriter, BufferPool, enable_direct

BUF = 64 << 10  # a small pool buffer, so a few hundred KiB cross several buffer boundaries
SIZES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, BUF - 1, BUF, BUF + 1, 3 * BUF + 5]


def _data(n: int) -> bytes:
    return random.Random(n).randbytes(n)


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("direct", [True, False])
def test_written_file_is_exactly_the_bytes(tmp_path: Path, size: int, direct: bool) -> None:
    data = _data(size)
    fd = _open(tmp_path / "f")
    try:
        on = enable_direct(fd) if direct else False
        with BlockWriter(fd, direct=on, pool=BufferPool(BUF)) as w:
            # uneven pieces, so buffer boundaries fall inside writes
            for i in range(0, size, 7000):
                w.write(data[i : i + 7000])
            assert w.size == size
            w.finish()
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == data


def test_fill_in_place_then_attach_late(tmp_path: Path) -> None:
    """Bytes gathered before the file exists are written once it is attached."""
    data = _data(BUF + 100)
    src = memoryview(data)
    w = BlockWriter(None, pool=BufferPool(BUF))
    while room := w.space():
        n = min(len(room), len(src))
        if not n:
            break
        room[:n] = src[:n]
        src = src[n:]
        w.advance(n)
    assert len(w.space()) == 0 and w.size == BUF  # full, nothing written anywhere yet
    fd = _open(tmp_path / "f")
    try:
        w.attach(fd, direct=enable_direct(fd))
        w.write(src)
        w.finish()
        w.close()
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == data


def test_unattached_writer_refuses_to_write() -> None:
    w = BlockWriter(None, pool=BufferPool(ALIGN))
    w.write(b"x" * 10)
    with pytest.raises(ValueError, match="without a descriptor"):
        w.finish()
    with pytest.raises(ValueError, match="past the end"):
        w.advance(ALIGN)
    with pytest.raises(ValueError, match="buffer full and no descriptor"):
        w.write(b"y" * ALIGN)  # more than the buffer holds, with nowhere to put it


def test_reset_empties_the_file(tmp_path: Path) -> None:
    fd = _open(tmp_path / "f")
    try:
        with BlockWriter(fd, direct=enable_direct(fd), pool=BufferPool(BUF)) as w:
            w.write(_data(2 * BUF + 3))
            w.reset()
            w.write(b"again")
            w.finish()
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"again"


def test_falls_back_to_buffered_writes_when_direct_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that accepts O_DIRECT but refuses the write: same file, written buffered."""
    real_write = os.write
    refused: list[int] = []

    def write(fd: int, data: object) -> int:
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(directio.os, "write", write)
    data = _data(BUF + ALIGN + 17)
    fd = _open(tmp_path / "f")
    try:
        assert enable_direct(fd)
        with BlockWriter(fd, direct=True, pool=BufferPool(BUF)) as w:
            w.write(data)
            w.finish()
            assert not w.direct
    finally:
        os.close(fd)
    assert refused  # it did try direct first
    assert (tmp_path / "f").read_bytes() == data


def test_other_write_errors_propagate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def write(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(directio.os, "write", write)
    fd = _open(tmp_path / "f")
    try:
        with BlockWriter(fd, direct=enable_direct(fd), pool=BufferPool(ALIGN)) as w:
            w.write(b"x" * 10)
            with pytest.raises(OSError) as e:
                w.finish()
    finally:
        os.close(fd)
    assert e.value.errno == errno.ENOSPC


def test_pool_reuses_buffers_and_checks_their_size() -> None:
    pool = BufferPool(ALIGN, keep=1)
    a = pool.get()
    pool.put(a)
    assert pool.get() is a
    with pytest.raises(ValueError):
        BufferPool(ALIGN + 1)

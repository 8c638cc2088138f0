"""Storing many files as objects in parallel worker processes (``composefs-csi build``).

Hashing 4 KiB blocks releases and re-takes the GIL for each block, so threads of one process
queue on it; worker processes copy and hash for real in parallel (twice as many as CPUs by
default: a worker waiting for a direct write to reach the disk leaves its CPU to another).
Each worker copies a chunk of files into temp files of the repository (named with the
building process's pid, so a store's temp cleaner leaves them alone while it lives) while
computing their fs-verity digests; files of 64 KiB and more are written with direct I/O
(:mod:`csi.repo.directio`). The
parent then makes each batch durable with one ``syncfs`` (on a descriptor opened before any of
it was written, so any writeback error since is reported) and only then renames the files to
their digests. A crash leaves only temp files behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from csi.image.fsverity import FsVerityHasher

from . import layout
from .directio import DIRECT_MIN_SIZE, BlockWriter, enable_direct
from .repository import Repository
from .tmpfiles import WORKER_TEMP_SUFFIX

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2

#: ``progress(files_done, bytes_done)``.
Progress = Callable[[int, int], None]


def _copy_chunk(
    tmpdir: str, objects: str, tag: str, paths: Sequence[bytes]
) -> list[tuple[bytes, str, int]]:
    """Worker: copy each file to a new temp file while hashing; (digest, temp path, size).

    Files are read into an aligned buffer, hashed there and written from it (with direct I/O
    from 64 KiB up: :mod:`csi.repo.directio`). The temp path is ``""`` when the repository
    already holds the object: a file that fits one buffer is then never written at all, a
    larger one's copy is dropped at once.
    """
    out: list[tuple[bytes, str, int]] = []
    try:
        for src in paths:
            h = FsVerityHasher()
            with open(src, "rb", buffering=0) as f, BlockWriter(None) as w:
                size = os.fstat(f.fileno()).st_size
                # Read up to a buffer's worth first: a file that fits (most do) is hashed
                # before a temp file is made, and none is made if the object is there.
                while room := w.space():
                    n = f.readinto(room)
                    if not n:
                        break
                    h.update(room[:n])
                    w.advance(n)
                whole = len(w.space()) > 0
                if whole and _present(objects, h.digest()):
                    out.append((h.digest(), "", h.size))
                    continue
                tmp = os.path.join(tmpdir, f"{tag}-{secrets.token_hex(8)}{WORKER_TEMP_SUFFIX}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                out.append((b"", tmp, 0))  # registered before writing: removed on failure
                try:
                    w.attach(fd, direct=size >= DIRECT_MIN_SIZE and enable_direct(fd))
                    while n := f.readinto(room := w.space()):
                        h.update(room[:n])
                        w.advance(n)
                    w.finish()
                    digest = h.digest()
                    if not whole and _present(objects, digest):
                        os.unlink(tmp)
                        tmp = ""
                    elif not w.direct:
                        # Start writing back now (asynchronously), so the batch's syncfs
                        # finds most of it on disk already: disk writes overlap with hashing.
                        _libc.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
                finally:
                    os.close(fd)
            out[-1] = (digest, tmp, h.size)
    except BaseException:
        for _, tmp, _ in out:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        raise
    return out


def default_processes() -> int:
    """Worker processes for a build: two per CPU (see the module doc), at most 16."""
    return max(2, min(16, 2 * (os.cpu_count() or 1)))


def _present(objects: str, digest: bytes) -> bool:
    h = digest.hex()
    return os.path.exists(os.path.join(objects, h[:2], h[2:]))


def _syncfs(fd: int, where: Path) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}", str(where))


def store_files(
    repo: Repository,
    paths: Sequence[bytes],
    *,
    processes: int,
    progress: Progress | None = None,
    chunk: int = 64,
    max_pending: int = 2048,
) -> tuple[list[bytes], int, int]:
    """Store every file of ``paths`` as an object of ``repo``.

    Returns (the digests in the order of ``paths``, objects added, objects already present).
    """
    repo.tmp.ensure_dirs()
    tmpdir = str(repo.tmp.path)
    tag = repo.tmp.owner()  # worker temp files are ours while this process lives
    root_fd = os.open(repo.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    digests: list[bytes] = []
    pending: dict[bytes, str] = {}
    added = present = done_bytes = 0

    def commit() -> None:
        _syncfs(root_fd, repo.root)
        for digest, tmp in pending.items():
            final = repo.object_path(digest)
            if os.path.lexists(final):
                os.unlink(tmp)  # someone else stored it meanwhile: the same bytes
                continue
            try:
                os.rename(tmp, final)
            except FileNotFoundError:
                final.parent.mkdir(mode=0o755, exist_ok=True)
                os.rename(tmp, final)
        pending.clear()

    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    ctx = multiprocessing.get_context("forkserver")
    try:
        with ProcessPoolExecutor(max(1, processes), mp_context=ctx) as pool:
            n = len(chunks)
            objects = str(repo.root / layout.OBJECTS_DIR)
            results = pool.map(_copy_chunk, [tmpdir] * n, [objects] * n, [tag] * n, chunks)
            for result in results:
                for digest, tmp, size in result:
                    digests.append(digest)
                    done_bytes += size
                    if not tmp:
                        present += 1
                    elif digest in pending or repo.has_object(digest):
                        os.unlink(tmp)
                        present += 1
                    else:
                        pending[digest] = tmp
                        added += 1
                if len(pending) >= max_pending:
                    commit()
                if progress is not None:
                    progress(len(digests), done_bytes)
        commit()
    finally:
        os.close(root_fd)
        for leftover in Path(tmpdir).glob(f"{tag}-*{WORKER_TEMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                leftover.unlink()
    return digests, added, present

"""Storing files as objects from worker processes (the path ``composefs-csi build`` takes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi.image.fsverity import digest_bytes, digest_file
from csi.repo import Repository
from csi.repo.parallel import store_files


def _files(root: Path, contents: list[bytes]) -> list[bytes]:
    root.mkdir()
    paths = []
    for i, data in enumerate(contents):
        p = root / f"f{i}"
        p.write_bytes(data)
        paths.append(os.fsencode(p))
    return paths


def _temps(repo: Repository) -> list[Path]:
    return [p for p in repo.tmp.path.glob("*.tmp")]


@pytest.mark.parametrize("processes", [1, 2])
def test_objects_named_by_digest_in_order(tmp_path: Path, processes: int) -> None:
    contents = [bytes([i % 7]) * (5000 + i % 7) for i in range(150)]  # 7 distinct contents
    paths = _files(tmp_path / "src", contents)
    repo = Repository(tmp_path / "repo", create=True)
    seen: list[tuple[int, int]] = []
    digests, added, present = store_files(
        repo,
        paths,
        processes=processes,
        chunk=16,
        max_pending=3,
        progress=lambda n, b: seen.append((n, b)),
    )
    assert digests == [digest_bytes(c) for c in contents]
    assert (added, present) == (7, 143)
    for d in set(digests):
        assert digest_file(repo.object_path(d)) == d
        assert repo.object_path(d).stat().st_mode & 0o777 == 0o644
    assert _temps(repo) == []
    assert seen[-1] == (150, sum(len(c) for c in contents))
    # Again: everything is present, nothing is rewritten.
    again = store_files(repo, paths, processes=processes)
    assert again == (digests, 0, 150)
    assert _temps(repo) == []


def test_a_failing_file_leaves_nothing_behind(tmp_path: Path) -> None:
    paths = _files(tmp_path / "src", [b"a" * 9000, b"b" * 9000])
    repo = Repository(tmp_path / "repo", create=True)
    with pytest.raises(FileNotFoundError):
        store_files(repo, [*paths, os.fsencode(tmp_path / "missing")], processes=1, chunk=3)
    assert _temps(repo) == []
    assert list(repo.iter_objects()) == []  # nothing was named before the failure was known


def test_store_cleaner_spares_a_live_builds_temps(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo", create=True)
    repo.tmp.ensure_dirs()
    live = repo.tmp.path / f"{repo.tmp.owner()}-0123456789abcdef.worker.tmp"
    dead = repo.tmp.path / f"{'d' * 32}-0123456789abcdef.worker.tmp"  # an owner that is gone
    legacy = repo.tmp.path / "999999999-0123456789abcdef.worker.tmp"  # pid-named, no such pid
    live.write_bytes(b"in progress")
    dead.write_bytes(b"left by a crash")
    legacy.write_bytes(b"left by an older version")
    pid1 = repo.tmp.path / "1-0123456789abcdef.worker.tmp"  # an older version's, in a container
    pid1.write_bytes(b"left by an older version's pid 1")
    os.utime(pid1, (0, 0))  # long ago: pid 1 always exists, so age decides
    young = repo.tmp.path / f"{os.getpid()}-0123456789abcdef.worker.tmp"
    young.write_bytes(b"an older version at work")
    assert repo.tmp.clean() == 3
    assert live.exists() and young.exists()
    assert not dead.exists() and not legacy.exists() and not pid1.exists()


def test_a_failing_sync_names_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from csi.repo import parallel

    paths = _files(tmp_path / "src", [bytes([i]) * 7000 for i in range(6)])
    repo = Repository(tmp_path / "repo", create=True)

    def failing(fd: int, where: Path) -> None:
        raise OSError(errno.EIO, "simulated writeback error", str(where))

    monkeypatch.setattr(parallel, "_syncfs", failing)
    with pytest.raises(OSError, match="simulated"):
        store_files(repo, paths, processes=1)
    assert list(repo.iter_objects()) == []  # nothing named before its bytes were durable
    assert _temps(repo) == []
    monkeypatch.undo()
    digests, added, _ = store_files(repo, paths, processes=1)
    assert added == 6 and all(repo.has_object(d) for d in digests)


def test_sizes_around_the_direct_io_and_buffer_limits(tmp_path: Path) -> None:
    """Below and above DIRECT_MIN_SIZE, and across the 1 MiB buffer: exact objects."""
    from csi.repo.directio import BUFFER_SIZE, DIRECT_MIN_SIZE

    sizes = [1, 4095, DIRECT_MIN_SIZE - 1, DIRECT_MIN_SIZE, DIRECT_MIN_SIZE + 1]
    sizes += [BUFFER_SIZE - 1, BUFFER_SIZE, BUFFER_SIZE + 1, 2 * BUFFER_SIZE + 4097]
    contents = [os.urandom(n) for n in sizes]
    paths = _files(tmp_path / "src", contents)
    repo = Repository(tmp_path / "repo", create=True)
    digests, added, present = store_files(repo, paths, processes=2, chunk=2)
    assert (added, present) == (len(sizes), 0)
    for data, d in zip(contents, digests, strict=True):
        assert repo.object_path(d).read_bytes() == data
    assert _temps(repo) == []


def test_present_small_files_make_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that fits one buffer is hashed first; if its object exists, nothing is created.
    (A larger one is copied while hashing, and the copy dropped.)"""
    from csi.repo import parallel
    from csi.repo.directio import BUFFER_SIZE

    contents = [b"small" * 100, os.urandom(BUFFER_SIZE + 10)]
    paths = _files(tmp_path / "src", contents)
    repo = Repository(tmp_path / "repo", create=True)
    store_files(repo, paths, processes=1)
    repo.tmp.ensure_dirs()
    created: list[str] = []
    real_open = os.open

    def counting_open(path: str, flags: int, *a: int) -> int:
        if flags & os.O_CREAT:
            created.append(path)
        return real_open(path, flags, *a)

    monkeypatch.setattr(parallel.os, "open", counting_open)
    out = parallel._copy_chunk(
        str(repo.tmp.path), str(repo.root / "objects"), repo.tmp.owner(), paths
    )
    assert [(d, t) for d, t, _ in out] == [(digest_bytes(c), "") for c in contents]
    assert len(created) == 1  # only the large file's copy, since dropped
    assert _temps(repo) == []
